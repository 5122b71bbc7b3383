"""Taskfarm: a task-farm server.

A run has N numbered tasks; independent workers ask this server for the next
task number, report progress and mark tasks done. The database hands out the
tasks: every hand-out is one atomic SQL statement, so any number of server
processes can share one PostgreSQL database.

Layout, top-down: configuration, SQL, the database object, auth, request
validation, resources, the app factory, and the `taskfarm-server` command.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple
from uuid import uuid4

import falcon

__version__ = '0.5.0'

# ---------------------------------------------------------------------------
# Configuration: every environment variable, with its default, in one place.


@dataclass(frozen=True)
class Config:
    database_url: str = 'sqlite:///taskfarm.db'
    secret: str | None = None           # else the one init-db stored
    token_ttl: int = 7 * 24 * 3600      # seconds a token stays valid
    auth_cache_seconds: float = 2.0     # revoked users/tokens die within this
    db_timeout: float = 5.0             # wait for a lock or a pooled connection
    pool_size: int = 10                 # PostgreSQL connections per process
    trusted_proxies: tuple[IPNetwork, ...] = ()   # whose X-Forwarded-For is believed
    login_max_failures: int = 5         # failed password checks per name or address...
    login_window: float = 60.0          # ...within this many seconds, then 429 as long

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get('DATABASE_URL') or cls.database_url,
            secret=env.get('TASKFARM_SECRET') or None,
            token_ttl=int(env.get('TASKFARM_TOKEN_TTL', cls.token_ttl)),
            auth_cache_seconds=float(
                env.get('TASKFARM_AUTH_CACHE_SECONDS', cls.auth_cache_seconds)),
            db_timeout=float(env.get('TASKFARM_DB_TIMEOUT', cls.db_timeout)),
            pool_size=int(env.get('TASKFARM_POOL_SIZE', cls.pool_size)),
            trusted_proxies=trusted_networks(env.get('TASKFARM_TRUSTED_PROXIES', '')),
            login_max_failures=int(
                env.get('TASKFARM_LOGIN_MAX_FAILURES', cls.login_max_failures)),
            login_window=float(env.get('TASKFARM_LOGIN_WINDOW', cls.login_window)),
        )


MAX_INT = 2**31 - 1
MAX_BODY_BYTES = 64 * 1024
STATUSES = ('waiting', 'computing', 'done', 'failed')
UUID_RE = re.compile(r'[0-9a-f]{32}')
UNPAIRED_SURROGATE_RE = re.compile(r'[\ud800-\udfff]')
RETRY_AFTER_SECONDS = 2

# ---------------------------------------------------------------------------
# SQL. Placeholders are written `:name`; the database object adapts them.
# Where PostgreSQL and sqlite differ, both versions stand side by side.


class Dialects(NamedTuple):
    postgresql: str
    sqlite: str


OWNED = '(owner_id = :user_id OR :is_admin)'

CREATE_RUN = """
    INSERT INTO runs (uuid, owner_id, num_tasks, name, timeout, max_attempts, created)
    VALUES (:uuid, :user_id, :num_tasks, :name, :timeout, :max_attempts, :now)
    RETURNING id
"""

LIST_RUNS = f"""
    SELECT id, uuid, num_tasks, name FROM runs
    WHERE {OWNED}
    ORDER BY id
"""

FIND_RUN = f"""
    SELECT id, num_tasks FROM runs
    WHERE uuid = :run AND {OWNED}
"""

# A run's counts: its run_stats rows (alias s) added up; the API and the
# dashboard both read them so.
RUN_COUNTS = """
           CAST(sum(s.computing) AS integer) AS computing,
           CAST(sum(s.done) AS integer) AS done,
           CAST(sum(s.failed) AS integer) AS failed,
           sum(s.percent) AS percent"""

RUN_STATUS = f"""
    SELECT r.id, r.uuid, r.num_tasks, r.name, r.timeout, r.max_attempts, {RUN_COUNTS}
    FROM runs r JOIN run_stats s ON s.run_id = r.id
    WHERE r.uuid = :run AND {OWNED}
    GROUP BY r.id
"""

# A delete first takes the run's frontier rows, in the order hand-outs take
# them: otherwise a hand-out holding one and waiting for the run's row (to
# insert its task) deadlocks with the delete cascading to that frontier row.
LOCK_FRONTIER = Dialects(
    postgresql="""
    SELECT f.shard FROM run_frontier f JOIN runs r ON r.id = f.run_id
    WHERE r.uuid = :run AND (r.owner_id = :user_id OR :is_admin)
    FOR UPDATE OF f
    """,
    sqlite='SELECT 1',   # the transaction already holds sqlite's one write lock
)

DELETE_RUN = f"""
    DELETE FROM runs
    WHERE uuid = :run AND {OWNED}
    RETURNING id
"""

RESTART_UNFINISHED = """
    UPDATE tasks
    SET status = 'waiting', attempts = 0, worker_id = NULL, lease_expires = NULL
    WHERE run_id = :run_id AND status <> 'done'
"""

RESTART_ALL = """
    UPDATE tasks
    SET status = 'waiting', percent = 0, attempts = 0, worker_id = NULL,
        lease_expires = NULL
    WHERE run_id = :run_id
