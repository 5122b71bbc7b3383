"""Tests of the `taskfarm` command and the client API, against a live server.

Every test talks to a real waitress server over sockets (the `live_server`
fixture of conftest.py). The command runs as a subprocess, as a user runs
it. Tests synchronise on files and fifos that the commands write, and poll
conditions with a deadline; every subprocess call has a timeout.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pty
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import pytest

from taskfarm_client import (
    AuthError,
    Client,
    NotFound,
    TaskFarm,
    TaskFarmWorker,
    Unreachable,
    Worker,
    WorkPool,
    parse_duration,
    parse_moment,
    parse_progress,
    task_command,
    tfRuns,
)

CLIENT = Path(__file__).resolve().with_name('taskfarm_client.py')
COMMAND_TIMEOUT = 60      # seconds any one `taskfarm` call may take
BIG_RUN_TIMEOUT = 180     # the 100-task run on a small, shared machine
UNKNOWN_RUN = '0123456789abcdef0123456789abcdef'


# ---------------------------------------------------------------------------
# Helpers


def cli_env(server, **extra: str) -> dict[str, str]:
    env = {**os.environ, 'TASKFARM_URL': server.url, 'TASKFARM_USER': server.user,
           'TASKFARM_PASSWORD': server.password, 'TASKFARM_RETRY_SECONDS': '5'}
    env.update(extra)
    return env


def taskfarm(server, *args: str, env: dict | None = None,
             timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `taskfarm ARGS` to its end."""
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], check=False, env=env or cli_env(server),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> object:
    """Poll `condition` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.05)    # polling interval, bounded by the deadline


def finish(process: subprocess.Popen, timeout: float = COMMAND_TIMEOUT) -> tuple[str, str]:
    """Wait for a started `taskfarm`; its stdout and stderr."""
    return process.communicate(timeout=timeout)


def one_line(stderr: str) -> str:
    """The single line a failing command must print, without a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert 'Traceback' not in stderr
    return lines[0]


def open_for_writing(fifo: Path, timeout: float = 30) -> int:
    """Open a fifo once a command has it open for reading (no blocking)."""
    def try_open() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:    # ENXIO: no reader yet
                raise
            return None
    return wait_for(try_open, f'a reader on {fifo}', timeout)


def release(fifo: Path) -> None:
    """Let a command blocked on `read < fifo` go on."""
    fd = open_for_writing(fifo)
    try:
        os.write(fd, b'go\n')
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def client(live_server) -> Client:
    return Client(live_server.url, live_server.user, live_server.password)


