"""Fixtures shared by the test files: a database per backend, the WSGI app
under webtest, and live waitress servers on real sockets.

The PostgreSQL tests run when TASKFARM_TEST_DATABASE_URL points at a server
(e.g. postgresql://root@127.0.0.1:5432/postgres): the session creates a fresh
database there and drops it at the end. Without it they are skipped.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import webtest

import taskfarm

HERE = Path(__file__).resolve().parent
PG_URL = os.environ.get('TASKFARM_TEST_DATABASE_URL')
SECRET = 'test-secret-' + secrets.token_hex(8)
PASSWORDS = {'alice': 'alice-pw', 'bob': 'bob-pw', 'root': 'root-pw'}
if os.environ.get('CI') and not PG_URL:
    raise RuntimeError('CI must test PostgreSQL: set TASKFARM_TEST_DATABASE_URL')

BACKENDS = [
    'sqlite',
    pytest.param('postgresql', marks=pytest.mark.skipif(
        not PG_URL, reason='PostgreSQL tests need TASKFARM_TEST_DATABASE_URL')),
]

ADD_USER = """
    INSERT INTO users (username, password_hash, token_stamp, is_admin)
    VALUES (:username, :password_hash, :token_stamp, :is_admin)
"""
TABLES = 'tasks, run_stats, run_frontier, runs, workers, users, settings'


@pytest.fixture(scope='session')
def password_hashes() -> dict[str, str]:
    """Hashing is slow on purpose; hash each test password once."""
    return {name: taskfarm.hash_password(pw) for name, pw in PASSWORDS.items()}


@pytest.fixture(scope='session')
def pg_database_url() -> str:
    """A fresh PostgreSQL database for this test session."""
    import psycopg

    name = f'taskfarm_test_{os.getpid()}_{secrets.token_hex(4)}'
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE {name}')
    yield urlsplit(PG_URL)._replace(path='/' + name).geturl()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def seed(db: taskfarm.Database, password_hashes: dict[str, str]) -> None:
    """Tables, secret and the three test users: alice, bob and root (admin)."""
    taskfarm.init_db(db)
    for name, password_hash in password_hashes.items():
        db.execute(ADD_USER, {'username': name, 'password_hash': password_hash,
                              'token_stamp': secrets.token_hex(8),
                              'is_admin': name == 'root'})


def empty_database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == 'sqlite':
        return f'sqlite:///{tmp_path / "taskfarm.db"}'
    url = request.getfixturevalue('pg_database_url')
    db = taskfarm.open_database(taskfarm.Config(database_url=url))
    try:
        db.script(taskfarm.schema_for('postgresql'))
        db.execute(f'TRUNCATE {TABLES} RESTART IDENTITY CASCADE')
    finally:
        db.close()
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path,
                 password_hashes: dict[str, str]) -> str:
    """A seeded, otherwise empty database of each backend."""
    return seeded(empty_database_url(request.param, tmp_path, request), password_hashes)


def seeded(url: str, password_hashes: dict[str, str]) -> str:
    """The database at url, seeded (see seed)."""
    db = taskfarm.open_database(taskfarm.Config(database_url=url))
    try:
        seed(db, password_hashes)
    finally:
        db.close()
    return url


@pytest.fixture
def config(database_url: str) -> taskfarm.Config:
    return taskfarm.Config(database_url=database_url, secret=SECRET,
                           auth_cache_seconds=60, db_timeout=2)


@pytest.fixture
def db(config: taskfarm.Config) -> taskfarm.Database:
    database = taskfarm.open_database(config)
    yield database
    database.close()


def user_app(app: object, name: str) -> webtest.TestApp:
    client = webtest.TestApp(app)
    client.authorization = ('Basic', (name, PASSWORDS[name]))
    return client


@pytest.fixture
def app(db: taskfarm.Database, config: taskfarm.Config):
    return taskfarm.create_app(db, config)


@pytest.fixture
def alice(app) -> webtest.TestApp:
    return user_app(app, 'alice')


@pytest.fixture
def bob(app) -> webtest.TestApp:
    return user_app(app, 'bob')


@pytest.fixture
def root(app) -> webtest.TestApp:
    return user_app(app, 'root')


# ---------------------------------------------------------------------------
# Live servers.


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    database_url: str
    user: str = 'alice'
    password: str = PASSWORDS['alice']
    output: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.url + '/api/'

    def stop(self, sig: int = 15) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_server(database_url: str, workers: int = 1, threads: int = 8,
                 port: int = 0, env: dict | None = None) -> LiveServer:
    """Start `taskfarm.py` on a free port and wait until it serves."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / 'taskfarm.py'), '--host', '127.0.0.1',
         '--port', str(port), '--workers', str(workers), '--threads', str(threads)],
        env={**os.environ, 'DATABASE_URL': database_url, 'TASKFARM_SECRET': SECRET,
             **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()    # the server prints its address first
    if 'serving on ' not in line:
        process.kill()
        raise RuntimeError(f'server did not start: {line}{process.stdout.read()}')
    url = line.split('serving on ')[1].split()[0]
    server = LiveServer(process, url, database_url)
    # Keep reading its output, so that a full pipe never blocks the server.
    threading.Thread(target=server.output.extend, args=(process.stdout,), daemon=True).start()
    wait_until_serving(url)
    return server


def wait_until_serving(url: str, deadline_seconds: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            with urllib.request.urlopen(url + '/', timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)    # polling for readiness, bounded by the deadline


@pytest.fixture
def servers(database_url: str):
    """A factory of live servers on this test's database; all stopped at the end."""
    started: list[LiveServer] = []

    def start(**kwargs) -> LiveServer:
        server = start_server(kwargs.pop('database_url', database_url), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def live_server(servers) -> LiveServer:
    """One live waitress server on a seeded database of each backend."""
    return servers()