"""

# The hand-out. Order: rows that are waiting (or whose lease ran out),
# lowest number first; else the next number never handed out.
#
# Fresh numbers come from the run's 8 frontier rows (run_frontier): row s
# hands out s, s + 8, s + 16, ... A hand-out takes the frontier row with the
# lowest next number, so numbers go out in order, yet up to 8 hand-outs of
# one run proceed at once instead of queueing on a single hot row.
FRONTIER_SHARDS = 8


def claim_statement(frontier_order: str, frontier_lock: str) -> str:
    """The PostgreSQL hand-out, with a choice of how to take a frontier row."""
    return f"""
    WITH worker AS (
        SELECT id FROM workers WHERE uuid = :worker AND {OWNED}
    ), run AS (
        SELECT id, num_tasks, timeout, max_attempts FROM runs
        WHERE uuid = :run AND {OWNED} AND EXISTS (SELECT 1 FROM worker)
    ), exhausted AS (
        UPDATE tasks SET status = 'failed', updated = :now
        FROM run
        WHERE tasks.run_id = run.id AND tasks.status = 'computing'
          AND tasks.lease_expires < :now AND tasks.attempts >= run.max_attempts
    ), waiting AS (
        SELECT t.id, t.task FROM tasks t, run
        WHERE t.run_id = run.id AND t.status = 'waiting'
        ORDER BY t.task LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
    ), expired AS (
        SELECT t.id, t.task FROM tasks t, run
        WHERE t.run_id = run.id AND t.status = 'computing'
          AND t.lease_expires IS NOT NULL AND t.lease_expires < :now
          AND (run.max_attempts IS NULL OR t.attempts < run.max_attempts)
        ORDER BY t.lease_expires LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
    ), reclaim AS (
        SELECT id FROM (SELECT * FROM waiting UNION ALL SELECT * FROM expired) c
        ORDER BY task LIMIT 1
    ), claimed AS (
        UPDATE tasks
        SET status = 'computing', worker_id = (SELECT id FROM worker),
            attempts = tasks.attempts + 1, started = :now, updated = :now,
            lease_expires = :now + run.timeout
        FROM run, reclaim
        WHERE tasks.id = reclaim.id
        RETURNING tasks.id, tasks.task, tasks.percent, tasks.attempts
    ), frontier AS (
        SELECT f.run_id, f.shard FROM run_frontier f, run
        WHERE f.run_id = run.id AND f.next_task < run.num_tasks
          AND NOT EXISTS (SELECT 1 FROM reclaim)
        ORDER BY {frontier_order} LIMIT 1
        {frontier_lock}
    ), fresh AS (
        UPDATE run_frontier f SET next_task = f.next_task + {FRONTIER_SHARDS}
        FROM frontier
        WHERE f.run_id = frontier.run_id AND f.shard = frontier.shard
        RETURNING f.run_id, f.next_task - {FRONTIER_SHARDS} AS task
    ), created AS (
        INSERT INTO tasks (run_id, task, status, worker_id, attempts, started,
                           updated, lease_expires)
        SELECT fresh.run_id, fresh.task, 'computing', (SELECT id FROM worker), 1,
               :now, :now, :now + run.timeout
        FROM fresh, run
        ON CONFLICT (run_id, task) DO UPDATE
        SET status = 'computing', worker_id = EXCLUDED.worker_id,
            attempts = tasks.attempts + 1, started = :now, updated = :now,
            lease_expires = EXCLUDED.lease_expires
        WHERE tasks.status = 'waiting'
        RETURNING id, task, percent, attempts
    )
    SELECT id, task, percent, attempts FROM claimed
    UNION ALL SELECT id, task, percent, attempts FROM created
    UNION ALL SELECT NULL, task, NULL, NULL FROM fresh
              WHERE NOT EXISTS (SELECT 1 FROM created)
    UNION ALL SELECT NULL, NULL, NULL, NULL FROM run
              WHERE NOT EXISTS (SELECT 1 FROM reclaim)
                AND NOT EXISTS (SELECT 1 FROM frontier)
                AND EXISTS (SELECT 1 FROM run_frontier f
                            WHERE f.run_id = run.id AND f.next_task < run.num_tasks)
    """


CLAIM_TASK = Dialects(
    # One statement, atomic across any number of server processes: rows are
    # taken under FOR UPDATE SKIP LOCKED, so two hand-outs never take the
    # same task nor wait on each other. The answer is the task, or a marker
    # row: (NULL, n) "number n already had a row that a PUT finished:
    # stepped over, ask again"; (NULL, NULL) "every frontier row was busy".
    postgresql=claim_statement('f.next_task', 'FOR UPDATE OF f SKIP LOCKED'),
    # sqlite has no data-modifying CTEs; the same steps run as statements in
    # one BEGIN IMMEDIATE transaction, atomic because sqlite has one writer.
    # INDEXED BY: once ANALYZE has run, sqlite would rather walk the whole
    # (run_id, task) index in task order (62 ms at 10^6 tasks, not 0.1 ms).
    sqlite=f"""
    SELECT r.id AS run_id, r.num_tasks, r.timeout, r.max_attempts, w.id AS worker_id
    FROM runs r, workers w
    WHERE r.uuid = :run AND (r.owner_id = :user_id OR :is_admin)
      AND w.uuid = :worker AND (w.owner_id = :user_id OR :is_admin);

    UPDATE tasks SET status = 'failed', updated = :now
    WHERE run_id = :run_id AND status = 'computing'
      AND lease_expires IS NOT NULL AND lease_expires < :now
      AND attempts >= :max_attempts;

    UPDATE tasks
    SET status = 'computing', worker_id = :worker_id, attempts = attempts + 1,
        started = :now, updated = :now, lease_expires = :now + :timeout
    WHERE id = (
        SELECT id FROM (
            SELECT * FROM (SELECT id, task FROM tasks INDEXED BY tasks_waiting
                           WHERE run_id = :run_id AND status = 'waiting'
                           ORDER BY task LIMIT 1)
            UNION ALL
            SELECT * FROM (SELECT id, task FROM tasks INDEXED BY tasks_leased
                           WHERE run_id = :run_id AND status = 'computing'
                             AND lease_expires IS NOT NULL AND lease_expires < :now
                             AND (:max_attempts IS NULL OR attempts < :max_attempts)
                           ORDER BY lease_expires LIMIT 1)
        ) ORDER BY task LIMIT 1)
    RETURNING id, task, percent, attempts;

    UPDATE run_frontier SET next_task = next_task + {FRONTIER_SHARDS}
    WHERE run_id = :run_id AND shard = (
        SELECT shard FROM run_frontier
        WHERE run_id = :run_id AND next_task < :num_tasks
        ORDER BY next_task LIMIT 1)
    RETURNING next_task - {FRONTIER_SHARDS} AS task;

    INSERT INTO tasks (run_id, task, status, worker_id, attempts, started,
                       updated, lease_expires)
    VALUES (:run_id, :task, 'computing', :worker_id, 1, :now, :now, :now + :timeout)
    ON CONFLICT (run_id, task) DO UPDATE
    SET status = 'computing', worker_id = excluded.worker_id,
        attempts = tasks.attempts + 1, started = :now, updated = :now,
        lease_expires = excluded.lease_expires
    WHERE tasks.status = 'waiting'
    RETURNING id, task, percent, attempts
    """,
)

# Moves a run's frontier past the first :count tasks, for tools that fill a
# run with task rows directly (tests, benchmarks).
ADVANCE_FRONTIER = f"""
    UPDATE run_frontier
    SET next_task = :count + ((shard - :count) % {FRONTIER_SHARDS} + {FRONTIER_SHARDS})
                             % {FRONTIER_SHARDS}
    WHERE run_id = :run_id
"""

# When every frontier row is busy: wait for one, starting from a random
# shard so that the waiting hand-outs spread over all of them.
CLAIM_TASK_WAITING = claim_statement(
    f'(f.shard + :spread) % {FRONTIER_SHARDS}', 'FOR UPDATE OF f')

GET_TASK = f"""
    SELECT r.num_tasks, t.id, t.status, t.percent, t.attempts
    FROM runs r LEFT JOIN tasks t ON t.run_id = r.id AND t.task = :task
    WHERE r.uuid = :run AND {OWNED}
"""

# A PUT creates the task's row if it has none, and renews the lease. A task
# put back to waiting has no worker any more.
UPDATE_TASK = f"""
    INSERT INTO tasks (run_id, task, status, percent, updated, lease_expires)
    SELECT id, :task, COALESCE(CAST(:status AS text), 'waiting'),
           COALESCE(CAST(:percent AS double precision), 0), :now, :now + timeout
    FROM runs
    WHERE uuid = :run AND {OWNED} AND :task < num_tasks
    ON CONFLICT (run_id, task) DO UPDATE
    SET status = COALESCE(CAST(:status AS text), tasks.status),
        percent = COALESCE(CAST(:percent AS double precision), tasks.percent),
        updated = :now, lease_expires = excluded.lease_expires,
        worker_id = CASE WHEN CAST(:status AS text) = 'waiting' THEN NULL
                         ELSE tasks.worker_id END
    RETURNING id