@pytest.fixture
def spawn(live_server):
    """Start `taskfarm ARGS` in the background; stopped at the end if still running."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict | None = None,
              stdout: IO | int = subprocess.PIPE) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, str(CLIENT), *args], env=env or cli_env(live_server),
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
            text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()     # a worker stops its commands on SIGTERM
            try:
                process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=10)


# ---------------------------------------------------------------------------
# `taskfarm work`


def test_three_workers_of_two_slots_run_each_of_100_tasks_once(
        live_server, client, spawn, tmp_path):
    run = taskfarm(live_server, 'create', '100', '--timeout', '60').stdout.strip()
    out = tmp_path / 'out.txt'
    # O_APPEND writes of one short line are atomic, so lines never mix.
    command = ['sh', '-c', f'echo "{{}} $TASKFARM_TASK $TASKFARM_RUN" >> {out}']
    workers = [spawn('work', run, '-j', '2', '--', *command) for _ in range(3)]

    for worker in workers:
        _, stderr = finish(worker, BIG_RUN_TIMEOUT)
        assert worker.returncode == 0, stderr

    lines = out.read_text().splitlines()
    counts = Counter(int(line.split()[0]) for line in lines)
    assert counts == Counter(range(100))          # each task exactly once
    assert all(line.split()[1:] == [line.split()[0], run] for line in lines)
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (100, 0, 0)
    assert info['percentDone'] == 100
    tasks = list(client.iter_tasks(run))
    assert [task['attempts'] for task in tasks] == [1] * 100


def test_failing_command_leaves_task_failed_and_shows_its_stderr(
        live_server, client):
    run = client.create_run(1)['uuid']
    command = ['sh', '-c', 'echo preparing; echo "disk full on task {}" >&2; exit 3']

    result = taskfarm(live_server, 'work', run, '--', *command)

    assert result.returncode == 1
    assert 'task 0 failed (exit status 3)' in result.stderr
    assert 'disk full on task 0' in result.stderr
    assert 'preparing' in result.stdout        # stdout passes through
    assert client.task_info(run, 0, 'status') == 'failed'
    assert client.run_info(run, 'numFailed') == 1


def test_failed_task_is_not_handed_out_again_until_restart(live_server, client):
    run = client.create_run(2)['uuid']
    taskfarm(live_server, 'work', run, '--', 'sh', '-c', 'exit {}')   # task 1 fails
    assert client.task_info(run, 1, 'status') == 'failed'

    again = taskfarm(live_server, 'work', run, '--', 'true')
    assert again.returncode == 0
    assert client.task_info(run, 1, 'status') == 'failed'

    assert taskfarm(live_server, 'restart', run).returncode == 0
    assert taskfarm(live_server, 'work', run, '--', 'true').returncode == 0
    assert client.run_info(run, 'numDone') == 2


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_stopped_worker_puts_its_task_back_for_another_worker(
        live_server, client, spawn, tmp_path, sig):
    run = client.create_run(1)['uuid']
    started, gate, done = tmp_path / 'started', tmp_path / 'gate', tmp_path / 'done'
    os.mkfifo(gate)
    # Record the command's pid, then block until the gate opens (it never does).
    blocking = f'echo $$ > {started}.tmp && mv {started}.tmp {started}; read x < {gate}'
    first = spawn('work', run, '--', 'sh', '-c', blocking)
    wait_for(started.exists, 'the first command to start')
    command_pid = int(started.read_text())

    first.send_signal(sig)
    _, stderr = finish(first)

    assert first.returncode == 128 + sig
    assert 'put back to waiting' in stderr
    assert not pid_alive(command_pid)          # its command was stopped too
    assert client.task_info(run, 0, 'status') == 'waiting'

    second = taskfarm(live_server, 'work', run, '--', 'sh', '-c', f'echo {{}} >> {done}')
    assert second.returncode == 0, second.stderr
    assert done.read_text() == '0\n'
    assert client.run_info(run, 'numDone') == 1


def test_stopped_worker_with_two_slots_puts_both_tasks_back(
        live_server, client, spawn, tmp_path):
    run = client.create_run(5)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    blocking = f'touch {tmp_path}/started.{{}}; read x < {gate}'
    worker = spawn('work', run, '-j', '2', '--', 'sh', '-c', blocking)
    wait_for(lambda: len(list(tmp_path.glob('started.*'))) == 2, 'two commands to start')

    worker.terminate()
    finish(worker)

    assert worker.returncode == 128 + signal.SIGTERM
    info = client.run_info(run)
    assert (info['numWaiting'], info['numComputing']) == (5, 0)


def test_progress_lines_set_percent_completed(live_server, client, spawn, tmp_path):
    run = client.create_run(1)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    command = f'echo TASKFARM_PROGRESS 40; read x < {gate}'
    worker = spawn('work', run, '--', 'sh', '-c', command)

    wait_for(lambda: client.task_info(run, 0, 'percentCompleted') == 40,
             'percentCompleted 40')
    assert client.task_info(run, 0, 'status') == 'computing'
    release(gate)
    _, stderr = finish(worker)

    assert worker.returncode == 0, stderr
    assert client.task_info(run, 0) | {'id': None} == {
        'id': None, 'task': 0, 'percentCompleted': 100.0, 'status': 'done', 'attempts': 1,
        'failures': 0, 'message': None, 'exitCode': None}


def test_command_that_cannot_start_puts_the_task_back(live_server, client, tmp_path):
    run = client.create_run(3)['uuid']
    result = taskfarm(live_server, 'work', run, '--', str(tmp_path / 'no-such-command'))
    assert result.returncode == 1
    assert 'cannot run' in result.stderr
    assert client.run_info(run, 'numWaiting') == 3


def test_worker_sends_heartbeats_while_its_command_runs(live_server, client, spawn, tmp_path):
    run = client.create_run(1)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    worker = spawn('work', run, '--heartbeat', '0.5', '--', 'sh', '-c', f'read x < {gate}')

    holders = wait_for(lambda: [w for w in client.workers() if w['numComputing'] == 1],
                       'the worker to hold its task')
    uuid, first_seen = holders[0]['uuid'], holders[0]['lastSeen']
    wait_for(lambda: any(w['uuid'] == uuid and w['lastSeen'] > first_seen
                         for w in client.workers()), 'a heartbeat')
    release(gate)
    finish(worker)
    assert worker.returncode == 0


def test_worker_started_while_the_server_is_down_waits_for_it(servers, tmp_path):
    first = servers()
    client = Client(first.url, first.user, first.password)
    run = client.create_run(3)['uuid']
    port = int(first.url.rsplit(':', 1)[1])
    first.stop()

    worker = subprocess.Popen(
        [sys.executable, str(CLIENT), 'work', run, '--', 'true'],
        env=cli_env(first, TASKFARM_RETRY_SECONDS='60'), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        servers(port=port)       # the same database, back on the same port
        _, stderr = finish(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=10)

    assert worker.returncode == 0, stderr
    assert client.run_info(run, 'numDone') == 3


def test_work_needs_a_command(live_server):
    result = taskfarm(live_server, 'work', UNKNOWN_RUN)
    assert result.returncode == 2
    assert 'give the command' in result.stderr


def test_task_command_replaces_braces_with_the_task_number():
    assert task_command(['./run', '{}', 'in/{}.dat', '-x'], 7) == ['./run', '7', 'in/7.dat', '-x']


@pytest.mark.parametrize('line, percent', [
    ('TASKFARM_PROGRESS 40\n', 40.0), ('TASKFARM_PROGRESS 12.5', 12.5),
    ('TASKFARM_PROGRESS 101', None), ('TASKFARM_PROGRESS x', None),
    ('progress 40', None), ('TASKFARM_PROGRESS 40 50', None)])
def test_parse_progress(line, percent):
    assert parse_progress(line) == percent


def test_work_pool_runs_in_process(client, tmp_path, capsys):
    run = client.create_run(4)['uuid']
    pool = WorkPool(client, run, ['sh', '-c', 'echo {}'], slots=2)
    assert pool.run() == 0
    assert sorted(capsys.readouterr().out.split()) == ['0', '1', '2', '3']
    assert client.run_info(run, 'numDone') == 4


# ---------------------------------------------------------------------------
# Lost answers, workers that stay to the end, heartbeats (issue 10)


class AnswerDroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server that lets the first
    hand-out request through and closes the connection instead of passing
    its answer on, as a server killed right after its commit would."""

    HANDOUT = re.compile(rb'^POST /api/runs/\w+/(?:task|tasks/claim) HTTP/')

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix('http://').split(':')
        self.upstream = (host, int(port))
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.dropped = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=30)
            doomed = threading.Event()   # this connection's next answer is dropped
            threading.Thread(target=self._requests, args=(client, server, doomed),
                             daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, doomed),
                             daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket,
                  doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self.dropped == 0 and self.HANDOUT.match(data):
                        doomed.set()
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _answers(self, server: socket.socket, client: socket.socket,
                 doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if doomed.is_set():   # the server answered: it committed
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def dropping_proxy(live_server):
    proxy = AnswerDroppingProxy(live_server.url)
    yield proxy
    proxy.close()


def test_claim_whose_answer_is_lost_is_retried_and_strands_no_task(
        live_server, client, dropping_proxy, tmp_path):
    run = client.create_run(4, timeout=60)['uuid']
    out = tmp_path / 'out.txt'
    result = taskfarm(live_server, 'work', run, '-j', '1', '--',
                      'sh', '-c', f'echo {{}} >> {out}',
                      env=cli_env(live_server, TASKFARM_URL=dropping_proxy.url))

    assert result.returncode == 0, result.stderr
    assert dropping_proxy.dropped == 1
    assert sorted(out.read_text().split()) == ['0', '1', '2', '3']
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (4, 0, 0)
    assert [task['attempts'] for task in client.iter_tasks(run)] == [1, 1, 1, 1]


def test_original_style_worker_retries_a_lost_single_handout(live_server, dropping_proxy):
    user, password = live_server.user, live_server.password
    tf = TaskFarm(user, password, numTasks=3, url_base=live_server.api)
    worker = TaskFarmWorker(user, password, tf.uuid, url_base=dropping_proxy.url + '/api/')
    seen = []
    for task in worker.tasks:
        seen.append(task)
        worker.update(100)
        worker.done()
    assert dropping_proxy.dropped == 1
    assert seen == [0, 1, 2]                 # the lost hand-out's task, not a second one
    assert (tf.numDone, tf.numComputing) == (3, 0)


def test_worker_stays_until_a_killed_workers_task_comes_back(
        live_server, client, spawn, tmp_path):
    run = client.create_run(6, timeout=2)['uuid']
    out, pid_file = tmp_path / 'out.txt', tmp_path / 'pid'
    # Task 0 hangs the first time (the worker about to be killed); after that it runs.
    command = (f'if [ {{}} = 0 ] && [ ! -e {tmp_path}/claimed ]; then touch {tmp_path}/claimed; '
               f'echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; sleep 600; fi; '
               f'echo {{}} >> {out}')
    doomed = spawn('work', run, '--', 'sh', '-c', command)
    wait_for(pid_file.exists, 'the first worker to start task 0')
    survivor = spawn('work', run, '--', 'sh', '-c', command)
    wait_for(lambda: out.exists() and len(out.read_text().split()) == 5,
             'the second worker to do the other five tasks')
    assert survivor.poll() is None             # it waits: task 0 may come back

    doomed.kill()
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)   # its command, in its own session
    _, stderr = finish(survivor)

    assert survivor.returncode == 0, stderr
    assert sorted(out.read_text().split()) == ['0', '1', '2', '3', '4', '5']
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing']) == (6, 0)
    assert client.task_info(run, 0, 'attempts') == 2


