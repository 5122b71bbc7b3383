"""Deployment (issue 14), tested for real.

- Login throttling and the client's address (X-Forwarded-For believed only
  from trusted proxies), through the API and on live servers, and what a
  password-guessing attacker costs the server's CPU with and without it.
- Debian's nginx, run with the repo's own configuration (deploy/nginx/; the
  test fills in ports and upstream addresses), terminating TLS with a
  throwaway CA made by openssl, in front of two live servers on one
  PostgreSQL database: the original client, the `taskfarm` command and a
  load of workers go through it, and a server dies under it.
- PostgreSQL failover: a primary and a synchronous streaming standby, two
  throwaway clusters; the primary stops hard under load and the standby is
  promoted.

The figures (exactly-once counts, the failover's 503 window and recovery
time, the attacker's CPU) are printed: `pytest test_deploy.py -s` shows
them. Every wait is bounded; timings are measured and shown, never asserted.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import os
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from uuid import uuid4

import falcon.testing
import pytest
import webtest

import store
import taskfarm

HERE = Path(__file__).resolve().parent
NGINX_CONFIG = HERE / 'deploy' / 'nginx'
CLIENT = HERE / 'taskfarm_client.py'
HTTP_TIMEOUT = 10           # seconds, on every HTTP call
DONE = {'percentCompleted': 100, 'status': 'done'}


def require(program: str, package: str) -> str:
    """The program's path. Without it the test is skipped, or fails under CI."""
    path = shutil.which(program) or shutil.which(program, path='/usr/sbin:/sbin')
    if path is None:
        why = f'needs {program}: apt-get install {package}, as .ci/run does'
        if os.environ.get('CI'):
            pytest.fail(why)
        pytest.skip(why)
    return path


def wait_until(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'gave up after {seconds} s waiting for {what}')
        time.sleep(0.05)    # polling, bounded by the deadline


# ---------------------------------------------------------------------------
# A client: one keep-alive connection, HTTP or HTTPS, from a chosen address.


class Reply(NamedTuple):
    status: int
    body: Any
    headers: http.client.HTTPMessage


def basic(user: str, password: str) -> str:
    return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