"""

# The same, only if the named worker still holds the task: a worker whose
# lease ran out must not undo the work of the one that took the task over.
UPDATE_HELD_TASK = """
    UPDATE tasks
    SET status = COALESCE(CAST(:status AS text), tasks.status),
        percent = COALESCE(CAST(:percent AS double precision), tasks.percent),
        updated = :now, lease_expires = :now + runs.timeout,
        worker_id = CASE WHEN CAST(:status AS text) = 'waiting' THEN NULL
                         ELSE tasks.worker_id END
    FROM runs
    WHERE runs.uuid = :run AND (runs.owner_id = :user_id OR :is_admin)
      AND tasks.run_id = runs.id AND tasks.task = :task
      AND tasks.worker_id = (SELECT id FROM workers WHERE uuid = :worker)
    RETURNING tasks.id
"""

LIST_TASKS = """
    SELECT t.id, t.task, t.status, t.percent, t.attempts, t.started, t.updated,
           w.uuid AS worker_uuid, w.hostname, w.pid
    FROM tasks t LEFT JOIN workers w ON w.id = t.worker_id
    WHERE t.run_id = :run_id AND t.task > :after
      AND (CAST(:status AS text) IS NULL OR t.status = CAST(:status AS text))
    ORDER BY t.task
    LIMIT :limit
"""

REGISTER_WORKER = """
    INSERT INTO workers (uuid, owner_id, hostname, pid, start, last_seen)
    VALUES (:uuid, :user_id, :hostname, :pid, :now, :now)
    ON CONFLICT (uuid) DO NOTHING
    RETURNING id
"""

FIND_WORKER = """
    SELECT id, owner_id, hostname, pid FROM workers WHERE uuid = :uuid
"""

TOUCH_WORKER = f"""
    UPDATE workers SET last_seen = :now
    WHERE uuid = :uuid AND {OWNED}
    RETURNING id
"""

RENEW_LEASES = """
    UPDATE tasks SET lease_expires = :now + runs.timeout, updated = :now
    FROM runs
    WHERE tasks.worker_id = :worker_id AND tasks.status = 'computing'
      AND runs.id = tasks.run_id AND runs.timeout IS NOT NULL
"""

# A worker's last sign of life is its heartbeat or its latest task update.
WORKERS_LAST_SEEN = Dialects(
    postgresql='greatest(w.last_seen, h.updated)',
    sqlite='max(w.last_seen, COALESCE(h.updated, 0))',
)
LIST_WORKERS = """
    SELECT w.id, w.uuid, w.hostname, w.pid, w.start,
           {last_seen} AS last_seen,
           COALESCE(h.computing, 0) AS computing
    FROM workers w LEFT JOIN (
        SELECT worker_id, count(*) AS computing, max(updated) AS updated
        FROM tasks WHERE status = 'computing' GROUP BY worker_id
    ) h ON h.worker_id = w.id
    WHERE (w.owner_id = :user_id OR :is_admin)
    ORDER BY w.id
"""
LIST_WORKERS = Dialects(*(LIST_WORKERS.format(last_seen=expr) for expr in WORKERS_LAST_SEEN))

USER_BY_ID = """
    SELECT id, username, token_stamp, is_admin FROM users WHERE id = :id
"""

USER_BY_NAME = """
    SELECT id, password_hash, token_stamp FROM users WHERE username = :username
"""

READ_SECRET = "SELECT value FROM settings WHERE name = 'secret'"

# ---------------------------------------------------------------------------
# The database: one small object over PostgreSQL (psycopg 3 and its pool) or
# sqlite3 (a connection per thread). Resources never touch a driver.


class DatabaseUnavailable(Exception):
    """The database cannot answer now (down, locked, or out of connections)."""

    @staticmethod
    def handle(req: falcon.Request, resp: falcon.Response,
               ex: Exception, params: dict) -> None:
        raise falcon.HTTPServiceUnavailable(
            title='Database unavailable',
            description='The database cannot answer right now; try again shortly.',
            retry_after=RETRY_AFTER_SECONDS)


def to_pyformat(sql: str) -> str:
    """`:name` placeholders to psycopg's `%(name)s` (and `%` to `%%`)."""
    sql = sql.replace('%', '%%')
    return re.sub(r'(?<![:\w]):([A-Za-z_]\w*)', r'%(\1)s', sql)


class Database:
    """What every backend offers: one(), all(), execute(), transaction()."""

    dialect: str
    Error: type[Exception]      # the driver's base error

    def pick(self, sql: str | Dialects) -> str:
        return getattr(sql, self.dialect) if isinstance(sql, Dialects) else sql

    def one(self, sql: str | Dialects, params: dict | None = None) -> dict | None:
        return self.single(lambda tx: tx.one(sql, params))

    def all(self, sql: str | Dialects, params: dict | None = None) -> list[dict]:
        return self.single(lambda tx: tx.all(sql, params))

    def execute(self, sql: str | Dialects, params: dict | None = None) -> int:
        return self.single(lambda tx: tx.execute(sql, params))

    def single(self, statement: Callable[[Transaction], Any]) -> Any:
        """Run one statement on its own (it commits by itself)."""
        with self.transaction(atomic=False) as tx:
            return statement(tx)

    def script(self, sql: str) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self, atomic: bool = True) -> Iterator[Transaction]:
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError


class Transaction:
    """Statements on one connection; inside `db.transaction()` they commit together."""

    def __init__(self, db: Database, conn: Any) -> None:
        self.db = db
        self.conn = conn

    def _run(self, sql: str | Dialects, params: dict | None) -> Any:
        return self.db.run_on(self.conn, self.db.pick(sql), params or {})

    def one(self, sql: str | Dialects, params: dict | None = None) -> dict | None:
        return self._run(sql, params).fetchone()

    def all(self, sql: str | Dialects, params: dict | None = None) -> list[dict]:
        return self._run(sql, params).fetchall()

    def execute(self, sql: str | Dialects, params: dict | None = None) -> int:
        return self._run(sql, params).rowcount