def test_exit_when_idle_leaves_while_other_tasks_compute(live_server, client):
    run = client.create_run(2, timeout=60)['uuid']
    client.register_worker('other', 'node9', 9)
    client.claim_task(run, 'other')            # task 0, computing elsewhere
    result = taskfarm(live_server, 'work', run, '--exit-when-idle', '--', 'true')
    assert result.returncode == 0, result.stderr
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing']) == (1, 1)


def test_heartbeats_renew_only_the_tasks_the_worker_runs(
        live_server, client, spawn, tmp_path):
    run = client.create_run(3, timeout=2)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    worker = spawn('work', run, '--', 'sh', '-c', f'if [ {{}} = 0 ]; then read x < {gate}; fi')
    holder = wait_for(lambda: [w for w in client.workers() if w['numComputing'] == 1],
                      'the worker to run task 0')[0]['uuid']
    # A task handed to the worker that it does not know of, as after a lost answer.
    ghost = client.claim_task(run, holder)['task']
    client.register_worker('w2', 'node2', 2)
    assert client.claim_task(run, 'w2')['task'] == 2

    # The worker's heartbeats keep task 0, not the ghost: its lease runs out.
    taken = wait_for(lambda: client.claim_task(run, 'w2'), 'the ghost task to come back')
    assert taken['task'] == ghost == 1
    assert client.task_info(run, 0, 'status') == 'computing'

    release(gate)        # the worker goes on, and takes w2's tasks when their leases end
    _, stderr = finish(worker)
    assert worker.returncode == 0, stderr
    assert client.run_info(run, 'numDone') == 3


def test_python_worker_waits_for_a_task_whose_lease_runs_out(live_server, client):
    run = client.create_run(2, timeout=2)['uuid']
    user, password = live_server.user, live_server.password
    original = TaskFarmWorker(user, password, run, url_base=live_server.api)
    ours = Worker(user, password, run, url_base=live_server.api)
    client.register_worker('gone', 'node9', 9)
    client.claim_task(run, 'gone')             # task 0: its worker never comes back

    def work_through(worker: Worker) -> list[int]:
        seen = []
        for task in worker.tasks:
            seen.append(task)
            worker.update(100)
            worker.done()
        return seen

    # The original stops when nothing waits; ours waits for task 0's lease to run out.
    assert work_through(original) == [1]
    assert work_through(ours) == [0]
    assert client.run_info(run, 'numDone') == 2


# ---------------------------------------------------------------------------
# Batches (issue 11)


def test_client_claims_and_reports_in_batches(live_server, client):
    run = client.create_run(5)['uuid']
    client.register_worker('w1', 'node1', 1)
    first = client.claim_tasks(run, 'w1', 3, request_id='c1')
    assert [task['task'] for task in first['data']] == [0, 1, 2]
    assert 'updates' not in first
    # The same request id again (its answer was lost): the same tasks, no more.
    assert [task['task'] for task in client.claim_tasks(run, 'w1', 3, request_id='c1')['data']
            ] == [0, 1, 2]

    second = client.claim_tasks(run, 'w1', 5, updates=[
        {'task': 0, 'status': 'done', 'percentCompleted': 100},
        {'task': 1, 'status': 'failed', 'exitCode': 2, 'message': 'no input file'}])
    assert [task['task'] for task in second['data']] == [3, 4]
    assert second['updates'] == [{'task': 0, 'result': 'ok'}, {'task': 1, 'result': 'ok'}]
    assert client.report(run, 'w1', [{'task': 2, 'status': 'done'}, {'task': 9, 'status': 'done'}]
                         ) == [{'task': 2, 'result': 'ok'}, {'task': 9, 'result': 'unknown task'}]
    assert client.task_info(run, 1) | {'id': None} == {
        'id': None, 'task': 1, 'percentCompleted': 0.0, 'status': 'failed', 'attempts': 1,
        'failures': 1, 'message': 'no input file', 'exitCode': 2}


def short_then_long(tmp_path: Path, gate: Path, long_task: int) -> list[str]:
    """A command: quick for every task but `long_task`, which waits on `gate`."""
    return ['sh', '-c', f'if [ {{}} = {long_task} ]; then touch {tmp_path}/long; '
                        f'read x < {gate}; fi; echo {{}} >> {tmp_path}/out']


def test_short_tasks_are_claimed_ahead_and_given_back_when_a_long_one_holds_them(
        live_server, client, spawn, tmp_path):
    run = client.create_run(20, timeout=60)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    worker = spawn('work', run, '-j', '1', '--', *short_then_long(tmp_path, gate, 5))
    wait_for((tmp_path / 'long').exists, 'the long task to start')
    # Tasks 0 to 4 took no time: the worker claimed the rest ahead...
    assert client.run_info(run, 'numWaiting') == 0
    # ...and, as they wait on the long one, it gives them back to other workers.
    wait_for(lambda: client.run_info(run)['numComputing'] == 1, 'the waiting tasks to go back')
    info = client.run_info(run)
    assert (info['numDone'], info['numWaiting']) == (5, 14)

    release(gate)
    _, stderr = finish(worker)
    assert worker.returncode == 0, stderr
    assert Counter((tmp_path / 'out').read_text().split()) == Counter(map(str, range(20)))
    assert client.run_info(run, 'numDone') == 20


def test_sigterm_puts_back_running_and_claimed_ahead_tasks(
        live_server, client, spawn, tmp_path):
    run = client.create_run(20, timeout=60)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    worker = spawn('work', run, '-j', '1', '--', *short_then_long(tmp_path, gate, 5))
    wait_for((tmp_path / 'long').exists, 'the long task to start')
    assert client.run_info(run, 'numWaiting') == 0     # 6 to 19 claimed ahead

    worker.terminate()
    _, stderr = finish(worker)

    assert worker.returncode == 128 + signal.SIGTERM, stderr
    assert '15 task(s) put back to waiting' in stderr
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (5, 0, 15)


# ---------------------------------------------------------------------------
# Failures, retries, time limits, chosen restarts (issue 12)


def test_task_failing_twice_under_two_retries_ends_done_with_its_attempts_kept(
        live_server, client, tmp_path):
    run = taskfarm(live_server, 'create', '1', '--retries', '2').stdout.strip()
    count = tmp_path / 'count'
    command = (f'n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}; '
               'if [ "$n" -lt 2 ]; then echo "setting up"; echo "boom $n" >&2; exit 3; fi')

    result = taskfarm(live_server, 'work', run, '--', 'sh', '-c', command)

    assert result.returncode == 0, result.stderr        # nothing failed for good
    assert result.stderr.count('task 0 failed (exit status 3), to be retried') == 2
    task = client.task_info(run, 0)
    assert (task['status'], task['failures'], task['attempts']) == ('done', 2, 3)
    attempts = client.attempts(run, 0)
    assert [(a['attempt'], a['outcome'], a['exitCode'], a['message']) for a in attempts] == [
        (1, 'failed', 3, 'boom 0\n'), (2, 'failed', 3, 'boom 1\n')]
    shown = taskfarm(live_server, 'show', run, '0')
    assert shown.returncode == 0, shown.stderr
    assert re.search(r'^status\s+done$', shown.stdout, re.M)
    assert shown.stdout.count('failed, exit code 3') == 2
    assert '  | boom 0\n' in shown.stdout and '  | boom 1\n' in shown.stdout


