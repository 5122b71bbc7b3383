"""Fixtures shared by the test files: a database per backend, the WSGI app
under webtest, and live waitress servers on real sockets.

The PostgreSQL tests run when TASKFARM_TEST_DATABASE_URL points at a server
(e.g. postgresql://root@127.0.0.1:5432/postgres): the session creates a fresh
database there and drops it at the end. Without it they are skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import webtest

import admin
import store
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

TABLES = ('attempts, claims, task_inputs, tasks, run_stats, run_frontier, runs, workers, '
          'users, settings')


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


def seed(tf: store.Store, password_hashes: dict[str, str]) -> None:
    """Tables, secret and the three test users: alice, bob and root (admin)."""
    tf.init()
    for name, password_hash in password_hashes.items():
        admin.create_user(tf, name, password_hash, admin=name == 'root')


def empty_database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == 'sqlite':
        return f'sqlite:///{tmp_path / "taskfarm.db"}'
    url = request.getfixturevalue('pg_database_url')
    db = store.open_database(url)
    try:
        db.script(store.schema_for('postgresql'))
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
    tf = store.Store(store.open_database(url))
    try:
        seed(tf, password_hashes)
    finally:
        tf.close()
    return url


@pytest.fixture
def postgresql_database_url(request: pytest.FixtureRequest, tmp_path: Path,
                            password_hashes: dict[str, str]) -> str:
    """A seeded, otherwise empty PostgreSQL database, for PostgreSQL's own
    behaviour; the test is skipped without one."""
    if not PG_URL:
        pytest.skip('PostgreSQL tests need TASKFARM_TEST_DATABASE_URL')
    return seeded(empty_database_url('postgresql', tmp_path, request), password_hashes)


@pytest.fixture
def config(database_url: str) -> taskfarm.Config:
    return taskfarm.Config(database_url=database_url, secret=SECRET,
                           auth_cache_seconds=60, db_timeout=2)


@pytest.fixture
def tf_store(config: taskfarm.Config) -> store.Store:
    """The store of each test's database."""
    opened = taskfarm.open_store(config)
    yield opened
    opened.close()


@pytest.fixture
def db(tf_store: store.Store) -> store.Database:
    """The database under the store, for tests that look at rows directly."""
    return tf_store.db


class User(webtest.TestApp):
    """A webtest client signed in as one user, with the calls tests make most."""

    def create_run(self, num_tasks: int = 10, status: int = 201, **extra: Any) -> dict:
        return self.post_json('/api/run', {'numTasks': num_tasks, **extra}, status=status).json

    def register_worker(self, uuid: str = 'w1', hostname: str = 'node1', pid: int = 42) -> str:
        self.post_json('/api/worker', {'uuid': uuid, 'hostname': hostname, 'pid': pid},
                       status=201)
        return uuid

    def claim(self, run: str, worker: str, status: int = 201) -> webtest.TestResponse:
        return self.post_json(f'/api/runs/{run}/task', {'worker_uuid': worker}, status=status)

    def claim_tasks(self, run: str, worker: str, status: int = 200,
                    **body: Any) -> webtest.TestResponse:
        return self.post_json(f'/api/runs/{run}/tasks/claim', {'worker_uuid': worker, **body},
                              status=status)

    def run_info(self, run: str) -> dict:
        return self.get(f'/api/runs/{run}').json

    def put_task(self, run: str, task: int, body: dict,
                 status: int = 204) -> webtest.TestResponse:
        return self.put_json(f'/api/runs/{run}/tasks/{task}', body, status=status)


def user_app(app: object, name: str) -> User:
    client = User(app)
    client.authorization = ('Basic', (name, PASSWORDS[name]))
    return client


@pytest.fixture
def app(tf_store: store.Store, config: taskfarm.Config):
    return taskfarm.create_app(tf_store, config)


@pytest.fixture
def alice(app) -> User:
    return user_app(app, 'alice')


@pytest.fixture
def bob(app) -> User:
    return user_app(app, 'bob')


@pytest.fixture
def root(app) -> User:
    return user_app(app, 'root')


@pytest.fixture
def sign_in(app):
    """A client of the app signed in as any test user: sign_in('bob')."""
    return lambda name: user_app(app, name)


# ---------------------------------------------------------------------------
# Live servers.


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    database_url: str
    user: str = 'alice'
    password: str = PASSWORDS['alice']
    banner: str = ''            # the first line it printed: where and how it serves
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