def dict_factory(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {col[0]: value for col, value in zip(cursor.description, row)}


class SqliteDatabase(Database):
    dialect = 'sqlite'
    Error = sqlite3.Error

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.local = threading.local()
        # sqlite has one writer at a time, and its busy handler waits by
        # sleeping in steps of up to 100 ms. Threads of this process take
        # turns on a lock instead, which wakes the next one at once; only
        # other processes meet the busy handler.
        self.turn = threading.Lock()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self.local, 'conn', None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = dict_factory
            conn.execute('PRAGMA foreign_keys = ON')
            conn.execute('PRAGMA journal_mode = WAL')
            self.local.conn = conn
        return conn

    def run_on(self, conn: sqlite3.Connection, sql: str, params: dict) -> Any:
        try:
            return conn.execute(sql, params)
        except sqlite3.OperationalError as e:
            if 'locked' in str(e) or 'busy' in str(e):
                raise DatabaseUnavailable(str(e)) from e
            raise

    @contextmanager
    def transaction(self, atomic: bool = True) -> Iterator[Transaction]:
        conn = self.connection()
        if not self.turn.acquire(timeout=self.timeout):
            raise DatabaseUnavailable('sqlite is busy')
        try:
            if not atomic:
                yield Transaction(self, conn)
                return
            self.run_on(conn, 'BEGIN IMMEDIATE', {})
            try:
                yield Transaction(self, conn)
            except BaseException:
                conn.execute('ROLLBACK')
                raise
            self.run_on(conn, 'COMMIT', {})
        finally:
            self.turn.release()

    def script(self, sql: str) -> None:
        self.connection().executescript(sql)

    def close(self) -> None:
        conn = getattr(self.local, 'conn', None)
        if conn is not None:
            conn.close()
            self.local.conn = None


class PostgresDatabase(Database):
    dialect = 'postgresql'

    def __init__(self, url: str, timeout: float, pool_size: int) -> None:
        import psycopg
        import psycopg_pool
        from psycopg.rows import dict_row

        self.psycopg = psycopg
        self.Error = psycopg.Error
        self.pool_timeout_error = psycopg_pool.PoolTimeout
        self.timeout = timeout
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=timeout, open=True,
            # Every statement here looks rows up by key: plan it once per
            # connection, not on each call (custom plans cost ~0.4 ms).
            kwargs={'autocommit': True, 'row_factory': dict_row,
                    'connect_timeout': max(1, int(timeout)),
                    'options': '-c plan_cache_mode=force_generic_plan'},
            name='taskfarm')
        self.converted: dict[str, str] = {}

    def single(self, statement: Callable[[Transaction], Any]) -> Any:
        # A statement that lost a deadlock was rolled back whole: run it again.
        for attempt in range(3):
            try:
                return super().single(statement)
            except DatabaseUnavailable as e:
                lost = isinstance(e.__cause__, self.psycopg.errors.TransactionRollback)
                if not lost or attempt == 2:
                    raise
        raise AssertionError('unreachable')

    def run_on(self, conn: Any, sql: str, params: dict) -> Any:
        query = self.converted.get(sql)
        if query is None:
            query = self.converted[sql] = to_pyformat(sql)
        return conn.execute(query, params)

    @contextmanager
    def transaction(self, atomic: bool = True) -> Iterator[Transaction]:
        try:
            with self.pool.connection() as conn:
                if atomic:
                    with conn.transaction():
                        yield Transaction(self, conn)
                else:
                    yield Transaction(self, conn)
        except self.pool_timeout_error as e:
            raise DatabaseUnavailable(str(e)) from e
        except self.psycopg.errors.TransactionRollback as e:
            raise DatabaseUnavailable(str(e)) from e
        except self.psycopg.OperationalError as e:
            # Dead connections go back to the pool marked bad; drop idle
            # ones too, so the next request after an outage gets a live one.
            self.pool.check()
            raise DatabaseUnavailable(str(e)) from e

    def script(self, sql: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(sql)

    def close(self) -> None:
        self.pool.close()


def open_database(config: Config) -> Database:
    url = config.database_url
    if url.startswith('sqlite:///'):
        return SqliteDatabase(url[len('sqlite:///'):], config.db_timeout)
    if url.startswith(('postgresql://', 'postgres://')):
        return PostgresDatabase(url, config.db_timeout, config.pool_size)
    raise ValueError(f'DATABASE_URL must start with sqlite:/// or postgresql://, not {url!r}')


def schema_for(dialect: str) -> str:
    """The section of schema.sql for one dialect."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'schema.sql')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    sections = re.split(r'^-- @(\w+)\s*$', text, flags=re.MULTILINE)
    return dict(zip(sections[1::2], sections[2::2]))[dialect]


def init_db(db: Database) -> None:
    """Create the tables and a signing secret; safe to run twice."""
    db.script(schema_for(db.dialect))
    db.execute("""
        INSERT INTO settings (name, value) VALUES ('secret', :value)
        ON CONFLICT (name) DO NOTHING
    """, {'value': secrets.token_hex(32)})


# ---------------------------------------------------------------------------
# Auth: salted scrypt password hashes, and HMAC-SHA256 tokens that carry the
# user, an expiry and the user's token stamp (which a password change renews).

SCRYPT = {'n': 2**14, 'r': 8, 'p': 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f'scrypt${salt.hex()}${digest.hex()}'


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split('$')
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt),
                                  dklen=32, **SCRYPT)
    except (ValueError, UnicodeEncodeError):
        return False
    return scheme == 'scrypt' and hmac.compare_digest(computed.hex(), digest)


def sign(secret: bytes, payload: str) -> str:
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b'=').decode()


def issue_token(secret: bytes, user: dict, ttl: int) -> str:
    payload = f"tf1.{user['id']}.{int(time.time()) + ttl}.{user['token_stamp']}"
    return f'{payload}.{sign(secret, payload)}'


def read_token(secret: bytes, token: str) -> tuple[int, str] | None:
    """(user id, token stamp) of a well-signed, unexpired token, else None."""
    payload, _, signature = token.rpartition('.')
    # As bytes: compare_digest refuses str with non-ASCII characters.
    if not hmac.compare_digest(sign(secret, payload).encode(), signature.encode()):
        return None
    try:
        version, user_id, expires, stamp = payload.split('.')
        if version != 'tf1' or int(expires) < time.time():
            return None
        return int(user_id), stamp
    except ValueError:
        return None


class Authenticator:
    """Finds the user of a Basic auth header.

    Users and verified passwords are cached for `auth_cache_seconds`, so the
    hot path costs one HMAC and no query, while a deleted user or a changed
    password still takes effect within that time.
    """

    def __init__(self, db: Database, secret: bytes, config: Config) -> None:
        self.db = db
        self.secret = secret
        self.ttl = config.auth_cache_seconds
        self.users: dict[int, tuple[float, dict | None]] = {}
        self.passwords: dict[bytes, tuple[float, int, str]] = {}
        self.throttle = LoginThrottle(config.login_max_failures, config.login_window)

    def user(self, authorization: str | None, address: str = '') -> dict | None:
        credentials = parse_basic(authorization)
        if credentials is None:
            return None
        name, password = credentials
        found = read_token(self.secret, name) if name.startswith('tf1.') else None
        if found is None:
            found = self.password_user(name, password, address)
        if found is None:
            return None
        user_id, stamp = found
        user = self.user_by_id(user_id)
        if user is None or not hmac.compare_digest(user['token_stamp'], stamp):
            return None
        return user

    def user_by_id(self, user_id: int) -> dict | None:
        now = time.monotonic()
        cached = self.users.get(user_id)
        if cached and cached[0] > now:
            return cached[1]
        user = self.db.one(USER_BY_ID, {'id': user_id})
        if user is not None:
            user['is_admin'] = bool(user['is_admin'])
        self.users[user_id] = (now + self.ttl, user)
        return user

    def password_user(self, name: str, password: str,
                      address: str = '') -> tuple[int, str] | None:
        key = hmac.new(self.secret, f'{name}\0{password}'.encode(), 'sha256').digest()
        now = time.monotonic()
        cached = self.passwords.get(key)
        if cached and cached[0] > now:
            return cached[1], cached[2]
        wait = self.throttle.wait(name, address)
        if wait:
            raise login_throttled(wait)
        row = self.db.one(USER_BY_NAME, {'username': name})
        if row is None:
            return None
        if not verify_password(password, row['password_hash']):
            self.throttle.failed(name, address)
            return None
        self.throttle.succeeded(name, address)
        self.passwords[key] = (now + self.ttl, row['id'], row['token_stamp'])
        return row['id'], row['token_stamp']


def parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or header[:6].lower() != 'basic ':
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode('utf-8')
    except (ValueError, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(':')
    # No user name holds a NUL, and PostgreSQL text cannot even be queried with one.
    return (name, password) if sep and '\0' not in name else None


class AuthMiddleware:
    """Puts the caller on req.context.user, or answers 401."""

    def __init__(self, authenticator: Authenticator,
                 trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self.authenticator = authenticator
        self.trusted_proxies = trusted_proxies

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, params: dict) -> None:
        if resource is None or not getattr(resource, 'auth_required', True):
            return
        user = self.authenticator.user(req.get_header('Authorization'),
                                       client_address(req, self.trusted_proxies))
        if user is None:
            raise falcon.HTTPUnauthorized(
                title='Authentication required',
                description='Send HTTP Basic auth: user:password, or a token '
                            'from GET /api/token as the user name.',
                challenges=['Basic realm="taskfarm"'])
        req.context.user = user


# ---------------------------------------------------------------------------
# Login throttling, and the client's address it counts by. A wrong password
# costs a scrypt check (30-60 ms of CPU): after a few for one user name or
# one client address within a window, password logins for that name or
# from that address answer 429 without checking until the window is over.
# Tokens are never throttled, so workers holding one keep working.

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
THROTTLE_TRACKED = 10_000   # names, addresses and known logins remembered, each at most
NAME_KEY_LENGTH = 64        # no user name is longer (admin.py); longer ones share a key

log = logging.getLogger('taskfarm')


def trusted_networks(text: str) -> tuple[IPNetwork, ...]:
    """TASKFARM_TRUSTED_PROXIES: addresses or networks (CIDR), comma-separated."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False)
                 for item in text.split(',') if item.strip())


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
               networks: tuple[IPNetwork, ...]) -> bool:
    return ip is not None and any(ip in network for network in networks)