class Api:
    """Requests on one keep-alive connection, as one user (or token).

    `source` is the local address to connect from: any of 127.0.0.0/8, so
    that clients on one machine have addresses of their own.
    """

    def __init__(self, url: str, user: str, password: str,
                 context: ssl.SSLContext | None = None, source: str | None = None) -> None:
        parts = urlsplit(url)
        self.url, self.https = url, parts.scheme == 'https'
        self.host, self.port = parts.hostname, parts.port
        self.user = user
        self.password = password
        self.context, self.source = context, source
        self.conn: http.client.HTTPConnection | None = None

    def like(self, user: str | None = None, password: str | None = None,
             source: str | None = None) -> Api:
        """A new connection to the same place, changed as asked."""
        return Api(self.url, user or self.user, self.password if password is None else password,
                   self.context, source or self.source)

    def connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            source = (self.source, 0) if self.source else None
            if self.https:
                self.conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=HTTP_TIMEOUT, context=self.context,
                    source_address=source)
            else:
                self.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=HTTP_TIMEOUT, source_address=source)
        return self.conn

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Reply:
        sent = {'Authorization': basic(self.user, self.password), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent['Content-Type'] = 'application/json'
        conn = self.connection()
        try:
            conn.request(method, path, data, sent)
            response = conn.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        is_json = 'json' in (response.getheader('Content-Type') or '')
        return Reply(response.status, json.loads(raw) if raw and is_json else raw.decode(),
                     response.headers)

    def token(self) -> Api:
        """A client that authenticates with a token, as workers do."""
        reply = self.call('GET', '/api/token')
        assert reply.status == 200, reply
        return self.like(user=reply.body['token'], password='')

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def create_run(api: Api, num_tasks: int, **extra: Any) -> str:
    reply = api.call('POST', '/api/run', {'numTasks': num_tasks, **extra})
    assert reply.status == 201, reply
    return reply.body['uuid']


def run_info(api: Api, run: str) -> dict:
    reply = api.call('GET', f'/api/runs/{run}')
    assert reply.status == 200, reply
    return reply.body


def listed_tasks(api: Api, run: str) -> list[dict]:
    """Every task of the run that has a row, page by page."""
    tasks: list[dict] = []
    while True:
        after = tasks[-1]['task'] if tasks else -1
        reply = api.call('GET', f'/api/runs/{run}/tasks?limit=1000&after={after}')
        assert reply.status == 200, reply
        if not reply.body['data']:
            return tasks
        tasks.extend(reply.body['data'])


def assert_unavailable(reply: Reply) -> None:
    """A 503 a worker can act on: a JSON error and a Retry-After."""
    assert reply.status == 503, reply
    assert reply.body['title'] and reply.body['description'], reply
    assert int(reply.headers['Retry-After']) > 0, reply


# ---------------------------------------------------------------------------
# Workers under load, counting what they were handed and what it cost.


@dataclass
class Tally:
    seen: list[int] = field(default_factory=list)       # tasks handed to a worker
    reported: list[int] = field(default_factory=list)   # done reports answered 204
    statuses: Counter = field(default_factory=Counter)  # every answer, by status
    dropped: int = 0        # requests that got no answer at all
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (when, status or 0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.timeline.append((time.monotonic(), status))
            self.dropped += status == 0


def answered(api: Api, method: str, path: str, body: Any, tally: Tally,
             deadline: float) -> Reply:
    """The first answer that is not a 503 nor a lost connection, asking again until then."""
    while True:
        try:
            reply = api.call(method, path, body)
        except (OSError, http.client.HTTPException):
            tally.answer(0)
        else:
            tally.answer(reply.status)
            if reply.status != 503:
                return reply
            assert_unavailable(reply)
        if time.monotonic() > deadline:
            raise TimeoutError(f'{method} {path}: no answer before the deadline')
        time.sleep(0.05)    # the service is failing over: ask again, bounded by the deadline


def work(api: Api, run: str, tally: Tally, deadline: float, until_complete: bool,
         stop: threading.Event) -> None:
    """Be a worker: take a task, report it done, until nothing waits (or told to stop).

    until_complete: on "nothing waits", keep asking until the run is
    complete, for tasks whose lease runs out (handed to a worker that died).
    """
    worker = uuid4().hex
    registration = {'uuid': worker, 'hostname': 'loadhost', 'pid': os.getpid()}
    assert answered(api, 'POST', '/api/worker', registration, tally, deadline).status == 201
    while not stop.is_set():
        reply = answered(api, 'POST', f'/api/runs/{run}/task', {'worker_uuid': worker},
                         tally, deadline)
        if reply.status == 204:
            if not until_complete or run_complete(api, run, tally, deadline):
                return
            if time.monotonic() > deadline:
                raise TimeoutError('the run did not complete before the deadline')
            time.sleep(0.05)    # waiting for a lease to run out, bounded by the deadline
            continue
        assert reply.status == 201, reply
        task = reply.body['task']
        with tally.lock:
            tally.seen.append(task)
        reply = answered(api, 'PUT', f'/api/runs/{run}/tasks/{task}', DONE, tally, deadline)
        assert reply.status == 204, reply
        with tally.lock:
            tally.reported.append(task)


def run_complete(api: Api, run: str, tally: Tally, deadline: float) -> bool:
    info = answered(api, 'GET', f'/api/runs/{run}', None, tally, deadline).body
    return info['numDone'] == info['numTasks']


def work_in_parallel(apis: list[Api], run: str, tally: Tally, seconds: float,
                     meanwhile: Callable[[], None] | None = None,
                     stop: threading.Event | None = None, until_complete: bool = False) -> None:
    """One worker thread per client; meanwhile() runs while they work."""
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()
    with ThreadPoolExecutor(max_workers=len(apis)) as pool:
        futures = [pool.submit(work, api, run, tally, deadline, until_complete, stop)
                   for api in apis]
        try:
            if meanwhile is not None:
                meanwhile()
        except BaseException:
            stop.set()      # the workers stop too: meanwhile's failure is the news
            raise
        finally:
            for future in futures:
                future.result(timeout=seconds + 2 * HTTP_TIMEOUT)


def assert_each_seen_once(seen: list[int], expected: set[int]) -> None:
    twice = sorted(task for task, times in Counter(seen).items() if times > 1)
    assert not twice, f'tasks handed to more than one worker: {twice[:20]}'
    assert set(seen) == expected, (
        f'never handed out: {sorted(expected - set(seen))[:20]}, '
        f'unexpected: {sorted(set(seen) - expected)[:20]}')


def figure(text: str) -> None:
    """A measured figure, for the report: shown with `pytest -s`."""
    print(f'\n[figure] {text}', flush=True)


# ---------------------------------------------------------------------------
# 1. The client's address: X-Forwarded-For only from trusted proxies.

TRUSTED = taskfarm.trusted_networks('127.0.0.1, 10.0.0.0/8, ::1')


@pytest.mark.parametrize(('peer', 'forwarded', 'client'), [
    ('192.0.2.7', None, '192.0.2.7'),                       # no proxy
    ('192.0.2.7', '198.51.100.1', '192.0.2.7'),             # not a trusted proxy: ignored
    ('127.0.0.1', None, '127.0.0.1'),                       # a trusted proxy, telling nothing
    ('127.0.0.1', '198.51.100.1', '198.51.100.1'),
    ('127.0.0.1', '203.0.113.9, 198.51.100.1', '198.51.100.1'),  # the left one is the client's say
    ('127.0.0.1', '203.0.113.9, 198.51.100.1, 10.1.2.3', '198.51.100.1'),  # two proxies
    ('127.0.0.1', '10.1.2.3, 10.4.5.6', '10.1.2.3'),        # proxies all the way
    ('127.0.0.1', 'garbage, 10.1.2.3', '10.1.2.3'),         # the nearest address we can believe
    ('127.0.0.1', '', '127.0.0.1'),
    ('::1', '2001:db8::1', '2001:db8::1'),
])
def test_client_address_believes_x_forwarded_for_only_from_trusted_proxies(
        peer, forwarded, client):
    headers = {} if forwarded is None else {'X-Forwarded-For': forwarded}
    req = falcon.testing.create_req(remote_addr=peer, headers=headers)
    assert taskfarm.client_address(req, TRUSTED) == client
    assert taskfarm.client_address(req, ()) == peer


def test_config_reads_the_proxy_and_throttle_settings():
    config = taskfarm.Config.from_env({
        'TASKFARM_TRUSTED_PROXIES': '127.0.0.1, 172.30.57.0/24',
        'TASKFARM_LOGIN_MAX_FAILURES': '8', 'TASKFARM_LOGIN_WINDOW': '30'})
    assert [str(net) for net in config.trusted_proxies] == ['127.0.0.1/32', '172.30.57.0/24']
    assert (config.login_max_failures, config.login_window) == (8, 30.0)
    defaults = taskfarm.Config.from_env({})
    assert (defaults.trusted_proxies, defaults.login_max_failures) == ((), 5)
    with pytest.raises(ValueError):
        taskfarm.Config.from_env({'TASKFARM_TRUSTED_PROXIES': 'proxy.example'})


# ---------------------------------------------------------------------------
# 2. Login throttling, through the API.

ATTACKER, ELSEWHERE, BOBS_DESK = '10.0.0.66', '10.0.0.20', '10.0.0.30'


@pytest.fixture
def throttled_app(tf_store: store.Store, config: taskfarm.Config):
    """3 failures per 60 s; no password cache, so that every login is checked."""
    return taskfarm.create_app(tf_store, dataclasses.replace(
        config, login_max_failures=3, login_window=60, auth_cache_seconds=0))


def client(app: Any, user: str, password: str, address: str = ELSEWHERE) -> webtest.TestApp:
    browser = webtest.TestApp(app, extra_environ={'REMOTE_ADDR': address})
    browser.authorization = ('Basic', (user, password))
    return browser


def guess(app: Any, times: int, user: str = 'bob', address: str = ATTACKER) -> list[int]:
    attacker = client(app, user, 'wrong', address)
    return [attacker.get('/api/token', expect_errors=True).status_int for _ in range(times)]


def test_wrong_passwords_get_429_with_retry_after_and_no_more_checks(throttled_app, passwords):
    assert guess(throttled_app, 5) == [401, 401, 401, 429, 429]
    reply = client(throttled_app, 'bob', passwords['bob'], ATTACKER).get('/api/token',
                                                                         status=429)
    # The right password gets 429 too: it is not even checked.
    assert reply.json['title'] == 'Too many failed logins'
    assert 55 <= int(reply.headers['Retry-After']) <= 60


def test_throttle_spares_other_users_other_addresses_known_logins_and_tokens(throttled_app,
                                                                           passwords):
    bob_at_desk = client(throttled_app, 'bob', passwords['bob'], BOBS_DESK)
    token = bob_at_desk.get('/api/token', status=200).json['token']   # bob logged in here before
    assert guess(throttled_app, 4) == [401, 401, 401, 429]

    client(throttled_app, 'alice', passwords['alice'], ELSEWHERE).get('/api/token', status=200)
    bob_at_desk.get('/api/runs', status=200)
    client(throttled_app, 'bob', passwords['bob'], ELSEWHERE).get('/api/runs', status=429)
    client(throttled_app, 'alice', passwords['alice'], ATTACKER).get('/api/runs', status=429)
    tokened = webtest.TestApp(throttled_app, extra_environ={'REMOTE_ADDR': ATTACKER})
    tokened.authorization = ('Basic', (token, ''))
    tokened.get('/api/runs', status=200)


def test_throttle_lets_checks_through_again_once_the_window_is_over(tf_store, config,
                                                                   passwords):
    app = taskfarm.create_app(tf_store, dataclasses.replace(
        config, login_max_failures=2, login_window=1, auth_cache_seconds=0))
    assert guess(app, 3) == [401, 401, 429]
    bob = client(app, 'bob', passwords['bob'], ATTACKER)
    assert bob.get('/api/token', status=429).headers['Retry-After'] == '1'
    wait_until(lambda: bob.get('/api/token', expect_errors=True).status_int == 200, 10,
               'the window to end')
    assert guess(app, 1) == [401]       # a fresh window: counted again from one


def test_each_throttled_name_and_address_is_logged_once_per_window(throttled_app, caplog):
    caplog.set_level(logging.WARNING, logger='taskfarm')
    assert Counter(guess(throttled_app, 23)) == {401: 3, 429: 20}
    lines = [record.getMessage() for record in caplog.records if record.name == 'taskfarm']
    assert len(lines) == 2, lines
    assert f"address '{ATTACKER}'" in lines[0] and "user 'bob'" in lines[1], lines
    assert all('wrong' not in line for line in lines)      # no password in the log


def test_throttle_memory_stays_bounded_and_still_blocks_a_busy_attacker():
    throttle = taskfarm.LoginThrottle(max_failures=3, window=60, tracked=100)
    for n in range(5000):
        throttle.failed(f'user{n}', f'192.0.2.{n % 250}')
        throttle.failed(f'sprayed{n}', ATTACKER)
        throttle.succeeded(f'user{n}', f'198.51.100.{n % 250}')
        assert len(throttle.strikes) <= 100 and len(throttle.known) <= 100
    assert throttle.wait('anyone', ATTACKER) > 0


# ---------------------------------------------------------------------------
# 3. Login throttling on live servers: the address they count by, and CPU.


def server_log_has(server: Any, text: str) -> bool:
    return text in ''.join(server.output)


@pytest.mark.parametrize('trusted', ['', '127.0.0.1'])
def test_x_forwarded_for_sent_by_a_client_itself_is_never_believed(servers, trusted):
    server = servers(env={'TASKFARM_TRUSTED_PROXIES': trusted,
                          'TASKFARM_LOGIN_MAX_FAILURES': '3'})
    attacker = Api(server.url, 'bob', 'wrong', source='127.0.0.5')
    statuses = [attacker.call('GET', '/api/token',
                              headers={'X-Forwarded-For': f'127.0.1.{n}'}).status
                for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    alice = Api(server.url, server.user, server.password, source='127.0.0.6')
    assert alice.call('GET', '/api/token').status == 200
    wait_until(lambda: server_log_has(server, "address '127.0.0.5'"), 10, 'the throttle log')
    assert not server_log_has(server, '127.0.1.')


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def attack(server: Any, connections: int, seconds: float) -> tuple[Counter, float, float]:
    """Wrong passwords for bob, from one address, as fast as the server answers:
    (answers by status, server CPU in cores, seconds it lasted)."""
    answers: Counter = Counter()
    lock = threading.Lock()

    def guesser(n: int) -> None:
        api = Api(server.url, 'bob', 'wrong', source='127.0.0.7')
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            status = api.call('GET', '/api/token').status
            with lock:
                answers[status] += 1

    cpu, started = cpu_seconds(server.process.pid), time.monotonic()
    with ThreadPoolExecutor(max_workers=connections) as pool:
        for future in [pool.submit(guesser, n) for n in range(connections)]:
            future.result(timeout=seconds + 2 * HTTP_TIMEOUT)
    wall = time.monotonic() - started
    return answers, (cpu_seconds(server.process.pid) - cpu) / wall, wall


def test_throttled_attacker_no_longer_costs_a_password_check_per_guess(sqlite_database_url, launch):
    connections, seconds, max_failures = 8, 3.0, 5
    unthrottled = launch(sqlite_database_url, env={'TASKFARM_LOGIN_MAX_FAILURES': '0'})
    before, cores_before, wall_before = attack(unthrottled, connections, seconds)
    unthrottled.stop()
    throttled = launch(sqlite_database_url, env={'TASKFARM_LOGIN_MAX_FAILURES': str(max_failures)})
    after, cores_after, wall_after = attack(throttled, connections, seconds)

    assert set(before) == {401}                    # throttling off: every guess checked
    assert set(after) == {401, 429}
    # Guesses already past the throttle when the last allowed one failed
    # are checked too: at most one more per connection.
    assert after[401] <= max_failures + connections - 1
    figure(f'attacker, {connections} connections, wrong passwords for one user from one '
           f'address, {seconds:g} s each: throttling off: {cores_before:.2f} cores busy, '
           f'{before[401] / wall_before:.0f} password checks/s, '
           f'{1000 * cores_before * wall_before / before.total():.1f} ms CPU per guess; '
           f'throttling on: {cores_after:.2f} cores busy, {after[401]} checks in all, '
           f'{after[429] / wall_after:.0f} answers 429/s, '
           f'{1000 * cores_after * wall_after / after.total():.2f} ms CPU per guess')


# ---------------------------------------------------------------------------
# 4. Through Debian's nginx, over TLS, with the repo's configuration.

NGINX_MAIN = """\
daemon off;
{user}
worker_processes 1;
pid {here}/nginx.pid;
error_log {here}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$remote_addr $connection $connection_requests $status '
                         '$request_method $upstream_addr';
    access_log {here}/access.log upstreams;
    client_body_temp_path {here}/temp/body;
    proxy_temp_path {here}/temp/proxy;
    fastcgi_temp_path {here}/temp/fastcgi;
    uwsgi_temp_path {here}/temp/uwsgi;
    scgi_temp_path {here}/temp/scgi;
    include site/taskfarm.conf;
    include site/taskfarm-tls.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
    except OSError:
        return False
    return True


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f'{old!r} is not in the configuration exactly once'
    return text.replace(old, new)


def site_files(upstreams: list[str], http_port: int, https_port: int) -> dict[str, str]:
    """The repo's two site files, with this test's ports and upstream servers put in."""
    plain = (NGINX_CONFIG / 'conf.d' / 'taskfarm.conf').read_text()
    plain = replace_once(plain, 'listen 80;', f'listen 127.0.0.1:{http_port};')
    [line] = [line for line in plain.splitlines() if line.strip().startswith('server web:5000')]
    plain = replace_once(plain, line, '\n'.join(
        line.replace('web:5000', address) for address in upstreams))
    tls = replace_once((NGINX_CONFIG / 'tls.d' / 'taskfarm-tls.conf').read_text(),
                       'listen 443 ssl;', f'listen 127.0.0.1:{https_port} ssl;')
    return {'taskfarm.conf': plain, 'taskfarm-tls.conf': tls}


@dataclass
class Proxy:
    process: subprocess.Popen
    directory: Path
    http_port: int
    https_port: int
    context: ssl.SSLContext     # trusts the throwaway CA
    passwords: dict[str, str]   # of the test users, as the upstream servers know them

    @property
    def url(self) -> str:
        return f'https://127.0.0.1:{self.https_port}'

    def api(self, user: str = 'alice', password: str | None = None, **kwargs: Any) -> Api:
        password = self.passwords[user] if password is None else password
        return Api(self.url, user, password, context=self.context, **kwargs)

    def access_log(self) -> list[list[str]]:
        """remote_addr, connection, connection_requests, status, method, upstream_addr."""
        return [line.split() for line in
                (self.directory / 'access.log').read_text().splitlines()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)    # graceful shutdown
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A throwaway CA, and a certificate for 127.0.0.1 it signed: tls/, with ca.crt."""
    openssl = require('openssl', 'openssl')
    folder = tmp_path / 'tls'
    folder.mkdir()
    key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
    (folder / 'server.ext').write_text(
        'subjectAltName = IP:127.0.0.1, DNS:localhost\n'
        'basicConstraints = critical, CA:FALSE\n'
        'keyUsage = critical, digitalSignature\n'
        'extendedKeyUsage = serverAuth\n'
        'subjectKeyIdentifier = hash\n'
        'authorityKeyIdentifier = keyid\n')
    for command in (
            ['req', '-x509', *key, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2',
             '-subj', '/CN=Taskfarm test CA',
             '-addext', 'basicConstraints = critical, CA:TRUE',
             '-addext', 'keyUsage = critical, keyCertSign, cRLSign'],
            ['req', *key, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1'],
            ['x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
             '-CAcreateserial', '-out', 'server.crt', '-days', '2', '-extfile', 'server.ext']):
        done = subprocess.run([openssl, *command], cwd=folder, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    return folder / 'ca.crt'


@pytest.fixture
def proxy(tmp_path: Path, certificates: Path, passwords: dict[str, str]
          ) -> Iterator[Callable[[list[Any]], Proxy]]:
    """A factory: nginx with the repo's configuration in front of some servers."""
    nginx = require('nginx', 'nginx')
    started: list[Proxy] = []

    def start(upstreams: list[Any]) -> Proxy:
        here = tmp_path / f'nginx{len(started)}'
        (here / 'site').mkdir(parents=True)
        (here / 'temp').mkdir()
        (here / 'taskfarm').symlink_to(NGINX_CONFIG / 'taskfarm')
        (here / 'tls').symlink_to(certificates.parent)
        http_port, https_port = free_port(), free_port()
        addresses = [urlsplit(server.url).netloc for server in upstreams]
        for name, text in site_files(addresses, http_port, https_port).items():
            (here / 'site' / name).write_text(text)
        user = 'user root;' if os.geteuid() == 0 else ''  # its workers may read tmp_path
        (here / 'nginx.conf').write_text(NGINX_MAIN.format(here=here, user=user))
        with open(here / 'nginx.out', 'w') as out:
            process = subprocess.Popen([nginx, '-c', str(here / 'nginx.conf'),
                                        '-e', str(here / 'error.log')],
                                       stdout=out, stderr=subprocess.STDOUT)
        site = Proxy(process, here, http_port, https_port,
                     ssl.create_default_context(cafile=str(certificates)), passwords)
        started.append(site)
        wait_until(lambda: process.poll() is not None
                   or (accepts(http_port) and accepts(https_port)), 20, 'nginx to listen')
        assert process.poll() is None, (here / 'nginx.out').read_text()
        return site

    yield start
    for site in started:
        site.stop()


@pytest.fixture
def two_servers(database_url: str, servers) -> list[Any]:
    """Two servers on one PostgreSQL database, trusting the proxy on 127.0.0.1."""
    if not database_url.startswith('postgresql'):
        pytest.skip('several servers behind a proxy share one PostgreSQL database')
    env = {'TASKFARM_TRUSTED_PROXIES': '127.0.0.1'}
    return [servers(env=env), servers(env=env)]


def upstreams_used(site: Proxy, method: str) -> Counter:
    """How many requests of that method each server answered."""
    return Counter(line[5] for line in site.access_log() if line[4] == method)


def test_original_client_over_https_through_nginx_does_every_task_once(
        two_servers, proxy, certificates, monkeypatch):
    import requests
    from taskfarm_worker import TaskFarm, TaskFarmWorker

    site = proxy(two_servers)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(site.url + '/', timeout=HTTP_TIMEOUT)   # not without our CA
    monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(certificates))
    url, password = site.url + '/api/', site.passwords['alice']
    run = TaskFarm('alice', password, numTasks=60, url_base=url)
    done: list[int] = []

    def original_worker() -> None:
        worker = TaskFarmWorker('alice', password, run.uuid, url_base=url)
        for task in worker.tasks:
            done.append(task)
            worker.update(100)
            worker.done()

    with ThreadPoolExecutor(max_workers=3) as pool:
        for future in [pool.submit(original_worker) for _ in range(3)]:
            future.result(timeout=120)
    assert sorted(done) == list(range(60))
    assert (run.numDone, run.numWaiting, run.numComputing, run.percentDone) == (60, 0, 0, 100)
    assert len(upstreams_used(site, 'POST')) == 2      # both servers handed out tasks


def taskfarm_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_taskfarm_command_over_https_through_nginx(two_servers, proxy, certificates):
    site = proxy(two_servers)
    env = {**os.environ, 'TASKFARM_URL': site.url, 'TASKFARM_USER': 'alice',
           'TASKFARM_PASSWORD': site.passwords['alice'], 'TASKFARM_RETRY_SECONDS': '0'}
    env.pop('SSL_CERT_FILE', None)
    refused = taskfarm_command(env, 'list')
    assert refused.returncode == 1 and 'certificate verify failed' in refused.stderr, refused
    # The command is stdlib http.client: it trusts the CAs OpenSSL finds, SSL_CERT_FILE.
    env.update(SSL_CERT_FILE=str(certificates), TASKFARM_RETRY_SECONDS='10')
    created = taskfarm_command(env, 'create', '40', '--name', 'over TLS')
    assert created.returncode == 0, created.stderr
    run = created.stdout.strip()
    worked = taskfarm_command(env, 'work', run, '-j', '4', '--', 'true', '{}')
    assert worked.returncode == 0, worked.stderr
    info = taskfarm_command(env, 'info', run)
    assert info.returncode == 0 and 'over TLS' in info.stdout, info
    tasks = listed_tasks(site.api(), run)
    assert [(t['task'], t['status'], t['attempts']) for t in tasks] == [
        (n, 'done', 1) for n in range(40)]


def test_workers_through_nginx_get_every_task_exactly_once_across_both_servers(
        two_servers, proxy):
    site = proxy(two_servers)
    num_tasks, num_workers = 1500, 16
    api = site.api().token()
    run = create_run(api, num_tasks)
    tally = Tally()
    work_in_parallel([api.like() for _ in range(num_workers)], run, tally, seconds=120)
    assert_each_seen_once(tally.seen, set(range(num_tasks)))
    assert sorted(tally.reported) == list(range(num_tasks))
    # A 503 (with Retry-After, checked) is allowed: the hand-out may lose a
    # deadlock under contention three times over; the worker asks again.
    assert set(tally.statuses) <= {201, 204, 503} and tally.dropped == 0, tally.statuses
    info = run_info(api, run)
    assert (info['numDone'], info['numWaiting'], info['numComputing']) == (num_tasks, 0, 0)
    per_server = upstreams_used(site, 'PUT')
    assert len(per_server) == 2 and sum(per_server.values()) == num_tasks, per_server
    figure(f'{num_workers} workers through nginx over TLS, 2 servers: {num_tasks} tasks, '
           f'each handed out once ({len(tally.seen)} hand-outs, {len(set(tally.seen))} '
           f'distinct), done reports per server {sorted(per_server.values())}, '
           f'{tally.statuses[503]} answers 503 retried')


def established_from(ports: set[int]) -> set[int]:
    """Local ports of this machine's established TCP connections to those ports."""
    found = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == '01' and int(remote.rpartition(':')[2], 16) in ports:
                found.add(int(local.rpartition(':')[2], 16))
    return found


def test_keep_alive_through_nginx_one_client_connection_reused_upstream_connections(
        two_servers, proxy):
    site = proxy(two_servers)
    server_ports = {urlsplit(server.url).port for server in two_servers}
    api = site.api().token()
    run = create_run(api, 100)
    upstream: list[set[int]] = []
    for task in range(30):
        reply = api.call('PUT', f'/api/runs/{run}/tasks/{task}', {'percentCompleted': 50})
        assert reply.status == 204 and reply.headers['Connection'] == 'keep-alive', reply
        upstream.append(established_from(server_ports))
        if task == 0:
            client_socket = api.conn.sock
    assert api.conn.sock is client_socket           # one client connection all along
    nginx_saw = [line for line in site.access_log() if line[4] == 'PUT']
    assert len({line[1] for line in nginx_saw}) == 1                    # one connection...
    assert [int(line[2]) for line in nginx_saw] == list(range(2, 32))   # ...after the token's
    # Upstream, nginx kept one connection per server open and reused it.
    assert all(upstream), upstream
    assert len(set().union(*upstream)) == 2, upstream


def test_server_killed_behind_nginx_costs_retries_not_tasks(two_servers, proxy):
    site = proxy(two_servers)
    num_tasks, num_workers = 1000, 12
    api = site.api().token()
    run = create_run(api, num_tasks, timeout=5)     # what the dead server held comes back
    tally = Tally()

    def kill_one_server() -> None:
        wait_until(lambda: len(tally.reported) >= 200, 60, 'some tasks to be done')
        two_servers[0].stop(signal.SIGKILL)

    work_in_parallel([api.like() for _ in range(num_workers)], run, tally, seconds=150,
                     meanwhile=kill_one_server, until_complete=True)
    assert two_servers[0].process.poll() is not None and two_servers[1].process.poll() is None
    assert_each_seen_once(tally.seen, set(range(num_tasks)))
    info = run_info(api, run)
    assert (info['numDone'], info['numWaiting'], info['numComputing']) == (num_tasks, 0, 0)
    handed_again = [t['task'] for t in listed_tasks(api, run) if t['attempts'] > 1]
    answers = {status: count for status, count in tally.statuses.items() if status >= 300}
    assert set(answers) <= {503}, tally.statuses
    figure(f'one of 2 servers SIGKILLed behind nginx under {num_workers} workers: {num_tasks} '
           f'tasks, each seen by one worker; retries: {tally.statuses[503]} answers 503, '
           f'{tally.dropped} requests unanswered; tasks handed out again '
           f'after their lease (held by the dead server\'s lost answers): {len(handed_again)}')


def test_behind_trusted_nginx_the_throttle_counts_the_real_client_address(
        database_url, servers, proxy):
    if not database_url.startswith('postgresql'):
        pytest.skip('the proxy tests run on PostgreSQL')
    server = servers(env={'TASKFARM_TRUSTED_PROXIES': '127.0.0.1',
                          'TASKFARM_LOGIN_MAX_FAILURES': '3',
                          'TASKFARM_AUTH_CACHE_SECONDS': '0'})   # every login checked
    site = proxy([server])
    attacker = site.api('bob', password='wrong', source='127.0.0.3')
    statuses = [attacker.call('GET', '/api/token', headers={'X-Forwarded-For': f'127.0.1.{n}'}
                              ).status for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    alice = site.api('alice', source='127.0.0.4').token()      # elsewhere: not throttled
    assert site.api('alice', source='127.0.0.3').call('GET', '/api/runs').status == 429
    assert alice.like(source='127.0.0.3').call('GET', '/api/runs').status == 200   # a token
    wait_until(lambda: server_log_has(server, "address '127.0.0.3'"), 10, 'the throttle log')
    assert not server_log_has(server, "address '127.0.0.1'")    # not the proxy's
    assert not server_log_has(server, '127.0.1.')               # nor what the client claimed


# ---------------------------------------------------------------------------
# 5. PostgreSQL failover: a primary and a synchronous streaming standby.

REPLICATION = 'SELECT state, sync_state FROM pg_stat_replication'


@pytest.fixture
def primary_and_standby(postgres_clusters):
    """A seeded primary, and a standby streaming from it, synchronously."""
    primary = postgres_clusters('primary')
    standby = postgres_clusters('standby', standby_of=primary)
    wait_until(lambda: primary.query(REPLICATION) == [('streaming', 'async')], 30,
               'the standby to stream')
    # Only now: with no standby connected, a commit would wait for one.
    primary.query("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.query('SELECT pg_reload_conf()')
    wait_until(lambda: primary.query(REPLICATION) == [('streaming', 'sync')], 30,
               'the standby to be synchronous')
    return primary, standby


def test_failover_to_a_synchronous_standby_answers_503_meanwhile_and_loses_nothing(
        primary_and_standby, launch):
    primary, standby = primary_and_standby
    both = (f'postgresql://root@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres'
            '?target_session_attrs=read-write')
    server = launch(both, env={'TASKFARM_DB_TIMEOUT': '2'})
    api = Api(server.url, server.user, server.password).token()
    run = create_run(api, 10**6)
    tally, stop, moments, workers = Tally(), threading.Event(), {}, 8

    def fail_over() -> None:
        wait_until(lambda: len(tally.reported) >= 200, 60, 'the workers to be at work')
        moments['stopped'] = time.monotonic()
        primary.pg_ctl('-m', 'immediate', 'stop')
        # As a failover manager would take a while to decide: a few 503s each.
        wait_until(lambda: tally.statuses[503] >= 3 * workers, 60,
                   'the workers to get 503s while there is no primary')
        standby.pg_ctl('promote')
        moments['promoted'] = time.monotonic()
        reported = len(tally.reported)
        wait_until(lambda: len(tally.reported) >= reported + 200, 60,
                   'the workers to get on with the new primary')
        stop.set()

    work_in_parallel([api.like() for _ in range(workers)], run, tally, seconds=150,
                     meanwhile=fail_over, stop=stop)

    assert server.process.poll() is None                    # it served again by itself
    assert set(tally.statuses) <= {201, 204, 503} and tally.dropped == 0, tally.statuses
    assert_each_seen_once(tally.seen, set(tally.seen))      # no task to two workers
    tasks = listed_tasks(api, run)                          # from the new primary
    assert all(task['attempts'] == 1 for task in tasks)     # none handed out twice
    done = {task['task'] for task in tasks if task['status'] == 'done'}
    lost = sorted(set(tally.reported) - done)
    assert not lost, f'done reports answered 204 but lost in the failover: {lost[:20]}'
    stranded = [task['task'] for task in tasks if task['status'] == 'computing']
    assert not set(stranded) & set(tally.seen)              # only hand-outs never answered

    unavailable = [when for when, status in tally.timeline if status == 503]
    recovered = min(when for when, status in tally.timeline
                    if when > moments['promoted'] and 200 <= status < 300)
    figure(f'failover under {workers} workers: primary stopped (immediate) at 0 s, first 503 at '
           f'{unavailable[0] - moments["stopped"]:.2f} s, standby promoted at '
           f'{moments["promoted"] - moments["stopped"]:.2f} s, served again '
           f'{recovered - moments["promoted"]:.2f} s after the promotion; 503 window '
           f'{unavailable[-1] - unavailable[0]:.2f} s ({len(unavailable)} answers 503); '
           f'{len(tally.reported)} done reports answered, none lost; {len(tally.seen)} '
           f'hand-outs, none twice; {len(stranded)} tasks left computing by hand-outs '
           f'whose answer was a 503')


# ---------------------------------------------------------------------------
# The image: what the Dockerfile copies is all the server needs.


def dockerfile_copies() -> list[str]:
    """The files the Dockerfile's COPY line puts into the image."""
    text = (HERE / 'Dockerfile').read_text()
    lines = [line.split()[1:-1] for line in text.splitlines() if line.startswith('COPY ')]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_image_gets_every_file_the_server_and_admin_need(tmp_path):
    """pip install (as the Dockerfile does) of exactly the files it copies; then
    the admin command sets up a database and the app starts on it."""
    source, prefix = tmp_path / 'app', tmp_path / 'prefix'
    source.mkdir()
    for name in dockerfile_copies():
        shutil.copy(HERE / name, source / name)
    modules = re.search(r'py-modules = \[(.*?)\]', (HERE / 'pyproject.toml').read_text())
    assert {f'{name.strip(chr(34))}.py' for name in modules[1].split(', ')} <= set(
        dockerfile_copies())
    # --ignore-installed: else pip uninstalls the checkout's own editable
    # install from the test's venv before installing into the prefix.
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                    '--ignore-installed', '--prefix', str(prefix), str(source)],
                   check=True, timeout=300, capture_output=True)
    site = next(prefix.glob('lib/python*/site-packages'))
    env = {**os.environ, 'PYTHONPATH': str(site), 'DATABASE_URL': f'sqlite:///{tmp_path}/x.db'}
    check = ('import admin, taskfarm; admin.main(["init-db"]); '
             'print(taskfarm.get_app() is not None, taskfarm.__file__)')
    done = subprocess.run([sys.executable, '-c', check], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ['database', 'ready'], done.stdout
    assert done.stdout.split()[2] == 'True' and str(site) in done.stdout, done.stdout