def start_server(database_url: str, workers: int | None = 1, threads: int = 8,
                 port: int = 0, env: dict | None = None) -> LiveServer:
    """Start `taskfarm.py` on a free port and wait until it serves.

    workers=None leaves the number of processes to the server's default.
    """
    processes = [] if workers is None else ['--workers', str(workers)]
    process = subprocess.Popen(
        [sys.executable, str(HERE / 'taskfarm.py'), '--host', '127.0.0.1',
         '--port', str(port), '--threads', str(threads), *processes],
        env={**os.environ, 'DATABASE_URL': database_url, 'TASKFARM_SECRET': SECRET,
             **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()    # the server prints its address first
    if 'serving on ' not in line:
        process.kill()
        raise RuntimeError(f'server did not start: {line}{process.stdout.read()}')
    url = line.split('serving on ')[1].split()[0]
    server = LiveServer(process, url, database_url, banner=line)
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


# ---------------------------------------------------------------------------
# Databases for tests that need more than one, or one without tables.


@pytest.fixture
def passwords() -> dict[str, str]:
    """The test users' passwords: alice, bob and root (an admin)."""
    return dict(PASSWORDS)


@pytest.fixture
def seed_database(password_hashes: dict[str, str]) -> Callable[[str], str]:
    """Seeds (tables, secret, the test users) the database at a URL: seed_database(url)."""
    return lambda url: seeded(url, password_hashes)


@pytest.fixture
def sqlite_database_url(tmp_path: Path, seed_database: Callable[[str], str]) -> str:
    """A seeded sqlite database, whatever the backend of the test."""
    return seed_database(f'sqlite:///{tmp_path / "taskfarm.db"}')


@pytest.fixture(params=BACKENDS)
def uninitialised_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """sqlite: a new file without tables; PostgreSQL: tables but no stored secret."""
    return empty_database_url(request.param, tmp_path, request)


# ---------------------------------------------------------------------------
# Throwaway PostgreSQL clusters of a test's own, to stop, restart and fail
# over at will (never the shared one).


def postgres_program(name: str) -> str:
    """A PostgreSQL server program's path; without it the test is skipped, or
    fails under CI."""
    found = sorted(glob.glob(f'/usr/lib/postgresql/*/bin/{name}'))
    path = shutil.which(name) or (found[-1] if found else None)
    if path is None:
        why = f'needs {name}: apt-get install postgresql, as .ci/run does'
        if os.environ.get('CI'):
            pytest.fail(why)
        pytest.skip(why)
    return path


def cluster_owner() -> tuple[list[str], int, int]:
    """How to run the cluster programs, which refuse root: as the postgres
    user when we are root (a command prefix, its uid and gid)."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    try:
        owner = pwd.getpwnam('postgres')
    except KeyError:
        pytest.skip('running as root, and there is no postgres user to own a cluster')
    runuser = shutil.which('runuser')
    if runuser is None:
        pytest.skip('running as root, and there is no runuser to run initdb as postgres')
    return [runuser, '-u', 'postgres', '--'], owner.pw_uid, owner.pw_gid


def run_checked(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f'{command} failed:\n{done.stdout}{done.stderr}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster in directory/name, on its own port."""
    directory: Path
    name: str
    port: int
    as_owner: list[str]     # the command prefix that runs a program as the cluster's owner

    @property
    def data(self) -> Path:
        return self.directory / self.name

    @property
    def url(self) -> str:
        return f'postgresql://root@127.0.0.1:{self.port}/postgres'

    def pg_ctl(self, *args: str) -> None:
        run_checked([*self.as_owner, postgres_program('pg_ctl'), '-D', str(self.data),
                     '-w', '-t', '30', *args], self.directory)

    def initdb(self) -> None:
        run_checked([*self.as_owner, postgres_program('initdb'), '-D', str(self.data),
                     '-U', 'root', '--auth=trust', '--no-sync', '-E', 'UTF8'], self.directory)

    def copy_of(self, primary: Cluster) -> None:
        """A base backup of primary that streams from it once started."""
        run_checked([*self.as_owner, postgres_program('pg_basebackup'), '-d', primary.url,
                     '-D', str(self.data), '-R', '-X', 'stream', '-c', 'fast', '--no-sync'],
                    self.directory)

    def start(self) -> None:
        options = (f'-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 '
                   '-c fsync=off')
        self.pg_ctl('-l', f'{self.data}.log', '-o', options, 'start')

    def stop(self, mode: str = 'fast') -> None:
        self.pg_ctl('-m', mode, 'stop')

    def restart(self, mode: str = 'fast') -> None:
        """Stop and start again, with the options of the last start."""
        self.pg_ctl('-l', f'{self.data}.log', '-m', mode, 'restart')

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture
def postgres_clusters(seed_database: Callable[[str], str]) -> Iterator[Callable[..., Cluster]]:
    """A factory of throwaway clusters, all stopped and removed at the end:
    postgres_clusters(name) is a new cluster, started and seeded;
    postgres_clusters(name, standby_of=primary) a standby streaming from primary."""
    as_owner, uid, gid = cluster_owner()
    directory = Path(tempfile.mkdtemp(prefix='taskfarm-pg-'))
    os.chown(directory, uid, gid)
    made: list[Cluster] = []

    def make(name: str, standby_of: Cluster | None = None) -> Cluster:
        cluster = Cluster(directory, name, free_port(), as_owner)
        made.append(cluster)
        if standby_of is None:
            cluster.initdb()
            cluster.start()
            seed_database(cluster.url)
        else:
            cluster.copy_of(standby_of)
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            subprocess.run([*as_owner, postgres_program('pg_ctl'), '-D', str(cluster.data),
                            '-m', 'immediate', 'stop'], capture_output=True, timeout=30,
                           check=False)
        shutil.rmtree(directory, ignore_errors=True)