def client_address(req: falcon.Request, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy.

    Then X-Forwarded-For is read from the right, where each proxy appended
    the address it saw: the client is the first address that is not a
    trusted proxy's. Entries left of it were written by the client itself.
    """
    address = req.remote_addr
    if not trusted_proxies or not is_trusted(parse_ip(address), trusted_proxies):
        return address
    for hop in reversed((req.get_header('X-Forwarded-For') or '').split(',')):
        ip = parse_ip(hop)
        if ip is None:
            break       # nothing, or garbage: the nearest trusted proxy is all we know
        address = str(ip)
        if not is_trusted(ip, trusted_proxies):
            break
    return address


@dataclass
class Strikes:
    """The failed password checks of one name or address in its window."""
    since: float
    count: int = 0
    blocked_until: float = 0.0
    logged: bool = False    # this block's first refusal was logged

    def over(self, now: float, window: float) -> bool:
        return now >= max(self.since + window, self.blocked_until)


class LoginThrottle:
    """Counts failed password checks per user name and per client address.

    `max_failures` within `window` seconds block that name or that address
    for `window` seconds (0 for either turns throttling off). A blocked name
    stays open to the addresses that logged in as it before, so that an
    attacker cannot lock its user out. Memory stays bounded: at most
    THROTTLE_TRACKED names and addresses (the least recently failed are
    forgotten first), and as many known logins.
    """

    def __init__(self, max_failures: int, window: float,
                 tracked: int = THROTTLE_TRACKED) -> None:
        self.enabled = max_failures > 0 and window > 0
        self.max_failures = max_failures
        self.window = window
        self.tracked = tracked
        self.strikes: OrderedDict[tuple[str, str], Strikes] = OrderedDict()
        self.known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.lock = threading.Lock()

    def wait(self, name: str, address: str) -> float:
        """Seconds until name may try a password from address; 0: now."""
        if not self.enabled:
            return 0.0
        name = name[:NAME_KEY_LENGTH]
        now = time.monotonic()
        with self.lock:
            keys = [('address', address)]
            if (name, address) not in self.known:
                keys.append(('user', name))
            return max(self.blocked_for(key, now) for key in keys)

    def blocked_for(self, key: tuple[str, str], now: float) -> float:
        strikes = self.strikes.get(key)
        if strikes is None or strikes.blocked_until <= now:
            return 0.0
        if not strikes.logged:      # one line per block, however many attempts
            strikes.logged = True
            log.warning('login throttled: %s %r had %d failed password checks; its password '
                        'logins get 429 without a check for %.0f s', key[0], key[1],
                        strikes.count, strikes.blocked_until - now)
        return strikes.blocked_until - now

    def failed(self, name: str, address: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self.lock:
            for key in (('address', address), ('user', name[:NAME_KEY_LENGTH])):
                self.strike(key, now)
            self.forget_old(now)

    def strike(self, key: tuple[str, str], now: float) -> None:
        strikes = self.strikes.pop(key, None)   # back in last: the most recently failed
        if strikes is None or strikes.over(now, self.window):
            strikes = Strikes(since=now)
        strikes.count += 1
        if strikes.count >= self.max_failures:
            strikes.blocked_until = now + self.window
        self.strikes[key] = strikes

    def forget_old(self, now: float) -> None:
        while self.strikes:
            oldest = next(iter(self.strikes.values()))
            if len(self.strikes) <= self.tracked and not oldest.over(now, self.window):
                return
            self.strikes.popitem(last=False)

    def succeeded(self, name: str, address: str) -> None:
        if not self.enabled:
            return
        key = (name[:NAME_KEY_LENGTH], address)
        with self.lock:
            self.known.pop(key, None)
            self.known[key] = None
            if len(self.known) > self.tracked:
                self.known.popitem(last=False)


def login_throttled(wait: float) -> falcon.HTTPTooManyRequests:
    seconds = math.ceil(wait)
    return falcon.HTTPTooManyRequests(
        title='Too many failed logins',
        description='Too many wrong passwords for this user or from this address: '
                    f'try again in {seconds} s. Tokens keep working meanwhile.',
        retry_after=seconds)


def owner(req: falcon.Request) -> dict:
    """The parameters every owned query needs."""
    user = req.context.user
    return {'user_id': user['id'], 'is_admin': user['is_admin']}


# ---------------------------------------------------------------------------
# Request validation: small explicit checks that name the field at fault.


def strict_json_loads(text: str) -> Any:
    def finite(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f'number {value} is too large')
        return number

    def reject(name: str) -> None:
        raise ValueError(f'{name} is not valid JSON')

    try:
        return json.loads(text, parse_float=finite, parse_constant=reject)
    except RecursionError:
        raise ValueError('JSON nested too deeply') from None


def read_body(req: falcon.Request, allowed: tuple[str, ...]) -> dict:
    """The JSON object of the body, refusing keys the route does not know.

    The body is read as JSON whatever its Content-Type: a `curl -d` without
    a header should not turn into a form.
    """
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise falcon.HTTPContentTooLarge(
            title='Body too large',
            description=f'Request bodies are limited to {MAX_BODY_BYTES} bytes.')
    raw = req.bounded_stream.read(MAX_BODY_BYTES + 1)
    try:
        body = strict_json_loads(raw.decode('utf-8')) if raw.strip() else None
    except ValueError as e:
        raise falcon.HTTPBadRequest(title='Invalid JSON',
                                    description=f'The body is not valid UTF-8 JSON: {e}.')
    if not isinstance(body, dict):
        raise falcon.HTTPBadRequest(
            title='Invalid body',
            description=f'Send a JSON object with keys from: {", ".join(allowed)}.')
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise falcon.HTTPBadRequest(
            title='Unknown key',
            description=f'Unknown key {unknown[0][:64]!r}; '
                        f'this route takes: {", ".join(allowed)}.')
    return body


def bad_field(key: str, problem: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title=f'Invalid {key}', description=f'{key} {problem}.')


def present(body: dict, key: str, required: bool) -> bool:
    """Whether an optional key was sent; a missing required key is a 400."""
    if key in body:
        return True
    if required:
        raise bad_field(key, 'is required')
    return False


def require_int(body: dict, key: str, minimum: int, maximum: int,
                required: bool = True) -> int | None:
    if not present(body, key, required):
        return None
    value = body[key]
    if type(value) is not int:
        raise bad_field(key, 'must be an integer')
    if not minimum <= value <= maximum:
        raise bad_field(key, f'must be from {minimum} to {maximum}')
    return value


def require_number(body: dict, key: str, minimum: float, maximum: float) -> float | None:
    if not present(body, key, required=False):
        return None
    value = body[key]
    if type(value) not in (int, float):
        raise bad_field(key, 'must be a number')
    if not minimum <= value <= maximum:
        raise bad_field(key, f'must be from {minimum:g} to {maximum:g}')
    return float(value)


def require_str(body: dict, key: str, max_length: int, required: bool = True) -> str | None:
    if not present(body, key, required):
        return None
    value = body[key]
    if not isinstance(value, str):
        raise bad_field(key, 'must be a string')
    if not 1 <= len(value) <= max_length:
        raise bad_field(key, f'must be 1 to {max_length} characters long')
    if not valid_text(value, max_length):
        raise bad_field(key, 'must not contain NUL characters or unpaired surrogates')
    return value


def valid_text(value: str, max_length: int) -> bool:
    """Text both databases can store: no NUL, no lone surrogate, not too long."""
    return (len(value) <= max_length and '\0' not in value
            and not UNPAIRED_SURROGATE_RE.search(value))


def require_status(body: dict, allowed: tuple[str, ...] = STATUSES) -> str | None:
    if 'status' not in body:
        return None
    if body['status'] not in allowed:
        raise bad_field('status', f'must be one of: {", ".join(allowed)}')
    return body['status']


def check_uuid(uuid: str) -> None:
    if not UUID_RE.fullmatch(uuid):
        raise falcon.HTTPNotFound(title='Unknown run', description=f'No run {uuid[:64]!r}.')


def run_not_found(uuid: str) -> falcon.HTTPNotFound:
    return falcon.HTTPNotFound(title='Unknown run', description=f'No run {uuid!r}.')


def unknown_worker(uuid: str) -> falcon.HTTPNotFound:
    return falcon.HTTPNotFound(title='Unknown worker',
                               description=f'No worker {uuid[:64]!r} of yours; '
                                           'register it with POST /api/worker.')


def unknown_info(info: str, allowed: tuple[str, ...]) -> falcon.HTTPNotFound:
    return falcon.HTTPNotFound(
        title='Unknown info',
        description=f'info must be empty or one of: {", ".join(allowed)} (not {info[:64]!r}).')


def int_param(req: falcon.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    if not re.fullmatch(r'-?\d{1,12}', raw) or not minimum <= int(raw) <= maximum:
        raise falcon.HTTPBadRequest(
            title=f'Invalid {name}',
            description=f'{name} must be an integer from {minimum} to {maximum}.')
    return int(raw)


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z')


# ---------------------------------------------------------------------------
# JSON shapes.


def run_json(row: dict) -> dict:
    return {'id': row['id'], 'uuid': row['uuid'], 'numTasks': row['num_tasks'],
            'name': row['name']}


def run_status_json(row: dict) -> dict:
    num_tasks = row['num_tasks']
    busy = row['computing'] + row['done'] + row['failed']
    # Counts are summed from per-change deltas; round away float dust.
    percent = min(100.0, max(0.0, round(row['percent'] / num_tasks, 6)))
    return {**run_json(row), 'timeout': row['timeout'], 'maxAttempts': row['max_attempts'],
            'percentDone': percent, 'numWaiting': num_tasks - busy,
            'numComputing': row['computing'], 'numDone': row['done'],
            'numFailed': row['failed']}


def task_json(number: int, row: dict | None) -> dict:
    if row is None or row.get('id') is None:
        return {'id': None, 'task': number, 'percentCompleted': 0.0,
                'status': 'waiting', 'attempts': 0}
    return {'id': row['id'], 'task': number, 'percentCompleted': float(row['percent']),
            'status': row['status'], 'attempts': row['attempts']}


def listed_task_json(row: dict) -> dict:
    worker = None
    if row['worker_uuid'] is not None:
        worker = {'uuid': row['worker_uuid'], 'hostname': row['hostname'],
                  'pid': row['pid']}
    return {**task_json(row['task'], row), 'started': iso(row['started']),
            'updated': iso(row['updated']), 'worker': worker}


# ---------------------------------------------------------------------------
# Resources.

INDEX_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Taskfarm Server</title></head>
<body>
<h1>Taskfarm Server</h1>
<p>version: {version}</p>
<p>A task farm: runs of numbered tasks, handed out to independent workers.
The HTTP API is under <code>/api/</code>; see the project's README.md for the
API table and <a href="https://taskfarm.readthedocs.io/en/latest/">the
original taskfarm documentation</a>.</p>
<p><a href="/runs">The dashboard: your runs</a> (sign in as your taskfarm user).</p>
</body></html>
"""


class Index:
    auth_required = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = INDEX_PAGE.format(version=html.escape(__version__))


class Token:
    def __init__(self, secret: bytes, ttl: int) -> None:
        self.secret = secret
        self.ttl = ttl

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'token': issue_token(self.secret, req.context.user, self.ttl)}