def test_final_exit_code_fails_a_task_at_once_whatever_the_retries(live_server, client):
    run = taskfarm(live_server, 'create', '1', '--retries', '5').stdout.strip()
    result = taskfarm(live_server, 'work', run, '--final-exit', '2,42', '--',
                      'sh', '-c', 'echo "unrecoverable" >&2; exit 42')
    assert result.returncode == 1
    assert 'task 0 failed (exit status 42);' in result.stderr
    task = client.task_info(run, 0)
    assert (task['status'], task['failures'], task['exitCode'], task['message']) == (
        'failed', 1, 42, 'unrecoverable\n')


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie left (it has ended)."""
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == 'Z'


def test_time_limit_stops_the_command_and_its_children(live_server, client, tmp_path):
    run = client.create_run(1)['uuid']
    child = tmp_path / 'child'
    command = f'echo "started" >&2; sleep 300 & echo $! > {child}; wait'

    result = taskfarm(live_server, 'work', run, '--time-limit', '1s', '--', 'sh', '-c', command)

    assert result.returncode == 1
    assert 'task 0 failed (stopped at the time limit of 1s (--time-limit))' in result.stderr
    wait_for(lambda: process_gone(int(child.read_text())), "the command's child to end")
    task = client.task_info(run, 0)
    assert (task['status'], task['exitCode']) == ('failed', -signal.SIGTERM)
    assert task['message'] == ('taskfarm: stopped at the time limit of 1s (--time-limit)\n'
                               'started\n')


def test_max_failures_stops_the_run_and_a_restart_resumes_it(live_server, client):
    run = taskfarm(live_server, 'create', '300', '--max-failures', '2').stdout.strip()
    result = taskfarm(live_server, 'work', run, '--', 'sh', '-c', '[ {} -ge 2 ]')
    assert result.returncode == 1
    assert 'is stopped: 2 tasks failed' in result.stderr
    info = client.run_info(run)
    assert (info['stopped'], info['numFailed'], info['numComputing']) == (True, 2, 0)
    assert info['numWaiting'] > 0          # never handed out after the stop
    info_lines = taskfarm(live_server, 'info', run).stdout
    assert re.search(r'^stopped\s+yes: 2 failed, maxFailures 2', info_lines, re.M)

    assert taskfarm(live_server, 'restart', run, '--status', 'failed').returncode == 0
    again = taskfarm(live_server, 'work', run, '--', 'true')
    assert again.returncode == 0, again.stderr
    info = client.run_info(run)
    assert (info['stopped'], info['numDone']) == (False, 300)


def finished_run(client: Client, size: int, failed: Sequence[int]) -> str:
    """A run whose tasks are all done but `failed`, through a batch claim and report."""
    run = client.create_run(size)['uuid']
    client.register_worker('w1', 'node1', 1)
    client.claim_tasks(run, 'w1', size)
    client.report(run, 'w1', [
        {'task': n, 'status': 'failed', 'exitCode': 7, 'message': f'task {n} broke\nat line 2'}
        if n in failed else {'task': n, 'status': 'done', 'percentCompleted': 100}
        for n in range(size)])
    return run


def statuses(client: Client, run: str, size: int) -> list[str]:
    return [client.task_info(run, n, 'status') for n in range(size)]


def test_restart_of_failed_tasks_and_of_chosen_ranges_restarts_exactly_those(
        live_server, client):
    run = finished_run(client, 12, failed=(0, 1))
    assert taskfarm(live_server, 'restart', run, '--status', 'failed').returncode == 0
    assert statuses(client, run, 12) == ['waiting'] * 2 + ['done'] * 10
    assert client.task_info(run, 4, 'percentCompleted') == 100

    assert taskfarm(live_server, 'restart', run, '--tasks', '3-5,9').returncode == 0
    expected = ['waiting' if n in (0, 1, 3, 4, 5, 9) else 'done' for n in range(12)]
    assert statuses(client, run, 12) == expected
    assert client.task_info(run, 4, 'percentCompleted') == 100     # kept without --all

    assert taskfarm(live_server, 'restart', run, '--all', '--tasks', '4').returncode == 0
    assert client.task_info(run, 4, 'percentCompleted') == 0
    assert client.task_info(run, 6, 'percentCompleted') == 100


def test_tasks_of_status_failed_show_exit_code_failures_and_first_line(live_server, client):
    run = finished_run(client, 3, failed=(1,))
    lines = taskfarm(live_server, 'tasks', run, '--status', 'failed').stdout.splitlines()
    assert len(lines) == 2
    row = lines[1].split()
    assert row[:6] == ['1', 'failed', '0.0', '1', '1', '7']
    assert re.search(r'  node1:1 +task 1 broke$', lines[1])


def test_tasks_as_csv_and_json_lines_hold_every_field(live_server, client):
    run = finished_run(client, 3, failed=(1,))
    as_csv = taskfarm(live_server, 'tasks', run, '--format', 'csv')
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r['task'], r['status'], r['exitCode'], r['failures']) for r in rows] == [
        ('0', 'done', '', '0'), ('1', 'failed', '7', '1'), ('2', 'done', '', '0')]
    assert rows[1]['message'] == 'task 1 broke\nat line 2'
    assert rows[1]['hostname'] == 'node1' and rows[1]['worker'] == 'w1'
    as_json = taskfarm(live_server, 'tasks', run, '--format', 'json').stdout.splitlines()
    assert [json.loads(line) for line in as_json] == list(client.iter_tasks(run))


# Started from a small Python, which reports its child's peak memory: the
# kernel counts in a child's peak the memory of the process it was forked
# from, here pytest's.
MEASURE_PEAK = ('import os, sys; pid = os.posix_spawn(sys.executable, sys.argv, os.environ); '
                '_, status, usage = os.wait4(pid, 0); '
                'print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, file=sys.stderr)')


def peak_rss_kib(*args: str, env: dict, stdout: IO) -> tuple[int, int]:
    """Run `taskfarm ARGS`; its exit status and its peak resident memory (KiB)."""
    measured = subprocess.run(
        [sys.executable, '-c', MEASURE_PEAK, str(CLIENT), *args], env=env,
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
        timeout=BIG_RUN_TIMEOUT, check=True)
    status, peak = measured.stderr.split()[-2:]
    return int(status), int(peak)


def test_csv_export_of_a_big_run_streams_in_the_memory_of_a_page(
        live_server, client, tmp_path):
    size = 100_000
    run = client.create_run(size)['uuid']
    client.register_worker('w1', 'node1', 1)
    for _ in range(size // 1000):          # every task gets a row, fast
        client.claim_tasks(run, 'w1', 1000)
    listing = tmp_path / 'tasks.csv'
    with listing.open('w') as out:
        status, peak = peak_rss_kib('tasks', run, '--format', 'csv', env=cli_env(live_server),
                                    stdout=out)
    assert status == 0
    with listing.open() as written:
        assert sum(1 for _ in written) == size + 1
    # Python and a page take some 30 MiB; the whole listing in memory, over 130.
    assert peak < 60 * 1024, f'peak {peak} KiB'


@pytest.mark.parametrize('args, words', [
    (['restart', UNKNOWN_RUN, '--tasks', '5-3'], 'ends before it starts'),
    (['restart', UNKNOWN_RUN, '--tasks', '3, 5'], 'bad --tasks'),
    (['work', UNKNOWN_RUN, '--time-limit', '10x', '--', 'true'], 'bad --time-limit'),
    (['work', UNKNOWN_RUN, '--time-limit', '0s', '--', 'true'], 'must be more than 0'),
    (['work', UNKNOWN_RUN, '--stop-after', 'soon', '--', 'true'], 'bad --stop-after'),
    (['work', UNKNOWN_RUN, '--stop-at', '25:99', '--', 'true'], 'bad --stop-at'),
    (['work', UNKNOWN_RUN, '--final-exit', '2,x', '--', 'true'], 'bad --final-exit')])
def test_bad_ranges_durations_and_codes_are_one_line(live_server, args, words):
    result = taskfarm(live_server, *args)
    assert result.returncode == 1
    assert words in one_line(result.stderr)


def test_range_outside_the_run_is_the_servers_one_line(live_server, client):
    run = client.create_run(10)['uuid']
    result = taskfarm(live_server, 'restart', run, '--tasks', '3-12')
    assert result.returncode == 1
    assert 'task 12' in one_line(result.stderr)


# ---------------------------------------------------------------------------
# Inputs and batch allocations (issue 13)

INPUTS_RUN_SIZE = 100_000
INPUTS_RUN_TIMEOUT = 300   # 10^5 processes on a small, shared machine


def text_input(n: int) -> str:
    return f'frame {n} ünï {{}} ' + 'x' * (n % 40)    # `{}` in an input stays as it is


def work_in_two_workers(spawn, run: str, tmp_path: Path, *command: str) -> Counter:
    """Two `taskfarm work -j 2` on the run; the lines they wrote, counted."""
    outputs = [tmp_path / f'worker{n}.out' for n in range(2)]
    workers = []
    for output in outputs:
        with output.open('w') as out:     # a file: a full pipe would stall a worker
            workers.append(spawn('work', run, '-j', '2', '--', *command, stdout=out))
    errors = [finish(worker, INPUTS_RUN_TIMEOUT)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    return Counter(line for output in outputs for line in output.read_text().splitlines())


def test_run_from_a_file_of_lines_hands_each_task_its_own_line_once(
        live_server, client, spawn, tmp_path):
    lines = [text_input(n) for n in range(INPUTS_RUN_SIZE)]
    inputs = tmp_path / 'inputs.txt'
    inputs.write_text(''.join(line + '\n' for line in lines))
    created = taskfarm(live_server, 'create', '--inputs', str(inputs), '--timeout', '60',
                       timeout=BIG_RUN_TIMEOUT)
    assert created.returncode == 0, created.stderr
    run = created.stdout.strip()
    info = client.run_info(run)
    assert (info['numTasks'], info['inputs'], info['inputsMissing']) == (
        INPUTS_RUN_SIZE, 'text', 0)

    seen = work_in_two_workers(spawn, run, tmp_path, 'echo', '{}', '{input}')
    assert seen == Counter(f'{n} {line}' for n, line in enumerate(lines))
    assert client.run_info(run, 'numDone') == INPUTS_RUN_SIZE


def test_run_from_json_lines_hands_each_task_its_own_value_once(
        live_server, client, spawn, tmp_path):
    size = INPUTS_RUN_SIZE // 10
    values = [{'n': n, 'name': f'item {n}', 'tags': ['a', n % 3]} for n in range(size)]
    inputs = tmp_path / 'inputs.jsonl'
    inputs.write_text(''.join(json.dumps(value) + '\n' for value in values))
    run = taskfarm(live_server, 'create', '--inputs-json', str(inputs)).stdout.strip()
    assert client.run_info(run)['inputs'] == 'json'
    assert client.task_info(run, 7)['input'] == values[7]

    seen = work_in_two_workers(spawn, run, tmp_path, 'echo', '{}', '{input}')
    assert seen == Counter(f'{n} {json.dumps(value, separators=(",", ":"))}'
                           for n, value in enumerate(values))


def test_input_reaches_the_command_in_its_environment_and_on_stdin(
        live_server, client, tmp_path):
    inputs = tmp_path / 'inputs.json'
    inputs.write_text('["plain", {"k": "v w"}, [1, 2]]')     # one JSON array
    run = taskfarm(live_server, 'create', '--inputs-json', str(inputs)).stdout.strip()
    result = taskfarm(live_server, 'work', run, '--stdin', '--',
                      'sh', '-c', 'read line; echo "{}|$line|$TASKFARM_INPUT"')
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        '0|"plain"|"plain"', '1|{"k":"v w"}|{"k":"v w"}', '2|[1,2]|[1,2]']



def test_inputs_from_stdin(live_server, client):
    created = subprocess.run(
        [sys.executable, str(CLIENT), 'create', '--inputs', '-'], env=cli_env(live_server),
        input='a b\nc\n', capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert created.returncode == 0, created.stderr
    run = created.stdout.strip()
    assert [client.task_info(run, n)['input'] for n in range(2)] == ['a b', 'c']


@pytest.mark.parametrize('option, content, words', [
    ('--inputs', b'', 'holds no input (it is empty)'),
    ('--inputs', b'ok\n' + b'x' * 4097 + b'\n', 'line 2: longer than 4096 characters'),
    ('--inputs', 'ü'.encode() * 4097, 'line 1: longer than 4096 characters'),
    ('--inputs', b'a\x00b\n', 'line 1: holds a NUL character'),
    ('--inputs', b'ok\ncaf\xe9\n', 'line 2: not UTF-8'),
    ('--inputs-json', b'{"a": 1}\n\n{"a": 2,}\n', 'line 3: invalid JSON'),
    ('--inputs-json', b'1\nNaN\n', 'line 2: invalid JSON'),
    ('--inputs-json', b'[1,\n 2,\n oops]\n', 'line 3: invalid JSON'),
    ('--inputs-json', b'"' + b'x' * 4095 + b'"\n', 'input 1 is longer than 4096 characters'),
    ('--inputs-json', b'\n  \n', 'holds no input')])
def test_bad_input_file_is_one_line_and_leaves_nothing(
        live_server, client, tmp_path, option, content, words):
    inputs = tmp_path / 'inputs'
    inputs.write_bytes(content)
    result = taskfarm(live_server, 'create', option, str(inputs))
    assert result.returncode == 1
    assert words in one_line(result.stderr)
    assert client.runs() == []


def test_input_file_with_too_many_lines_is_one_line_and_leaves_nothing(
        live_server, client, tmp_path):
    inputs = tmp_path / 'inputs.txt'
    inputs.write_text('x\n' * 1_000_001)
    result = taskfarm(live_server, 'create', '--inputs', str(inputs))
    assert result.returncode == 1
    assert 'more than 1000000 inputs' in one_line(result.stderr)
    assert client.runs() == []


def test_missing_input_file_and_count_that_does_not_match_are_one_line(
        live_server, client, tmp_path):
    missing = taskfarm(live_server, 'create', '--inputs', str(tmp_path / 'nothing'))
    assert missing.returncode == 1 and 'cannot read' in one_line(missing.stderr)
    inputs = tmp_path / 'inputs.txt'
    inputs.write_text('a\nb\n')
    wrong = taskfarm(live_server, 'create', '3', '--inputs', str(inputs))
    assert wrong.returncode == 1 and 'holds 2 inputs, not the 3' in one_line(wrong.stderr)
    assert client.runs() == []


def test_input_placeholder_for_a_run_without_inputs_is_one_line_and_registers_nothing(
        live_server, client):
    run = client.create_run(3)['uuid']
    for args in (['--', 'echo', 'x{input}'], ['--stdin', '--', 'cat']):
        result = taskfarm(live_server, 'work', run, *args)
        assert result.returncode == 1
        assert 'has no inputs' in one_line(result.stderr)
    assert client.workers() == []
    assert client.run_info(run, 'numWaiting') == 3


def test_interrupted_upload_deletes_the_run(live_server, client, spawn, tmp_path):
    inputs = tmp_path / 'inputs.txt'
    inputs.write_text('some input line\n' * 1_000_000)
    creator = spawn('create', '--inputs', str(inputs))
    wait_for(client.runs, 'the run to be created', timeout=BIG_RUN_TIMEOUT)
    creator.send_signal(signal.SIGINT)
    _, stderr = finish(creator)
    assert creator.returncode == 128 + signal.SIGINT, stderr
    assert client.runs() == []


def test_stop_after_makes_a_worker_stop_claiming_while_the_run_goes_on(
        live_server, client, spawn, tmp_path):
    run = client.create_run(30, timeout=60)['uuid']
    other = spawn('work', run, '--', 'sleep', '0.1')
    stopping = taskfarm(live_server, 'work', run, '--stop-after', '1s', '--', 'sleep', '0.1')

    assert stopping.returncode == 0, stopping.stderr
    assert 'taking no more tasks' in stopping.stderr
    done_by_it = int(re.search(r'(\d+) done', stopping.stderr)[1])
    assert 0 < done_by_it < 30
    assert other.poll() is None or client.run_info(run, 'numDone') == 30
    _, stderr = finish(other)
    assert other.returncode == 0, stderr
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing']) == (30, 0)


def test_worker_takes_no_task_it_has_no_time_left_for(live_server, client):
    run = client.create_run(5, timeout=60)['uuid']
    # Task 0 ends 2 s in, or a little later on a busy machine: less than 2 s are left.
    result = taskfarm(live_server, 'work', run, '--stop-after', '4s', '--', 'sleep', '2')
    assert result.returncode == 0, result.stderr
    assert re.search(r'taking no more tasks: \d+s left, less than a typical task \(2s\)',
                     result.stderr), result.stderr
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (1, 0, 4)


def test_stop_at_a_time_gone_by_takes_no_task(live_server, client):
    run = client.create_run(3)['uuid']
    result = taskfarm(live_server, 'work', run, '--stop-at', f'@{time.time() - 1:.0f}',
                      '--', 'true')
    assert result.returncode == 0, result.stderr
    assert 'taking no more tasks' in result.stderr
    info = client.run_info(run)
    assert (info['numWaiting'], info['numComputing']) == (3, 0)


@pytest.mark.parametrize('text, seconds', [
    ('90s', 90), ('10m', 600), ('2h', 7200), ('1h30m', 5400), ('23h30m', 84600),
    ('1d', 86400), ('1.5s', 1.5), ('45', 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text, '--time-limit') == seconds


def test_parse_moment():
    assert parse_moment('@1700000000') == 1_700_000_000
    assert parse_moment('2026-12-24T18:30Z') == 1_798_137_000
    assert parse_moment('2026-12-24T18:30+01:00') == 1_798_133_400
    soon = parse_moment('00:00')     # the next midnight, today's being gone
    assert 0 < soon - time.time() <= 86400


def test_max_tasks_stops_after_that_many(live_server, client):
    run = client.create_run(10)['uuid']
    result = taskfarm(live_server, 'work', run, '--max-tasks', '3', '-j', '2', '--', 'true')
    assert result.returncode == 0, result.stderr
    info = client.run_info(run)
    assert (info['numDone'], info['numComputing'], info['numWaiting']) == (3, 0, 7)


def test_jobs_auto_runs_one_task_per_core(live_server, client, spawn, tmp_path):
    cores = len(os.sched_getaffinity(0))
    run = client.create_run(cores + 2)['uuid']
    gate = tmp_path / 'gate'
    os.mkfifo(gate)
    command = f'if [ {{}} -lt {cores} ]; then touch {tmp_path}/started.{{}}; read x < {gate}; fi'
    worker = spawn('work', run, '-j', 'auto', '--', 'sh', '-c', f'{command}; true')
    wait_for(lambda: len(list(tmp_path.glob('started.*'))) == cores, 'a task on every core')
    assert client.run_info(run, 'numComputing') == cores
    release(gate)
    _, stderr = finish(worker)
    assert worker.returncode == 0, stderr
    assert client.run_info(run, 'numDone') == cores + 2


FAKE_SRUN = """#!/bin/sh
# Slurm's srun on one machine: its command once per "node" ($FAKE_NODES),
# with the variables srun sets; it fails if one fails.
while [ "${1#-}" != "$1" ]; do shift; done      # srun's own options
pids= node=0
while [ "$node" -lt "$FAKE_NODES" ]; do
    SLURM_PROCID=$node SLURM_NODEID=$node SLURM_NNODES=$FAKE_NODES SLURM_JOB_ID=4242 "$@" &
    pids="$pids $!" node=$((node + 1))
