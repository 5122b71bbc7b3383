"""Reliability (issue 3): exactly-once hand-out under load, leases, faults,
input fuzzing and security, against live waitress servers where it matters.

Every wait here is bounded: HTTP calls and subprocesses carry timeouts, and
waiting for a condition polls it until a deadline.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from uuid import uuid4

import pytest
import webtest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import admin
import store
import taskfarm

REPO = Path(__file__).resolve().parent

HTTP_TIMEOUT = 10           # seconds, on every HTTP call to a live server
LOAD_WORKERS = 32
DONE = {'percentCompleted': 100, 'status': 'done'}


def is_postgresql(database_url: str) -> bool:
    return database_url.startswith('postgresql')


# ---------------------------------------------------------------------------
# A worker's HTTP client: one keep-alive connection to a live server.


class Reply(NamedTuple):
    status: int
    body: Any
    headers: http.client.HTTPMessage


class Api:
    """Calls /api/* on one keep-alive connection, as one user (or token)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.user = user
        self.password = password
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        credentials = f'{user}:{self.password}'.encode()
        self.authorization = 'Basic ' + base64.b64encode(credentials).decode()
        self.conn: http.client.HTTPConnection | None = None

    def to(self, url: str) -> Api:
        """Another connection, as the same user, to the server at url."""
        return Api(url, self.user, self.password)

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)
        headers = {'Authorization': self.authorization}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers['Content-Type'] = 'application/json'
        try:
            self.conn.request(method, '/api/' + path, data, headers)
            response = self.conn.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        return Reply(response.status, json.loads(raw) if raw else None, response.headers)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def server_api(server: Any) -> Api:
    """A client of a live server (conftest's LiveServer), as its user."""
    return Api(server.url, server.user, server.password)


def token_api(server: Any) -> Api:
    """A client that authenticates with a token, as a long-running worker would."""
    reply = server_api(server).call('GET', 'token')
    assert reply.status == 200, reply
    return Api(server.url, user=reply.body['token'], password='')


def create_run(api: Api, num_tasks: int, **extra: Any) -> str:
    reply = api.call('POST', 'run', {'numTasks': num_tasks, **extra})
    assert reply.status == 201, reply
    return reply.body['uuid']


def register_worker(api: Api) -> str:
    uuid = uuid4().hex
    reply = api.call('POST', 'worker', {'uuid': uuid, 'hostname': 'testhost', 'pid': os.getpid()})
    assert reply.status == 201, reply
    return uuid


def claim(api: Api, run: str, worker: str) -> Reply:
    reply = api.call('POST', f'runs/{run}/task', {'worker_uuid': worker})
    assert reply.status in (201, 204), reply
    return reply


def finish(api: Api, run: str, task: int) -> None:
    reply = api.call('PUT', f'runs/{run}/tasks/{task}', DONE)
    assert reply.status == 204, reply


def run_info(api: Api, run: str) -> dict:
    reply = api.call('GET', f'runs/{run}')
    assert reply.status == 200, reply
    assert_counts_add_up(reply.body)
    return reply.body


def task_info(api: Api, run: str, task: int) -> dict:
    reply = api.call('GET', f'runs/{run}/tasks/{task}')
    assert reply.status == 200, reply
    return reply.body


def tasks_with_status(api: Api, run: str, status: str) -> list[int]:
    """Every task number of the run with that status, page by page."""
    numbers: list[int] = []
    while True:
        after = numbers[-1] if numbers else -1
        reply = api.call('GET', f'runs/{run}/tasks?status={status}&limit=1000&after={after}')
        assert reply.status == 200, reply
        page = [task['task'] for task in reply.body['data']]
        if not page:
            return numbers
        numbers.extend(page)


def assert_counts_add_up(info: dict) -> None:
    parts = ('numWaiting', 'numComputing', 'numDone', 'numFailed')
    assert all(info[part] >= 0 for part in parts), info
    assert sum(info[part] for part in parts) == info['numTasks'], info
    assert 0 <= info['percentDone'] <= 100, info


def assert_run_complete(api: Api, run: str, num_tasks: int) -> None:
    info = run_info(api, run)
    assert (info['numDone'], info['numWaiting'], info['numComputing'], info['numFailed']) == (
        num_tasks, 0, 0, 0), info
    assert info['percentDone'] == 100
    assert tasks_with_status(api, run, 'done') == list(range(num_tasks))


def assert_unavailable(reply: Reply, what: str) -> None:
    """A 503 a client can act on: JSON error and a Retry-After header."""
    assert reply.status == 503, (what, reply)
    assert reply.headers.get('Content-Type', '').startswith('application/json'), (what, reply)
    assert reply.body['title'] and reply.body['description'], (what, reply)
    assert int(reply.headers['Retry-After']) > 0, (what, reply)


def wait_until(condition: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'gave up after {seconds} s waiting for {what}')
        time.sleep(0.05)    # polling, bounded by the deadline


def keep_doing(action: Callable[[], Any], seconds: float) -> None:
    """Repeat action for a while: long enough for a lease to run out meanwhile."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        action()
        time.sleep(0.05)    # pacing, as a worker's loop would


# ---------------------------------------------------------------------------
# Workers under load.


@dataclass
class Tally:
    """What the workers saw: every task number handed to them, and the misses."""
    handed_out: list[int] = field(default_factory=list)
    unanswered: int = 0     # requests that got no answer (server gone)
    unavailable: int = 0    # 503 answers
    stopped: int = 0        # workers that stopped, done or failed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


def answered(api: Api, method: str, path: str, body: Any, tally: Tally, deadline: float,
             survive_drops: bool) -> Reply:
    """The first real answer, retrying 503s and, if survive_drops, lost connections.

    Every retried request is safe to repeat: a retried hand-out that was lost
    may leave a task computing, which is exactly what a real worker causes.
    """
    while True:
        try:
            reply = api.call(method, path, body)
        except (OSError, http.client.HTTPException):
            if not survive_drops:
                raise
            tally.count('unanswered')
        else:
            if reply.status != 503:
                return reply
            tally.count('unavailable')
        if time.monotonic() > deadline:
            raise TimeoutError(f'{method} {path}: no answer before the deadline')
        time.sleep(0.05)    # the server is busy or restarting: poll until the deadline


def drain(api: Api, run: str, tally: Tally, deadline: float, survive_drops: bool = False,
          in_batches: bool = False) -> None:
    """Be a worker: take tasks and finish each one until nothing waits."""
    try:
        if in_batches:
            work_in_batches(api, run, tally, deadline, survive_drops)
        else:
            work(api, run, tally, deadline, survive_drops)
    finally:
        tally.count('stopped')


def work(api: Api, run: str, tally: Tally, deadline: float, survive_drops: bool) -> None:
    worker = uuid4().hex
    registration = {'uuid': worker, 'hostname': 'loadhost', 'pid': os.getpid()}
    reply = answered(api, 'POST', 'worker', registration, tally, deadline, survive_drops)
    assert reply.status == 201, reply
    while True:
        reply = answered(api, 'POST', f'runs/{run}/task', {'worker_uuid': worker},
                         tally, deadline, survive_drops)
        if reply.status == 204:
            return
        assert reply.status == 201, reply
        task = reply.body['task']
        tally.handed_out.append(task)
        reply = answered(api, 'PUT', f'runs/{run}/tasks/{task}', DONE,
                         tally, deadline, survive_drops)
        assert reply.status == 204, reply


BATCH_SIZES = (1, 7, 50, 3, 100)     # claimed in turn by a worker that claims in batches


def work_in_batches(api: Api, run: str, tally: Tally, deadline: float,
                    survive_drops: bool) -> None:
    """Claim batches of mixed sizes, reporting the last batch done with each claim.

    Every claim has a requestId of its own and is sent again as it was after
    a lost answer: the repeat gets that claim's tasks, never more.
    """
    worker = uuid4().hex
    registration = {'uuid': worker, 'hostname': 'batchhost', 'pid': os.getpid()}
    reply = answered(api, 'POST', 'worker', registration, tally, deadline, survive_drops)
    assert reply.status == 201, reply
    finished: list[int] = []
    for count in itertools.cycle(BATCH_SIZES):
        body = {'worker_uuid': worker, 'count': count, 'requestId': uuid4().hex,
                'updates': [{'task': task, **DONE} for task in finished]}
        reply = answered(api, 'POST', f'runs/{run}/tasks/claim', body, tally, deadline,
                         survive_drops)
        assert reply.status == 200, reply
        assert [u['result'] for u in reply.body['updates']] == ['ok'] * len(finished), reply
        finished = [task['task'] for task in reply.body['data']]
        tally.handed_out.extend(finished)
        if not finished:
            return


def drain_in_parallel(urls: list[str], api: Api, run: str, tally: Tally, seconds: float,
                      survive_drops: bool = False,
                      meanwhile: Callable[[], None] | None = None,
                      batches: bool = False) -> None:
    """One worker thread per url, each on its own keep-alive connection; with
    batches, every other worker claims in batches."""
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        futures = [pool.submit(drain, api.to(url), run, tally, deadline, survive_drops,
                               batches and n % 2 == 1)
                   for n, url in enumerate(urls)]
        if meanwhile is not None:
            meanwhile()
        for future in futures:
            future.result(timeout=max(1.0, deadline - time.monotonic() + 2 * HTTP_TIMEOUT))


def assert_each_handed_out_once(handed_out: list[int], expected: set[int]) -> None:
    twice = sorted(task for task, times in Counter(handed_out).items() if times > 1)
    assert not twice, f'tasks handed to more than one worker: {twice[:20]}'
    assert set(handed_out) == expected, (
        f'never handed out: {sorted(expected - set(handed_out))[:20]}, '
        f'unexpected: {sorted(set(handed_out) - expected)[:20]}')


# ---------------------------------------------------------------------------
# 1. Exactly once, under load.


def test_handout_gives_each_task_to_one_worker_across_two_servers(database_url, servers):
    """Single and batch hand-outs at once, on two servers of two processes each."""
    num_tasks = 6000 if is_postgresql(database_url) else 3000
    pair = [servers(workers=2), servers(workers=2)]
    api = token_api(pair[0])
    run = create_run(api, num_tasks)
    tally = Tally()

    urls = [pair[i % 2].url for i in range(LOAD_WORKERS)]
    drain_in_parallel(urls, api, run, tally, seconds=90, batches=True)

    assert_each_handed_out_once(tally.handed_out, set(range(num_tasks)))
    assert_run_complete(api, run, num_tasks)
    assert all(server.process.poll() is None for server in pair)


# ---------------------------------------------------------------------------
# 2. Leases, heartbeats and maxAttempts, with live servers.

# A worker in its own process: registers, takes a task, reports 50 %, says
# which task it holds, then "computes" until it is killed.
DOOMED_WORKER = """
import base64, http.client, json, os, sys, uuid
host, port, token, run = sys.argv[1:5]
conn = http.client.HTTPConnection(host, int(port), timeout=10)
auth = "Basic " + base64.b64encode((token + ":").encode()).decode()
def call(method, path, body):
    conn.request(method, "/api/" + path, json.dumps(body),
                 {"Authorization": auth, "Content-Type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    assert reply.status in (201, 204), (reply.status, data)
    return json.loads(data) if data else None
worker = uuid.uuid4().hex
call("POST", "worker", {"uuid": worker, "hostname": "doomed", "pid": os.getpid()})
task = call("POST", "runs/" + run + "/task", {"worker_uuid": worker})
call("PUT", "runs/" + run + "/tasks/" + str(task["task"]), {"percentCompleted": 50})
print(json.dumps(task), flush=True)
sys.stdin.read()
"""


def read_line(process: subprocess.Popen, seconds: float) -> str:
    """The next line the process prints, or an AssertionError after `seconds`."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=seconds)
    except queue.Empty:
        raise AssertionError(f'no output from {process.args!r} within {seconds} s') from None


def test_task_of_a_killed_worker_process_is_handed_out_again_after_its_lease(servers):
    server = servers()
    api = token_api(server)
    num_tasks, lease = 4, 1
    run = create_run(api, num_tasks, timeout=lease)
    started = time.monotonic()
    doomed = subprocess.Popen(
        [sys.executable, '-c', DOOMED_WORKER, api.host, str(api.port), api.user, run],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = json.loads(read_line(doomed, seconds=30))
    finally:
        doomed.kill()   # SIGKILL, mid-task
        doomed.wait(timeout=10)
    assert doomed.returncode == -signal.SIGKILL

    survivor = register_worker(api)
    reclaimed: list[dict] = []

    def work_one() -> bool:
        reply = claim(api, run, survivor)
        if reply.status == 201:
            if reply.body['task'] == held['task']:
                reclaimed.append({**reply.body, 'after': time.monotonic() - started})
            finish(api, run, reply.body['task'])
        return bool(reclaimed)

    wait_until(work_one, 20, f"the killed worker's task {held['task']} to come back")
    assert reclaimed[0]['attempts'] == 2
    assert reclaimed[0]['percentCompleted'] == 50.0     # progress survives the hand-over
    assert reclaimed[0]['after'] >= lease
    wait_until(lambda: claim(api, run, survivor).status == 204, 10, 'the rest of the run')
    assert_run_complete(api, run, num_tasks)


def test_heartbeat_keeps_a_task_while_a_silent_workers_task_is_taken_back(servers):
    api = token_api(servers())
    lease = 2
    run = create_run(api, 2, timeout=lease)
    beating, silent, thief = register_worker(api), register_worker(api), register_worker(api)
    kept = claim(api, run, beating).body          # task 0: its lease runs out first...
    lost = claim(api, run, silent).body           # ...unless the heartbeat renews it
    assert (kept['task'], lost['task']) == (0, 1)

    taken: list[dict] = []

    def beat_and_try_to_take() -> list[dict]:
        reply = api.call('POST', f'workers/{beating}/heartbeat')
        assert reply.status == 204, reply
        reply = claim(api, run, thief)
        if reply.status == 201:
            taken.append(reply.body)
            finish(api, run, reply.body['task'])
        return taken

    wait_until(beat_and_try_to_take, 5 * lease, 'the silent worker to lose its task')
    assert [(t['task'], t['attempts']) for t in taken] == [(1, 2)]

    # A whole lease more of heartbeats: the beating worker keeps its task.
    keep_doing(beat_and_try_to_take, lease + 0.5)
    assert len(taken) == 1
    assert task_info(api, run, 0) == {'id': kept['id'], 'task': 0, 'percentCompleted': 0.0,
                                      'status': 'computing', 'attempts': 1, 'failures': 0,
                                      'message': None, 'exitCode': None}
    finish(api, run, 0)
    assert_run_complete(api, run, 2)


def test_task_whose_lease_ran_out_max_attempts_times_becomes_failed(servers):
    api = token_api(servers())
    run = create_run(api, 1, timeout=1, maxAttempts=2)
    first, second, third = register_worker(api), register_worker(api), register_worker(api)
    assert claim(api, run, first).body['attempts'] == 1
    wait_until(lambda: claim(api, run, second).status == 201, 15, 'the first lease to run out')
    assert task_info(api, run, 0)['attempts'] == 2

    def failed() -> bool:
        assert claim(api, run, third).status == 204     # never a third hand-out
        return task_info(api, run, 0)['status'] == 'failed'

    wait_until(failed, 15, 'the second lease to run out')
    assert task_info(api, run, 0)['attempts'] == 2
    info = run_info(api, run)
    assert (info['numFailed'], info['numComputing'], info['numWaiting']) == (1, 0, 0)
    assert claim(api, run, third).status == 204

    reply = api.call('POST', f'runs/{run}/restart?all=False')
    assert reply.status == 204
    again = claim(api, run, third).body
    assert (again['task'], again['attempts']) == (0, 1)
    finish(api, run, 0)
    assert_run_complete(api, run, 1)


# ---------------------------------------------------------------------------
# 3. Faults.


def test_server_killed_under_load_loses_no_task_and_gives_none_twice(database_url, servers):
    num_tasks = 1000 if is_postgresql(database_url) else 600
    alive = [servers()]
    api = token_api(alive[0])
    run = create_run(api, num_tasks)
    tally = Tally()

    def kill_and_restart_twice() -> None:
        for handed_out in (num_tasks // 3, 2 * num_tasks // 3):
            wait_until(lambda n=handed_out: len(tally.handed_out) >= n
                       or tally.stopped == LOAD_WORKERS, 30, f'{handed_out} tasks handed out')
            alive[0].stop(signal.SIGKILL)
            assert alive[0].process.returncode == -signal.SIGKILL
            alive[0] = servers(port=api.port)   # same address: workers just reconnect

    drain_in_parallel([alive[0].url] * LOAD_WORKERS, api, run, tally, seconds=60,
                      survive_drops=True, meanwhile=kill_and_restart_twice, batches=True)
    assert tally.unanswered > 0, 'the kills should have cut requests in flight'
    api.close()     # its connection went down with the first killed server

    # Every answer the workers got named a different task, and each is done.
    # A single hand-out the killed server made but never answered stays
    # computing; a batch claim repeated with its requestId got its tasks back.
    done = tasks_with_status(api, run, 'done')
    computing = tasks_with_status(api, run, 'computing')
    assert_each_handed_out_once(tally.handed_out, set(done))
    assert not set(done) & set(computing)
    assert len(computing) <= tally.unanswered
    info = run_info(api, run)
    assert (info['numDone'], info['numComputing'], info['numWaiting'], info['numFailed']) == (
        len(done), len(computing), num_tasks - len(done) - len(computing), 0)
    assert sorted(done + computing) == list(range(num_tasks)), 'a task was skipped'

    reply = api.call('POST', f'runs/{run}/restart?all=False')
    assert reply.status == 204
    after_restart = Tally()
    drain_in_parallel([alive[0].url] * 4, api, run, after_restart, seconds=30)
    assert_each_handed_out_once(after_restart.handed_out, set(computing))
    assert_run_complete(api, run, num_tasks)


# A database held under an exclusive lock by another process until a line
# arrives on its stdin.
SQLITE_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


def test_run_deleted_while_workers_take_its_tasks_is_gone_without_a_5xx(database_url, servers):
    """A delete races 32 workers claiming tasks, single or in batches: 204, and
    they see their tasks or 404, never a 5xx."""
    server = servers(workers=2)
    owner = token_api(server)
    run = create_run(owner, 10**6)
    seen: list[int] = []
    started = threading.Event()
    stop = time.monotonic() + 60

    def worker(in_batches: bool) -> None:
        api = owner.to(server.url)
        me = register_worker(api)
        path, body = f'runs/{run}/task', {'worker_uuid': me}
        if in_batches:
            path, body = f'runs/{run}/tasks/claim', {'worker_uuid': me, 'count': 20}
        while time.monotonic() < stop:
            reply = api.call('POST', path, body)
            seen.append(reply.status)
            started.set()
            if reply.status == 404:
                return
        api.close()

    threads = [threading.Thread(target=worker, args=(n % 2 == 1,)) for n in range(32)]
    for thread in threads:
        thread.start()
    assert started.wait(timeout=10)
    wait_until(lambda: len(seen) > 3000, 30, 'the workers to hand out 3000 tasks')
    assert owner.call('DELETE', f'runs/{run}').status == 204
    for thread in threads:
        thread.join(timeout=40)
        assert not thread.is_alive()
    assert set(seen) <= {200, 201, 204, 404}, sorted(set(seen))
    assert seen.count(404) == 32
    assert owner.call('GET', f'runs/{run}').status == 404


def writes(run: str, worker: str) -> list[tuple[str, str, Any]]:
    """A request on every route that writes."""
    return [
        ('POST', 'run', {'numTasks': 3}),
        ('POST', f'runs/{run}/task', {'worker_uuid': worker}),
        ('PUT', f'runs/{run}/tasks/0', {'percentCompleted': 10}),
        ('POST', f'runs/{run}/restart?all=False', None),
        ('POST', 'worker', {'uuid': uuid4().hex, 'hostname': 'h', 'pid': 1}),
        ('POST', f'workers/{worker}/heartbeat', None),
        ('DELETE', f'runs/{run}', None),
    ]


def reads(run: str) -> list[tuple[str, str, Any]]:
    """A request on every /api route that only reads."""
    return [
        ('GET', 'token', None),
        ('GET', 'runs', None),
        ('GET', f'runs/{run}', None),
        ('GET', f'runs/{run}?info=numDone', None),
        ('GET', f'runs/{run}/tasks', None),
        ('GET', f'runs/{run}/tasks/0', None),
        ('GET', 'workers', None),
    ]


def timed_call(api: Api, method: str, path: str, body: Any) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = api.call(method, path, body)
    return reply, time.monotonic() - started


def call_all_at_once(server: Any, requests: list[tuple[str, str, Any]]
                     ) -> list[tuple[str, Reply, float]]:
    """Each request on its own connection, all at the same time: (what, reply, seconds)."""
    def send(request: tuple[str, str, Any]) -> tuple[str, Reply, float]:
        return (f'{request[0]} {request[1]}', *timed_call(server_api(server), *request))

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))


def test_locked_sqlite_database_answers_503_after_the_busy_timeout(sqlite_database_url, launch):
    busy_timeout = 1
    server = launch(sqlite_database_url, env={'TASKFARM_DB_TIMEOUT': str(busy_timeout)})
    api = server_api(server)
    run = create_run(api, 5)
    worker = register_worker(api)
    assert claim(api, run, worker).status == 201

    path = sqlite_database_url[len('sqlite:///'):]
    locker = subprocess.Popen([sys.executable, '-c', SQLITE_LOCKER, path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(locker, seconds=20) == 'locked\n'
        # All writes at once, each on its own connection: each waits out the
        # busy timeout, then answers 503; none hangs, none is a 500.
        for what, reply, elapsed in call_all_at_once(server, writes(run, worker)):
            assert_unavailable(reply, what)
            assert 0.8 * busy_timeout <= elapsed < 4 * busy_timeout + 2, (what, elapsed)
        # Readers do not wait for a writer (the database is in WAL mode).
        for method, route, body in reads(run):
            reply, elapsed = timed_call(api, method, route, body)
            assert reply.status == 200, (method, route, reply)
            assert elapsed < busy_timeout, (method, route, elapsed)
        locker.stdin.write('release\n')
        locker.stdin.flush()
        assert read_line(locker, seconds=20) == 'released\n'
    finally:
        locker.kill()
        locker.wait(timeout=10)

    assert run_info(api, run)['numComputing'] == 1     # nothing written while locked
    for method, route, body in writes(run, worker):
        reply = api.call(method, route, body)
        assert reply.status in (201, 204), (method, route, reply)
    assert 'Traceback' not in ''.join(server.output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def throwaway_postgres(postgres_clusters):
    """A seeded PostgreSQL cluster of the test's own, to stop and start at will."""
    return postgres_clusters('data')


def test_database_outage_answers_503_and_the_server_recovers_by_itself(
        throwaway_postgres, launch):
    # Runs whenever initdb is there, with or without TASKFARM_TEST_DATABASE_URL:
    # it needs its own cluster anyway, and it is the only test of an outage.
    server = launch(throwaway_postgres.url, env={
        'TASKFARM_DB_TIMEOUT': '1',
        'TASKFARM_AUTH_CACHE_SECONDS': '0',     # so that every /api request needs the database
    })
    api = server_api(server)
    run = create_run(api, 5)
    worker = register_worker(api)
    assert claim(api, run, worker).body['task'] == 0

    throwaway_postgres.stop()
    # First on the open connection (its pooled database connection is dead),
    # then every route at once, twice (the pool failing to reconnect).
    assert_unavailable(api.call('GET', f'runs/{run}'), 'the open connection')
    for _ in range(2):
        for what, reply, elapsed in call_all_at_once(server, reads(run) + writes(run, worker)):
            assert_unavailable(reply, what)
            assert elapsed < 5, (what, elapsed)
    assert_unavailable(api.call('POST', f'runs/{run}/task', {'worker_uuid': worker}),
                       'the open connection, again')
    with urllib.request.urlopen(server.url + '/', timeout=HTTP_TIMEOUT) as page:
        assert page.status == 200    # the liveness page needs no database
    assert server.process.poll() is None

    throwaway_postgres.start()
    wait_until(lambda: api.call('GET', f'runs/{run}').status == 200, 30,
               'the server to serve again')
    assert claim(api, run, worker).body['task'] == 1
    finish(api, run, 1)
    info = run_info(api, run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (1, 1, 3)
    assert server.process.poll() is None
    assert 'Traceback' not in ''.join(server.output)


def test_postgresql_restarts_under_load_cost_original_workers_nothing(throwaway_postgres,
                                                                      launch):
    """PostgreSQL restarted three times (immediate mode) while the original client's
    workers, which never retry a hand-out, work: the server rides each
    restart out, so no worker dies and no task is handed out twice."""
    from taskfarm_worker import TaskFarm, TaskFarmWorker

    server = launch(throwaway_postgres.url, workers=2, env={'TASKFARM_DB_TIMEOUT': '20'})
    num_tasks, workers = 900, 8
    run = TaskFarm(server.user, server.password, numTasks=num_tasks, url_base=server.api)
    handed: list[int] = []
    errors: list[str] = []

    def original_worker() -> None:
        try:
            worker = TaskFarmWorker(server.user, server.password, run.uuid,
                                    url_base=server.api)
            for task in worker.tasks:
                handed.append(task)
                worker.update(100)
                worker.done()
        except Exception as e:     # a dead worker is what this test looks for
            errors.append(repr(e))

    threads = [threading.Thread(target=original_worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for share in (0.25, 0.5, 0.75):
        wait_until(lambda n=num_tasks * share: len(handed) >= n or errors, 60,
                   f'{share:.0%} of the tasks handed out')
        throwaway_postgres.restart('immediate')
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert errors == []
    assert_each_handed_out_once(handed, set(range(num_tasks)))
    assert (run.numDone, run.numComputing, run.numWaiting) == (num_tasks, 0, 0)
    assert 'Traceback' not in ''.join(server.output)


# ---------------------------------------------------------------------------
# 4. Input fuzzing: arbitrary bodies, paths, queries and headers on every route.

ROUTES = (
    ('GET', '/'),
    ('GET', '/api/token'),
    ('POST', '/api/run'),
    ('GET', '/api/runs'),
    ('GET', '/api/runs/{run}'),
    ('DELETE', '/api/runs/{run}'),
    ('POST', '/api/runs/{run}/restart'),
    ('GET', '/api/runs/{run}/tasks'),
    ('POST', '/api/runs/{run}/task'),
    ('GET', '/api/runs/{run}/tasks/{task}'),
    ('PUT', '/api/runs/{run}/tasks/{task}'),
    ('POST', '/api/worker'),
    ('GET', '/api/workers'),
    ('POST', '/api/workers/{worker}/heartbeat'),
)
METHODS = ('GET', 'POST', 'PUT', 'DELETE', 'PATCH')
# Stand-ins for the real run and worker uuids, filled in at request time.
PLACEHOLDERS = ('<run>', '<worker>', '<bob-run>', '<bob-worker>')
KEYS = ('numTasks', 'name', 'timeout', 'maxAttempts', 'worker_uuid', 'percentCompleted',
        'status', 'uuid', 'hostname', 'pid')
QUERY_KEYS = ('info', 'all', 'status', 'limit', 'after')
INTERESTING = (*PLACEHOLDERS, *taskfarm.STATUSES, *taskfarm.RUN_INFO, 'True', 'false', '',
               'x' * 300, '\x00', '\ud800', 0, 1, 2, 99, 100, 1000, 1001, 2**31 - 1, 2**31,
               -1, 10.0, 1e308, True, None)

names = st.sampled_from(KEYS) | st.text(max_size=12)
scalars = (st.sampled_from(INTERESTING) | st.booleans() | st.integers()
           | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8)
arbitrary_bodies = st.one_of(
    st.dictionaries(names, json_values, max_size=4).map(json.dumps).map(str.encode),
    json_values.map(json.dumps).map(str.encode),
    st.binary(max_size=40),
    st.text(max_size=40).map(str.encode),
    st.just(b''),
)
# Bodies shaped like the route's own, valid or just off the bounds, so that
# fuzzing reaches past validation into the database.
route_bodies = {
    '/api/run': st.fixed_dictionaries(
        {'numTasks': st.integers(0, 40) | st.sampled_from((2**31 - 1, 2**31))},
        optional={'name': st.text(max_size=201),
                  'timeout': st.integers(0, 3) | st.sampled_from((31536000, 31536001)),
                  'maxAttempts': st.integers(0, 3) | st.sampled_from((1000, 1001))}),
    '/api/runs/{run}/task': st.fixed_dictionaries(
        {'worker_uuid': st.just('<worker>') | st.sampled_from(PLACEHOLDERS)}),
    '/api/runs/{run}/tasks/{task}': st.fixed_dictionaries(
        {'percentCompleted': st.floats(-1, 101) | st.integers(-1, 101)},
        optional={'status': st.sampled_from((*taskfarm.STATUSES, 'running'))})
    | st.fixed_dictionaries({'status': st.sampled_from((*taskfarm.STATUSES, 'running'))}),
    '/api/worker': st.fixed_dictionaries({
        'uuid': st.text(min_size=1, max_size=65),
        'hostname': st.text(min_size=1, max_size=256),
        'pid': st.integers(-1, 2**31)}),
}
route_queries = st.sampled_from(QUERY_KEYS).flatmap(lambda key: st.tuples(st.just(key), {
    'info': st.sampled_from((*taskfarm.RUN_INFO, *taskfarm.TASK_INFO, '')),
    'all': st.sampled_from(('True', 'False', 'true', 'FALSE', 'yes', '')),
    'status': st.sampled_from((*taskfarm.STATUSES, 'running')),
    'limit': st.integers(-1, 1001).map(str),
    'after': st.integers(-2, 25).map(str)}[key]))
arbitrary_queries = st.tuples(st.sampled_from(QUERY_KEYS) | st.text(max_size=8),
                              st.sampled_from([str(v) for v in INTERESTING]) | st.text(max_size=20))
arbitrary_segments = (st.sampled_from(PLACEHOLDERS) | st.text(max_size=40)
                      | st.integers(-2**40, 2**40).map(str))
task_numbers = st.integers(-3, 25).map(str) | st.integers().map(str) | st.text(max_size=12)
odd_authorizations = (
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    | st.binary(max_size=40).map(lambda b: 'Basic ' + base64.b64encode(b).decode())
    | st.text(max_size=30).map(
        lambda s: 'Basic ' + base64.b64encode(f'tf1.{s}:'.encode()).decode()))


class FuzzRequest(NamedTuple):
    method: str
    template: str
    segments: dict[str, str]
    query: list[tuple[str, str]]
    body: bytes
    authorization: str | None   # None: alice's own


def often(draw: st.DrawFn, plausible: st.SearchStrategy, anything: st.SearchStrategy) -> Any:
    """Half the time something the route expects, else anything at all."""
    return draw(plausible if draw(st.booleans()) else anything)


@st.composite
def fuzz_requests(draw: st.DrawFn) -> FuzzRequest:
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(METHODS))
    parts = {'run': often(draw, st.just('<run>'), arbitrary_segments),
             'worker': often(draw, st.just('<worker>'), arbitrary_segments),
             'task': often(draw, st.integers(0, 19).map(str), task_numbers)}
    query = draw(st.lists(route_queries | arbitrary_queries, max_size=3))
    body = b''
    if method in ('POST', 'PUT', 'PATCH') or draw(st.integers(0, 9)) == 0:
        shaped = route_bodies.get(template)
        body = draw(arbitrary_bodies) if shaped is None else often(
            draw, shaped.map(json.dumps).map(str.encode), arbitrary_bodies)
    authorization = draw(odd_authorizations) if draw(st.integers(0, 9)) == 0 else None
    return FuzzRequest(method, template, parts, query, body, authorization)


class FuzzTarget:
    """Alice's run and worker, and bob's, which the fuzzing must never change."""

    def __init__(self, alice: webtest.TestApp, bob: webtest.TestApp) -> None:
        self.alice, self.bob = alice, bob
        self.names = {'<bob-run>': bob.post_json('/api/run', {'numTasks': 7}).json['uuid'],
                      '<bob-worker>': 'bob-worker', '<worker>': 'alice-worker'}
        bob.post_json('/api/worker', {'uuid': 'bob-worker', 'hostname': 'b', 'pid': 1})
        alice.post_json('/api/worker', {'uuid': 'alice-worker', 'hostname': 'a', 'pid': 1})
        self.bob_run = self.bob_view()
        self.ensure_run()

    def bob_view(self) -> tuple:
        run = self.names['<bob-run>']
        return (self.bob.get(f'/api/runs/{run}').json,
                self.bob.get(f'/api/runs/{run}/tasks').json)

    def ensure_run(self) -> None:
        """A fresh run for alice if the fuzzing deleted hers."""
        run = self.names.get('<run>')
        if run is None or self.alice.get(f'/api/runs/{run}', expect_errors=True).status_int == 404:
            self.names['<run>'] = self.alice.post_json(
                '/api/run', {'numTasks': 20, 'timeout': 3600, 'maxAttempts': 3}).json['uuid']

    def fill(self, text: str) -> str:
        for placeholder, value in self.names.items():
            text = text.replace(placeholder, value)
        return text

    def send(self, request: FuzzRequest) -> webtest.TestResponse:
        # Lone surrogates go out as the invalid UTF-8 they would be on the wire.
        parts = {key: urllib.parse.quote(self.fill(value), safe='', errors='surrogatepass')
                 for key, value in request.segments.items()}
        url = request.template.format(**parts)
        query = [(key, self.fill(value)) for key, value in request.query]
        if query:
            url += '?' + urllib.parse.urlencode(query, errors='surrogatepass')
        headers = {'Content-Type': 'application/json'}
        if request.authorization is not None:
            headers['Authorization'] = request.authorization
        body = request.body
        for placeholder, value in self.names.items():
            body = body.replace(placeholder.encode(), value.encode())
        return self.alice.request(url, method=request.method, body=body, headers=headers,
                                  expect_errors=True)

    def assert_consistent(self) -> None:
        for run in self.alice.get('/api/runs').json['data']:
            assert_counts_add_up(self.alice.get(f"/api/runs/{run['uuid']}").json)
        assert self.bob_view() == self.bob_run


@pytest.fixture
def fuzz_target(alice: webtest.TestApp, bob: webtest.TestApp) -> FuzzTarget:
    """One app and database for all the examples, as a real server would see them."""
    return FuzzTarget(alice, bob)


@settings(max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fuzzed=fuzz_requests())
def test_arbitrary_input_on_every_route_never_gets_a_5xx_nor_breaks_the_counts(
        fuzz_target: FuzzTarget, fuzzed: FuzzRequest):
    fuzz_target.ensure_run()
    response = fuzz_target.send(fuzzed)
    event(f'{fuzzed.method} {fuzzed.template} -> {response.status_int}')
    assert response.status_int < 500, (fuzzed, response.status, response.text)
    if response.status_int >= 400:
        assert response.content_type == 'application/json', (fuzzed, response.text)
        assert response.json['title'], (fuzzed, response.text)
    fuzz_target.assert_consistent()


# ---------------------------------------------------------------------------
# 5. Security.


@pytest.fixture
def strict_app(tf_store: store.Store, config: taskfarm.Config):
    """No auth cache: a revoked token or user stops working at once."""
    return taskfarm.create_app(tf_store, dataclasses.replace(config, auth_cache_seconds=0))


def client_as(app: Any, user: str, password: str = '') -> webtest.TestApp:
    client = webtest.TestApp(app)
    client.authorization = ('Basic', (user, password))
    return client


def assert_refused(client: webtest.TestApp, why: str) -> None:
    response = client.get('/api/runs', expect_errors=True)
    assert response.status_int == 401, (why, response.status)
    assert response.headers['WWW-Authenticate'] == 'Basic realm="taskfarm"', why
    assert response.json['title'], why


def assert_accepted(client: webtest.TestApp) -> None:
    assert client.get('/api/runs').status_int == 200


def user_row(db: store.Database, name: str) -> dict:
    return db.one('SELECT id, token_stamp FROM users WHERE username = :name', {'name': name})


def token_of(app: Any, user: str, password: str) -> str:
    return client_as(app, user, password).get('/api/token').json['token']


def test_tampered_tokens_get_401(strict_app, db, passwords):
    token = token_of(strict_app, 'alice', passwords['alice'])
    assert_accepted(client_as(strict_app, token))
    payload, _, signature = token.rpartition('.')
    version, user_id, expires, stamp = payload.split('.')
    flipped = ('A' if signature[0] != 'A' else 'B') + signature[1:]
    tampered = {
        'signature changed': f'{payload}.{flipped}',
        'signature cut short': token[:-4],
        'signature missing': payload,
        'user changed to root': f"{version}.{user_row(db, 'root')['id']}.{expires}.{stamp}."
                                f'{signature}',
        'expiry moved later': f'{version}.{user_id}.{int(expires) + 10**6}.{stamp}.{signature}',
        'signed with another secret': taskfarm.issue_token(
            b'not-the-secret', user_row(db, 'alice'), 3600),
    }
    for why, forged in tampered.items():
        assert_refused(client_as(strict_app, forged), why)


def test_expired_token_gets_401(strict_app, db, config):
    alice = user_row(db, 'alice')
    secret = config.secret.encode()
    assert_accepted(client_as(strict_app, taskfarm.issue_token(secret, alice, 60)))
    expired = taskfarm.issue_token(secret, alice, -1)
    assert_refused(client_as(strict_app, expired), 'expired a second ago')


def test_token_and_password_of_a_deleted_user_get_401(strict_app, database_url, monkeypatch):
    monkeypatch.setenv('DATABASE_URL', database_url)
    admin.main(['adduser', 'carol', '--password', 'carol-pw'])
    token = token_of(strict_app, 'carol', 'carol-pw')
    client_as(strict_app, token).post_json('/api/run', {'numTasks': 3}, status=201)

    admin.main(['deluser', 'carol', '--with-runs'])
    assert_refused(client_as(strict_app, token), 'token of a deleted user')
    assert_refused(client_as(strict_app, 'carol', 'carol-pw'), 'password of a deleted user')


def test_token_issued_before_a_password_change_gets_401(strict_app, database_url, monkeypatch,
                                                        passwords):
    token = token_of(strict_app, 'alice', passwords['alice'])
    assert_accepted(client_as(strict_app, token))

    monkeypatch.setenv('DATABASE_URL', database_url)
    admin.main(['passwd', 'alice', '--password', 'new-pw'])
    assert_refused(client_as(strict_app, token), 'token from before the change')
    assert_refused(client_as(strict_app, 'alice', passwords['alice']), 'old password')
    assert_accepted(client_as(strict_app, 'alice', 'new-pw'))
    assert_accepted(client_as(strict_app, token_of(strict_app, 'alice', 'new-pw')))


def test_user_cannot_touch_another_users_run_or_worker_but_admin_sees_them(alice, bob, root):
    run = alice.post_json('/api/run', {'numTasks': 3, 'timeout': 600}).json['uuid']
    alice.post_json('/api/worker', {'uuid': 'alice-w', 'hostname': 'a', 'pid': 1})
    bob.post_json('/api/worker', {'uuid': 'bob-w', 'hostname': 'b', 'pid': 2})
    alice.post_json(f'/api/runs/{run}/task', {'worker_uuid': 'alice-w'}, status=201)
    before = alice.get(f'/api/runs/{run}').json

    attempts = [
        ('GET', f'/api/runs/{run}', None),
        ('GET', f'/api/runs/{run}?info=numComputing', None),
        ('GET', f'/api/runs/{run}/tasks', None),
        ('GET', f'/api/runs/{run}/tasks/0', None),
        ('PUT', f'/api/runs/{run}/tasks/0', {'status': 'done', 'percentCompleted': 100}),
        ('PUT', f'/api/runs/{run}/tasks/1', {'status': 'failed'}),
        ('POST', f'/api/runs/{run}/task', {'worker_uuid': 'bob-w'}),
        ('POST', f'/api/runs/{run}/task', {'worker_uuid': 'alice-w'}),
        ('POST', f'/api/runs/{run}/restart?all=True', None),
        ('DELETE', f'/api/runs/{run}', None),
        ('POST', '/api/workers/alice-w/heartbeat', None),
    ]
    for method, path, body in attempts:
        response = bob.request(path, method=method, expect_errors=True,
                               body=json.dumps(body).encode() if body else b'',
                               headers={'Content-Type': 'application/json'})
        assert response.status_int == 404, (method, path, response.status)
    assert run not in [r['uuid'] for r in bob.get('/api/runs').json['data']]
    assert [w['uuid'] for w in bob.get('/api/workers').json['data']] == ['bob-w']
    bob.post_json('/api/worker', {'uuid': 'alice-w', 'hostname': 'a', 'pid': 1}, status=409)

    assert alice.get(f'/api/runs/{run}').json == before
    assert alice.get(f'/api/runs/{run}/tasks/0').json['status'] == 'computing'
    assert run in [r['uuid'] for r in root.get('/api/runs').json['data']]
    assert root.get(f'/api/runs/{run}').json == before
    assert [t['worker']['uuid'] for t in root.get(f'/api/runs/{run}/tasks').json['data']] == [
        'alice-w']
    assert {'alice-w', 'bob-w'} <= {w['uuid'] for w in root.get('/api/workers').json['data']}


def test_server_refuses_to_start_without_a_secret(uninitialised_database_url):
    env = {key: value for key, value in os.environ.items() if key != 'TASKFARM_SECRET'}
    env['DATABASE_URL'] = uninitialised_database_url
    done = subprocess.run([sys.executable, str(REPO / 'taskfarm.py'), '--host', '127.0.0.1',
                           '--port', '0'], env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 1
    assert 'init-db' in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr    # one clear line

    config = taskfarm.Config(database_url=uninitialised_database_url, secret=None)
    tf = taskfarm.open_store(config)
    try:
        with pytest.raises(taskfarm.ConfigError, match='init-db'):
            taskfarm.create_app(tf, config)
    finally:
        tf.close()


# ---------------------------------------------------------------------------
# 5. Everything at once: workers and a server SIGKILLed, PostgreSQL restarted.

ORIGINAL_WORKER = """
import sys
from taskfarm_worker import TaskFarmWorker
url, user, password, run = sys.argv[1:5]
worker = TaskFarmWorker(user, password, run, url_base=url)
for task in worker.tasks:
    worker.update(100)
    worker.done()
"""


def test_workers_and_a_server_killed_and_postgresql_restarted_leave_nothing_behind(
        throwaway_postgres, launch):
    """A dozen `taskfarm work` workers (some SIGKILLed every few seconds and
    replaced) and a few original-client workers on a run with a 6 s lease,
    on two servers; one server is SIGKILLed and restarted, PostgreSQL is
    restarted in immediate mode. The run finishes with every task done once
    more than its lost leases, nothing computing, no original worker dead,
    and only killed workers' leases ever running out."""
    env = {'TASKFARM_DB_TIMEOUT': '20'}
    steady, shaky = launch(throwaway_postgres.url, env=env), launch(throwaway_postgres.url, env=env)
    api = token_api(steady)
    num_tasks = 1500
    # The lease outlasts the killed server's restart (1.4 s on a busy 2-core
    # machine) and the clients' backoff of 0.25, 0.5, 1, 2 s: with 3 s, a
    # worker of that server that had just claimed or sent its last heartbeat
    # (every lease/3) was sometimes not back in time (5 runs in 14 here).
    run = create_run(api, num_tasks, timeout=6)
    worker_env = {**os.environ, 'TASKFARM_USER': steady.user,
                  'TASKFARM_PASSWORD': steady.password, 'TASKFARM_RETRY_SECONDS': '60'}

    def taskfarm_work(server: Any) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(REPO / 'taskfarm_client.py'), 'work', run, '-j', '2',
             '--', 'sleep', '0.05'],
            env={**worker_env, 'TASKFARM_URL': server.url}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    workers = [taskfarm_work(steady if n % 2 else shaky) for n in range(12)]
    originals = [subprocess.Popen(
        [sys.executable, '-c', ORIGINAL_WORKER, steady.api, steady.user, steady.password, run],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(3)]
    killed: list[int] = []

    def done() -> int:
        return run_info(api, run)['numDone']

    def kill_a_worker() -> None:
        victim = workers.pop(0)
        victim.kill()
        victim.wait(timeout=10)
        killed.append(victim.pid)
        workers.append(taskfarm_work(steady if len(killed) % 2 else shaky))

    for step, share in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)):
        wait_until(lambda n=num_tasks * share: done() >= n, 90, f'{share:.0%} done')
        kill_a_worker()
        if step == 2:
            shaky.stop(signal.SIGKILL)
            shaky = launch(throwaway_postgres.url, env=env, port=urllib.parse.urlsplit(
                shaky.url).port)
        if step == 4:
            throwaway_postgres.restart('immediate')
    wait_until(lambda: done() == num_tasks, 120, 'every task done')
    for process in workers + originals:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    info = run_info(api, run)
    assert (info['numDone'], info['numComputing'], info['numWaiting'], info['numFailed']) == (
        num_tasks, 0, 0, 0)
    # Leases run out only for killed workers' tasks: no live worker was ever
    # handed a task it did not know it had (its heartbeats would keep it).
    pids = {w['uuid']: w['pid'] for w in api.call('GET', 'workers').body['data']}
    retried = [task for task in tasks_with_status(api, run, 'done')
               if task_info(api, run, task)['attempts'] > 1]
    lost = [attempt for task in retried
            for attempt in api.call('GET', f'runs/{run}/tasks/{task}/attempts').body['data']]
    assert len(lost) == sum(task_info(api, run, task)['attempts'] - 1 for task in retried)
    assert {attempt['outcome'] for attempt in lost} <= {'lease expired'}
    assert {pids[attempt['worker']['uuid']] for attempt in lost} <= set(killed)
    figure = (f'{num_tasks} tasks, {len(killed)} workers killed, one server killed, '
              f'PostgreSQL restarted: {len(lost)} leases ran out, all of killed workers; '
              f'0 left computing, 0 original workers dead')
    print('\n' + figure)