class Runs:
    def __init__(self, db: Database) -> None:
        self.db = db

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, ('numTasks', 'name', 'timeout', 'maxAttempts'))
        params = {
            'uuid': uuid4().hex,
            'num_tasks': require_int(body, 'numTasks', 1, MAX_INT),
            'name': require_str(body, 'name', 200, required=False),
            'timeout': require_int(body, 'timeout', 1, 31536000, required=False),
            'max_attempts': require_int(body, 'maxAttempts', 1, 1000, required=False),
            'now': time.time(), **owner(req)}
        row = self.db.one(CREATE_RUN, params)
        resp.status = falcon.HTTP_201
        resp.media = {'id': row['id'], 'uuid': params['uuid'],
                      'numTasks': params['num_tasks']}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'data': [run_json(row) for row in self.db.all(LIST_RUNS, owner(req))]}


RUN_INFO = ('percentDone', 'numWaiting', 'numDone', 'numComputing', 'numFailed')


class Run:
    def __init__(self, db: Database) -> None:
        self.db = db

    def find(self, req: falcon.Request, uuid: str) -> dict:
        check_uuid(uuid)
        row = self.db.one(FIND_RUN, {'run': uuid, **owner(req)})
        if row is None:
            raise run_not_found(uuid)
        return row

    def on_get(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        info = req.get_param('info', default='')
        if info and info not in RUN_INFO:
            raise unknown_info(info, RUN_INFO)
        check_uuid(uuid)
        row = self.db.one(RUN_STATUS, {'run': uuid, **owner(req)})
        if row is None:
            raise run_not_found(uuid)
        status = run_status_json(row)
        resp.media = {info: status[info]} if info else status

    def on_delete(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        check_uuid(uuid)
        if not delete_run(self.db, {'run': uuid, **owner(req)}):
            raise run_not_found(uuid)
        resp.status = falcon.HTTP_204

    def on_post_restart(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        everything = req.get_param('all', default='False').lower()
        if everything not in ('true', 'false'):
            raise falcon.HTTPNotFound(title='Invalid all',
                                      description='all must be True or False.')
        run = self.find(req, uuid)
        restart = RESTART_ALL if everything == 'true' else RESTART_UNFINISHED
        self.db.execute(restart, {'run_id': run['id']})
        resp.status = falcon.HTTP_204

    def on_get_tasks(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        status = req.get_param('status')
        if status is not None and status not in STATUSES:
            raise bad_field('status', f'must be one of: {", ".join(STATUSES)}')
        params = {'status': status,
                  'limit': int_param(req, 'limit', 100, 1, 1000),
                  'after': int_param(req, 'after', -1, -1, MAX_INT)}
        run = self.find(req, uuid)
        rows = self.db.all(LIST_TASKS, {'run_id': run['id'], **params})
        resp.media = {'data': [listed_task_json(row) for row in rows]}


class TaskHandout:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.sqlite_steps = CLAIM_TASK.sqlite.split(';')

    def on_post(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        body = read_body(req, ('worker_uuid',))
        worker = require_str(body, 'worker_uuid', 64)
        check_uuid(uuid)
        params = {'run': uuid, 'worker': worker, **owner(req)}
        row = self.claim(params)
        if row is None:
            self.explain_nothing(params)
            resp.status = falcon.HTTP_204
            return
        resp.status = falcon.HTTP_201
        resp.media = {'id': row['id'], 'task': row['task'],
                      'percentCompleted': float(row['percent']), 'status': 'computing',
                      'attempts': row['attempts']}

    def claim(self, params: dict) -> dict | None:
        # A fresh number that a PUT already gave a row is stepped over; each
        # step moves the frontier on, so this loop ends.
        statement = CLAIM_TASK
        while True:
            params['now'] = time.time()
            if self.db.dialect == 'postgresql':
                row = self.db.one(statement, params)
            else:
                row = self.claim_sqlite(params)
            if row is None or row['id'] is not None:
                return row
            if row['task'] is None:     # every frontier row was busy
                statement = CLAIM_TASK_WAITING
                params['spread'] = random.randrange(FRONTIER_SHARDS)

    def claim_sqlite(self, params: dict) -> dict | None:
        find, exhaust, reclaim, advance, create = self.sqlite_steps
        with self.db.transaction() as tx:
            found = tx.one(find, params)
            if found is None:
                return None
            params = {**params, **found}
            tx.execute(exhaust, params)
            row = tx.one(reclaim, params)
            if row is not None:
                return row
            fresh = tx.one(advance, params)
            if fresh is None:
                return None
            row = tx.one(create, {**params, 'task': fresh['task']})
            return row if row is not None else {'id': None, 'task': fresh['task']}

    def explain_nothing(self, params: dict) -> None:
        """Nothing handed out: 404 if the run or worker is unknown, else 204."""
        if self.db.one(FIND_RUN, params) is None:
            raise run_not_found(params['run'])
        if self.db.one(TOUCH_WORKER, {'uuid': params['worker'], 'now': time.time(),
                                      'user_id': params['user_id'],
                                      'is_admin': params['is_admin']}) is None:
            raise unknown_worker(params['worker'])


TASK_INFO = ('status', 'percentCompleted', 'percentDone', 'attempts')


class Task:
    def __init__(self, db: Database) -> None:
        self.db = db

    def on_get(self, req: falcon.Request, resp: falcon.Response,
               uuid: str, task_id: int) -> None:
        info = req.get_param('info', default='')
        if info and info not in TASK_INFO:
            raise unknown_info(info, TASK_INFO)
        check_uuid(uuid)
        row = self.db.one(GET_TASK, {'run': uuid, 'task': min(task_id, MAX_INT), **owner(req)})
        if row is None:
            raise run_not_found(uuid)
        check_task_number(task_id, row['num_tasks'])
        task = task_json(task_id, row)
        task['percentDone'] = task['percentCompleted']
        resp.media = {info: task[info]} if info else {
            key: task[key] for key in ('id', 'task', 'percentCompleted', 'status', 'attempts')}

    def on_put(self, req: falcon.Request, resp: falcon.Response,
               uuid: str, task_id: int) -> None:
        body = read_body(req, ('percentCompleted', 'status', 'worker_uuid'))
        if not body.keys() - {'worker_uuid'}:
            raise falcon.HTTPBadRequest(
                title='Nothing to update',
                description='Send percentCompleted and/or status.')
        params = {'percent': require_number(body, 'percentCompleted', 0, 100),
                  'status': require_status(body), 'task': task_id,
                  'worker': require_str(body, 'worker_uuid', 64, required=False),
                  'run': uuid, 'now': time.time(), **owner(req)}
        check_uuid(uuid)
        update = UPDATE_TASK if params['worker'] is None else UPDATE_HELD_TASK
        if not 0 <= task_id <= MAX_INT or self.db.one(update, params) is None:
            self.explain_no_update(params)
        resp.status = falcon.HTTP_204

    def explain_no_update(self, params: dict) -> None:
        run = self.db.one(FIND_RUN, params)
        if run is None:
            raise run_not_found(params['run'])
        check_task_number(params['task'], run['num_tasks'])
        raise falcon.HTTPConflict(
            title='Task not held',
            description=f"Worker {params['worker']!r} does not hold task {params['task']}: "
                        'its lease ran out or the run was restarted.')


def delete_run(db: Database, params: dict) -> bool:
    """Delete a run and all its tasks; False if there is no such run of the user's."""
    with db.transaction() as tx:
        tx.all(LOCK_FRONTIER, params)
        return tx.one(DELETE_RUN, params) is not None


def check_task_number(task_id: int, num_tasks: int) -> None:
    if not 0 <= task_id < num_tasks:
        raise falcon.HTTPNotFound(
            title='Unknown task',
            description=f'Task numbers of this run go from 0 to {num_tasks - 1}.')


class Workers:
    def __init__(self, db: Database) -> None:
        self.db = db

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, ('uuid', 'hostname', 'pid'))
        params = {'uuid': require_str(body, 'uuid', 64),
                  'hostname': require_str(body, 'hostname', 255),
                  'pid': require_int(body, 'pid', 0, MAX_INT),
                  'now': time.time(), **owner(req)}
        row = self.db.one(REGISTER_WORKER, params)
        if row is None:
            row = self.same_worker_again(params)
        resp.status = falcon.HTTP_201
        resp.media = {'uuid': params['uuid'], 'id': row['id']}

    def same_worker_again(self, params: dict) -> dict:
        """A retried registration is fine; a clash with another worker is not."""
        row = self.db.one(FIND_WORKER, params)
        same = (row is not None and row['owner_id'] == params['user_id']
                and row['hostname'] == params['hostname'] and row['pid'] == params['pid'])
        if not same:
            raise falcon.HTTPConflict(
                title='Worker uuid taken',
                description=f"Worker {params['uuid']!r} is registered with another "
                            'hostname, pid or user; use a new uuid.')
        return row

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'data': [
            {'id': row['id'], 'uuid': row['uuid'], 'hostname': row['hostname'],
             'pid': row['pid'], 'start': iso(row['start']),
             'lastSeen': iso(row['last_seen']), 'numComputing': row['computing']}
            for row in self.db.all(LIST_WORKERS, owner(req))]}

    def on_post_heartbeat(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        params = {'uuid': uuid, 'now': time.time(), **owner(req)}
        with self.db.transaction() as tx:
            worker = tx.one(TOUCH_WORKER, params) if valid_text(uuid, 64) else None
            if worker is None:
                raise unknown_worker(uuid)
            tx.execute(RENEW_LEASES, {'worker_id': worker['id'], 'now': params['now']})
        resp.status = falcon.HTTP_204


# ---------------------------------------------------------------------------
# The app.


def json_errors(req: falcon.Request, resp: falcon.Response,
                exception: falcon.HTTPError) -> None:
    """Every error answers JSON, whatever the client accepts."""
    resp.content_type = falcon.MEDIA_JSON
    resp.media = exception.to_dict()


def load_secret(db: Database, config: Config) -> bytes:
    if config.secret:
        return config.secret.encode()
    try:
        row = db.one(READ_SECRET)
    except (db.Error, DatabaseUnavailable) as e:
        raise SystemExit(f'taskfarm: cannot read the database ({e}); '
                         'run `taskfarm-admin init-db` first.') from None
    if row is None:
        raise SystemExit('taskfarm: no secret to sign tokens with: set TASKFARM_SECRET '
                         'or run `taskfarm-admin init-db`.')
    return row['value'].encode()


def create_app(db: Database, config: Config | None = None) -> falcon.App:
    config = config or Config()
    secret = load_secret(db, config)
    app = falcon.App(middleware=[AuthMiddleware(Authenticator(db, secret, config),
                                                config.trusted_proxies)])
    app.set_error_serializer(json_errors)
    app.add_error_handler(DatabaseUnavailable, DatabaseUnavailable.handle)

    run, workers = Run(db), Workers(db)
    app.add_route('/', Index())
    app.add_route('/api/token', Token(secret, config.token_ttl))
    app.add_route('/api/run', Runs(db))
    app.add_route('/api/runs', Runs(db))
    app.add_route('/api/runs/{uuid}', run)
    app.add_route('/api/runs/{uuid}/restart', run, suffix='restart')
    app.add_route('/api/runs/{uuid}/tasks', run, suffix='tasks')
    app.add_route('/api/runs/{uuid}/task', TaskHandout(db))
    app.add_route('/api/runs/{uuid}/tasks/{task_id:int}', Task(db))
    app.add_route('/api/worker', workers)
    app.add_route('/api/workers', workers)
    app.add_route('/api/workers/{uuid}/heartbeat', workers, suffix='heartbeat')
    import dashboard  # here: dashboard imports this module
    dashboard.add_dashboard(app, db, secret)
    return app


def get_app() -> falcon.App:
    """The app as deployed: configured from the environment."""
    config = Config.from_env()
    return create_app(open_database(config), config)


# ---------------------------------------------------------------------------
# `taskfarm-server`: waitress, in one process or several sharing one socket.


def serve(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='taskfarm-server', description=__doc__.split('\n')[0])
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=5000)
    parser.add_argument('--threads', type=int, default=8,
                        help='waitress threads per process (default 8)')
    parser.add_argument('--workers', type=int, default=1,
                        help='server processes sharing the listening socket (default 1)')
    args = parser.parse_args(argv)
    serve_with_waitress(get_app, args.host, args.port, args.threads, args.workers,
                        f'taskfarm {__version__}')


def serve_with_waitress(make_app: Callable[[], Any], host: str, port: int, threads: int,
                        workers: int, label: str) -> None:
    """Serve make_app() with waitress in `workers` processes on one socket.

    The benchmark serves its bare-Falcon ceiling through this too, so both
    run under the same server settings.
    """
    import logging

    import waitress
    import waitress.channel
    import waitress.task

    # waitress warns for every request that waits for a thread; under load
    # that is thousands of lines and ~4% of the server's time.
    logging.getLogger('waitress.queue').setLevel(logging.ERROR)
    waitress.channel.HTTPChannel.task_class = keep_alive_task(waitress.task.WSGITask)

    listener = socket.create_server((host, port))
    children, is_child = fork_servers(workers)
    app = make_app()    # after the fork: each process has its own connections
    if not is_child:
        port = listener.getsockname()[1]    # the real one, when port is 0
        print(f'{label} serving on http://{host}:{port} '
              f'({workers} process(es) x {threads} threads)', flush=True)
    try:
        waitress.serve(app, sockets=[listener], threads=threads,
                       connection_limit=1000, channel_timeout=120,
                       max_request_body_size=MAX_BODY_BYTES, ident='taskfarm',
                       # Keep X-Forwarded-For: client_address() decides whom to believe.
                       clear_untrusted_proxy_headers=False)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)


def keep_alive_task(base: type) -> type:
    """waitress's WSGI task, keeping the connection open after a 204.

    waitress 3.0.2 closes the connection after any response without a
    Content-Length, even one that has no body and must not carry one (204,
    304): every progress PUT would cost a new connection.
    """
    class KeepAliveTask(base):
        def set_close_on_finish(self) -> None:
            closing = self.request.headers.get('CONNECTION', '').lower() == 'close'
            if self.has_body or self.version != '1.1' or closing:
                super().set_close_on_finish()

    return KeepAliveTask


def fork_servers(count: int) -> tuple[list[int], bool]:
    """Fork count - 1 more server processes: (their pids, whether this is one).

    A child asks the kernel for SIGTERM when its parent dies, so stopping
    the one command (even with SIGKILL) stops them all.
    """
    children = []
    for _ in range(count - 1):
        pid = os.fork()
        if pid == 0:
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            return [], True
        children.append(pid)
    if children:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    return children, False


if __name__ == '__main__':
    # Serve from the module `taskfarm`, not `__main__`, so that modules
    # importing taskfarm (the dashboard) share its classes.
    import taskfarm
    taskfarm.serve()
