"""Deployment (issue 14), tested for real: login throttling and the client's
address (X-Forwarded-For believed only from trusted proxies), through the
API and on live servers, and what a password-guessing attacker costs the
server's CPU with and without it.

The figures are printed: `pytest test_deploy.py -s` shows them. Every wait
is bounded; timings are measured and shown, never asserted.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import falcon.testing
import pytest
import webtest

import taskfarm
from conftest import PASSWORDS, LiveServer, seeded, start_server

HTTP_TIMEOUT = 10           # seconds, on every HTTP call


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

    def __init__(self, url: str, user: str = 'alice', password: str | None = None,
                 context: ssl.SSLContext | None = None, source: str | None = None) -> None:
        parts = urlsplit(url)
        self.url, self.https = url, parts.scheme == 'https'
        self.host, self.port = parts.hostname, parts.port
        self.user = user
        self.password = PASSWORDS.get(user, '') if password is None else password
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
def throttled_app(db: taskfarm.Database, config: taskfarm.Config):
    """3 failures per 60 s; no password cache, so that every login is checked."""
    return taskfarm.create_app(db, dataclasses.replace(
        config, login_max_failures=3, login_window=60, auth_cache_seconds=0))


def client(app: Any, user: str, password: str | None = None,
           address: str = ELSEWHERE) -> webtest.TestApp:
    browser = webtest.TestApp(app, extra_environ={'REMOTE_ADDR': address})
    browser.authorization = ('Basic', (user, PASSWORDS[user] if password is None else password))
    return browser


def guess(app: Any, times: int, user: str = 'bob', address: str = ATTACKER) -> list[int]:
    attacker = client(app, user, 'wrong', address)
    return [attacker.get('/api/token', expect_errors=True).status_int for _ in range(times)]


def test_wrong_passwords_get_429_with_retry_after_and_no_more_checks(throttled_app):
    assert guess(throttled_app, 5) == [401, 401, 401, 429, 429]
    reply = client(throttled_app, 'bob', address=ATTACKER).get('/api/token', status=429)
    # The right password gets 429 too: it is not even checked.
    assert reply.json['title'] == 'Too many failed logins'
    assert 55 <= int(reply.headers['Retry-After']) <= 60


def test_throttle_spares_other_users_other_addresses_known_logins_and_tokens(throttled_app):
    bob_at_desk = client(throttled_app, 'bob', address=BOBS_DESK)
    token = bob_at_desk.get('/api/token', status=200).json['token']   # bob logged in here before
    assert guess(throttled_app, 4) == [401, 401, 401, 429]

    client(throttled_app, 'alice', address=ELSEWHERE).get('/api/token', status=200)
    bob_at_desk.get('/api/runs', status=200)
    client(throttled_app, 'bob', address=ELSEWHERE).get('/api/runs', status=429)
    client(throttled_app, 'alice', address=ATTACKER).get('/api/runs', status=429)
    tokened = webtest.TestApp(throttled_app, extra_environ={'REMOTE_ADDR': ATTACKER})
    tokened.authorization = ('Basic', (token, ''))
    tokened.get('/api/runs', status=200)


def test_throttle_lets_checks_through_again_once_the_window_is_over(db, config):
    app = taskfarm.create_app(db, dataclasses.replace(
        config, login_max_failures=2, login_window=1, auth_cache_seconds=0))
    assert guess(app, 3) == [401, 401, 429]
    bob = client(app, 'bob', address=ATTACKER)
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


def server_log_has(server: LiveServer, text: str) -> bool:
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
    assert Api(server.url, 'alice', source='127.0.0.6').call('GET', '/api/token').status == 200
    wait_until(lambda: server_log_has(server, "address '127.0.0.5'"), 10, 'the throttle log')
    assert not server_log_has(server, '127.0.1.')


@pytest.fixture
def sqlite_url(tmp_path: Path, password_hashes: dict[str, str]) -> str:
    return seeded(f'sqlite:///{tmp_path / "taskfarm.db"}', password_hashes)


@pytest.fixture
def launch() -> Iterator[Callable[..., LiveServer]]:
    """start_server on any database; every server stopped at the end."""
    started: list[LiveServer] = []

    def start(database_url: str, **kwargs: Any) -> LiveServer:
        started.append(start_server(database_url, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def attack(server: LiveServer, connections: int, seconds: float) -> tuple[Counter, float, float]:
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


def test_throttled_attacker_no_longer_costs_a_password_check_per_guess(sqlite_url, launch):
    connections, seconds, max_failures = 8, 3.0, 5
    unthrottled = launch(sqlite_url, env={'TASKFARM_LOGIN_MAX_FAILURES': '0'})
    before, cores_before, wall_before = attack(unthrottled, connections, seconds)
    unthrottled.stop()
    throttled = launch(sqlite_url, env={'TASKFARM_LOGIN_MAX_FAILURES': str(max_failures)})
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