done
status=0
for pid in $pids; do wait "$pid" || status=$?; done
exit $status
"""


def readme_block(marker: str) -> str:
    """The README's shell block that holds `marker`."""
    blocks = re.findall(r'```sh\n(.*?)```', CLIENT.with_name('README.md').read_text(), re.S)
    return next(block for block in blocks if marker in block)


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_readme_slurm_script_runs_a_worker_per_node(live_server, client, tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    executable(bin_dir / 'srun', FAKE_SRUN)
    executable(bin_dir / 'taskfarm', f'#!/bin/sh\nexec {sys.executable} {CLIENT} "$@"\n')
    executable(tmp_path / 'farm.sh', readme_block('#SBATCH'))
    executable(tmp_path / 'process.sh',
               f'#!/bin/sh\necho "$SLURM_PROCID $TASKFARM_TASK $1" >> {tmp_path}/out.txt\n')
    (tmp_path / 'cases.txt').write_text(''.join(f'case{n}\n' for n in range(8)))
    run = taskfarm(live_server, 'create', '--inputs', str(tmp_path / 'cases.txt'),
                   '--timeout', '60').stdout.strip()
    env = cli_env(live_server, RUN=run, FAKE_NODES='2',
                  PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')

    job = subprocess.run(['bash', str(tmp_path / 'farm.sh')], cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=COMMAND_TIMEOUT)

    assert job.returncode == 0, job.stderr
    lines = [line.split() for line in (tmp_path / 'out.txt').read_text().splitlines()]
    assert sorted((int(task), case) for _, task, case in lines) == [
        (n, f'case{n}') for n in range(8)]
    assert {node for node, _, _ in lines} <= {'0', '1'}
    assert len({worker['pid'] for worker in client.workers()}) == 2
    assert client.run_info(run, 'numDone') == 8


# ---------------------------------------------------------------------------
# Pace (issue 15)


def test_info_shows_the_pace_and_an_eta(live_server, client):
    run = client.create_run(10)['uuid']
    client.register_worker('w1', 'node1', 1)
    client.claim_tasks(run, 'w1', 4)
    client.report(run, 'w1', [{'task': n, 'status': 'done'} for n in range(4)])
    lines = taskfarm(live_server, 'info', run).stdout
    # Four done in a run younger than a minute: measured over a minute.
    assert re.search(r'^pace\s+4\.0 done/min \(recent\)$', lines, re.M), lines
    assert re.search(r'^eta\s+1m30s$', lines, re.M), lines


# ---------------------------------------------------------------------------
# `taskfarm watch`


def read_line(stream, timeout: float = 30) -> str:
    """One line from a pipe, or fail after `timeout` seconds."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail('timed out waiting for a line of output')


def test_watch_prints_lines_until_the_run_is_finished(live_server, client, spawn):
    run = client.create_run(4)['uuid']
    watch = spawn('watch', run, '--interval', '0.2')
    first = read_line(watch.stdout)
    assert 'done 0/4' in first
    assert watch.poll() is None          # nothing works on the run: it waits

    worker = taskfarm(live_server, 'work', run, '-j', '2', '--', 'true')
    assert worker.returncode == 0
    stdout, _ = finish(watch)

    assert watch.returncode == 0
    last = stdout.splitlines()[-1]
    assert re.match(r'\d\d:\d\d:\d\d \[#+\] 100.0%  done 4/4  computing 0  failed 0', last)
    assert 'tasks/min' in last and 'ETA 0s' in last
    assert '\r' not in stdout            # plain lines when not on a terminal


def test_watch_on_a_terminal_redraws_one_line(live_server, client):
    run = client.create_run(1)['uuid']
    taskfarm(live_server, 'work', run, '--', 'true')
    controller, terminal = pty.openpty()
    try:
        watch = subprocess.Popen(
            [sys.executable, str(CLIENT), 'watch', run], env=cli_env(live_server),
            stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE)
        os.close(terminal)
        _, stderr = watch.communicate(timeout=COMMAND_TIMEOUT)
        shown = read_all(controller).decode()
    finally:
        os.close(controller)
    assert watch.returncode == 0, stderr
    assert shown.startswith('\r[' + '#' * 30 + '] 100.0%  done 1/1')
    assert '\x1b[K' in shown


def read_all(controller: int) -> bytes:
    """What a finished process wrote to a pty (Linux reports EIO at the end)."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return b''.join(chunks)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


def test_watch_fails_when_tasks_failed(live_server, client):
    run = client.create_run(2)['uuid']
    taskfarm(live_server, 'work', run, '--', 'sh', '-c', 'exit {}')
    result = taskfarm(live_server, 'watch', run, '--interval', '0.1')
    assert result.returncode == 1
    assert 'done 1/2' in result.stdout and 'failed 1' in result.stdout


# ---------------------------------------------------------------------------
# The other commands


def test_create_prints_the_uuid_alone(live_server, client):
    result = taskfarm(live_server, 'create', '100')
    assert result.returncode == 0
    assert re.fullmatch(r'[0-9a-f]{32}\n', result.stdout)
    assert client.run_info(result.stdout.strip(), 'numWaiting') == 100


def test_create_passes_name_timeout_and_max_attempts(live_server, client):
    result = taskfarm(live_server, 'create', '7', '--name', 'render frames',
                      '--timeout', '60', '--max-attempts', '3')
    info = client.run_info(result.stdout.strip())
    assert (info['numTasks'], info['name'], info['timeout'], info['maxAttempts']) == (
        7, 'render frames', 60, 3)


def test_list_shows_runs_with_their_names(live_server, client):
    first = client.create_run(3, name='first run')['uuid']
    second = client.create_run(5)['uuid']
    lines = taskfarm(live_server, 'list').stdout.splitlines()
    assert lines[0].split() == ['UUID', 'TASKS', 'NAME']
    assert lines[1].split() == [first, '3', 'first', 'run']
    assert lines[2].split() == [second, '5']


def test_info_shows_counts_and_a_progress_bar(live_server, client):
    run = client.create_run(4, name='demo')['uuid']
    worker = client.register_worker('w1', 'host', 1)['uuid']
    for _ in range(3):
        client.claim_task(run, worker)
    client.update_task(run, 0, 100, 'done')
    client.update_task(run, 1, status='failed')

    lines = taskfarm(live_server, 'info', run).stdout.splitlines()

    assert lines[0].split() == ['run', run, '(demo)']
    counts = dict(line.split()[:2] for line in lines[1:6])
    assert counts == {'tasks': '4', 'done': '1', 'computing': '1', 'waiting': '1',
                      'failed': '1'}
    assert lines[6] == 'progress   [' + '#' * 8 + '.' * 22 + '] 25.0%'


def test_tasks_lists_every_task_with_a_status_filter(live_server, client):
    run = client.create_run(5)['uuid']
    worker = client.register_worker('w1', 'node7', 42)['uuid']
    for _ in range(3):
        client.claim_task(run, worker)
    client.update_task(run, 1, 100, 'done')

    everything = taskfarm(live_server, 'tasks', run).stdout.splitlines()
    done = taskfarm(live_server, 'tasks', run, '--status', 'done').stdout.splitlines()

    assert everything[0].split() == ['TASK', 'STATUS', 'PERCENT', 'ATTEMPTS', 'FAILURES',
                                     'EXIT', 'UPDATED', 'WORKER', 'MESSAGE']
    rows = [line.split() for line in everything[1:]]
    assert [row[:6] + row[7:] for row in rows] == [
        ['0', 'computing', '0.0', '1', '0', '-', 'node7:42'],
        ['1', 'done', '100.0', '1', '0', '-', 'node7:42'],
        ['2', 'computing', '0.0', '1', '0', '-', 'node7:42']]
    assert all(re.fullmatch(r'\d{4}-\d\d-\d\dT[\d:.]+Z', row[6]) for row in rows)
    assert [line.split()[:2] for line in done[1:]] == [['1', 'done']]


def test_iter_tasks_pages_through_all_tasks(client):
    run = client.create_run(7)['uuid']
    worker = client.register_worker('w1', 'host', 1)['uuid']
    for _ in range(7):
        client.claim_task(run, worker)
    assert [task['task'] for task in client.iter_tasks(run, page_size=3)] == list(range(7))


def test_workers_lists_registered_workers(live_server, client):
    run = client.create_run(2)['uuid']
    client.register_worker('a' * 32, 'node1', 123)
    client.claim_task(run, 'a' * 32)
    lines = taskfarm(live_server, 'workers').stdout.splitlines()
    assert lines[0].split() == ['UUID', 'HOSTNAME', 'PID', 'TASKS', 'LAST', 'SEEN']
    assert lines[1].split()[:4] == ['a' * 32, 'node1', '123', '1']


def test_restart_puts_unfinished_tasks_back_and_all_resets_everything(live_server, client):
    run = client.create_run(3)['uuid']
    worker = client.register_worker('w1', 'host', 1)['uuid']
    for _ in range(3):
        client.claim_task(run, worker)
    client.update_task(run, 0, 100, 'done')
    client.update_task(run, 1, 50)

    assert taskfarm(live_server, 'restart', run).returncode == 0
    assert [client.task_info(run, t, 'status') for t in range(3)] == ['done', 'waiting', 'waiting']
    assert client.task_info(run, 1, 'percentCompleted') == 50

    assert taskfarm(live_server, 'restart', run, '--all').returncode == 0
    assert client.run_info(run, 'numWaiting') == 3
    assert client.run_info(run, 'percentDone') == 0


def test_delete_removes_the_run(live_server, client):
    run = client.create_run(3)['uuid']
    assert taskfarm(live_server, 'delete', run).returncode == 0
    with pytest.raises(NotFound):
        client.run_info(run)


def test_connection_options_work_after_the_subcommand(live_server):
    env = {**os.environ, 'TASKFARM_RETRY_SECONDS': '5'}
    result = taskfarm(live_server, 'create', '2', '--url', live_server.url,
                      '--user', live_server.user, '--password', live_server.password, env=env)
    assert result.returncode == 0, result.stderr
    result = taskfarm(live_server, '--url', live_server.url, '--user', live_server.user,
                      '--password', live_server.password, 'list', env=env)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Errors: one clear line, a non-zero exit, no traceback


def test_wrong_password_is_one_clear_line(live_server):
    result = taskfarm(live_server, 'list',
                      env=cli_env(live_server, TASKFARM_PASSWORD='not-the-password'))
    assert result.returncode == 1
    assert 'wrong user name or password' in one_line(result.stderr)


@pytest.mark.parametrize('command', [
    ['info'], ['tasks'], ['watch'], ['restart'], ['delete'], ['work', '--', 'true']])
def test_unknown_run_is_one_clear_line(live_server, command):
    result = taskfarm(live_server, command[0], UNKNOWN_RUN, *command[1:])
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert 'unknown run' in line and UNKNOWN_RUN in line


def test_unreachable_server_is_one_clear_line_after_a_bounded_wait(live_server):
    url = f'http://127.0.0.1:{free_port()}'    # nobody listens there
    began = time.monotonic()
    result = taskfarm(live_server, 'list',
                      env=cli_env(live_server, TASKFARM_URL=url, TASKFARM_RETRY_SECONDS='1'))
    assert result.returncode == 1
    assert f'cannot reach the taskfarm server at {url}' in one_line(result.stderr)
    assert time.monotonic() - began < 20


def test_missing_password_without_a_terminal_is_one_clear_line(live_server):
    env = cli_env(live_server)
    del env['TASKFARM_PASSWORD']
    result = taskfarm(live_server, 'list', env=env)
    assert result.returncode == 1
    assert 'no password' in one_line(result.stderr)


def test_client_raises_typed_errors(live_server):
    with pytest.raises(AuthError):
        Client(live_server.url, live_server.user, 'wrong').runs()
    with pytest.raises(NotFound):
        Client(live_server.url, live_server.user, live_server.password).run_info(UNKNOWN_RUN)
    with pytest.raises(Unreachable):
        Client(f'http://127.0.0.1:{free_port()}', 'a', 'b', retry_seconds=0).runs()


@pytest.fixture
def untrusted_tls_server(tmp_path):
    """A TLS listener on 127.0.0.1 whose self-signed certificate nobody trusts;
    it counts the handshakes clients attempt."""
    openssl = shutil.which('openssl')
    if openssl is None:
        pytest.skip('needs openssl to make a certificate')
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run([openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                    '-subj', '/CN=127.0.0.1', '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(('127.0.0.1', 0))
    handshakes: list[int] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            handshakes.append(1)
            with contextlib.suppress(OSError), connection:
                connection.settimeout(10)
                context.wrap_socket(connection, server_side=True).close()

    threading.Thread(target=serve, daemon=True).start()
    yield f'https://127.0.0.1:{listener.getsockname()[1]}', handshakes
    listener.close()


def test_certificate_that_fails_verification_is_final_at_once(live_server, untrusted_tls_server):
    url, handshakes = untrusted_tls_server
    result = taskfarm(live_server, 'list',
                      env=cli_env(live_server, TASKFARM_URL=url, TASKFARM_RETRY_SECONDS='60'))
    assert result.returncode == 1
    assert 'certificate verify failed' in one_line(result.stderr)
    assert len(handshakes) == 1               # not tried again


def test_client_renews_a_token_the_server_refuses(live_server):
    stale = Client(live_server.url, live_server.user, live_server.password, token='expired')
    assert stale.runs() == []
    assert stale.token() != 'expired'


# ---------------------------------------------------------------------------
# The original taskfarm_worker API


def test_original_worker_script_runs_unchanged(live_server):
    user, password, url_base = live_server.user, live_server.password, live_server.url + '/api/'
    tf = TaskFarm(user, password, numTasks=5, url_base=url_base)
    worker = TaskFarmWorker(user, password, tf.uuid, url_base=url_base)
    seen = []
    for task in worker.tasks:
        seen.append(task)
        worker.update(50)
        assert tf.getTaskInfo(task, 'percentCompleted') == 50
        worker.update(100)
        worker.done()

    assert seen == [0, 1, 2, 3, 4]
    assert (tf.numDone, tf.numWaiting, tf.numComputing, tf.percentDone) == (5, 0, 0, 100)
    assert tf.info('')['numTasks'] == 5
    assert tf.uuid in [run['uuid'] for run in tfRuns(user, password, url_base=url_base)]


def test_done_marks_a_task_done_only_at_100_percent(live_server):
    user, password, url_base = live_server.user, live_server.password, live_server.api
    tf = TaskFarm(user, password, numTasks=2, url_base=url_base)
    worker = TaskFarmWorker(user, password, tf.uuid, url_base=url_base)
    task = worker.task
    worker.update(60)
    worker.done()
    assert tf.getTaskInfo(task, 'status') == 'computing'
    assert worker.task == 1                  # the next task, not the same one again


def test_taskfarm_loads_restarts_sets_and_deletes_a_run(live_server):
    user, password, url_base = live_server.user, live_server.password, live_server.api
    created = TaskFarm(user, password, numTasks=3, url_base=url_base)
    loaded = TaskFarm(user, password, uuid=created.uuid, url_base=url_base)
    assert loaded.numTasks == 3

    loaded.setTaskInfo(2, 'status', 'done')
    assert loaded.getTaskInfo(2, 'status') == 'done'
    with pytest.raises(RuntimeError):
        loaded.getTaskInfo(3, 'status')
    loaded.restart(everything=True)
    assert loaded.getTaskInfo(2, '')['status'] == 'waiting'
    loaded.delete()
    with pytest.raises(RuntimeError):
        TaskFarm(user, password, uuid=created.uuid, url_base=url_base)


def test_taskfarm_wrong_password_raises_runtime_error(live_server):
    with pytest.raises(RuntimeError, match='wrong user name or password'):
        TaskFarm(live_server.user, 'wrong', numTasks=1, url_base=live_server.api)
