"""The store: every SQL statement of the Taskfarm server, one method each.

The API (taskfarm.py) and the dashboard (dashboard.py) call a `Store` and
never write SQL, touch a driver or ask which database it is. Each method
sits right below its SQL; where PostgreSQL and sqlite differ, both
versions stand side by side in a `Dialects`. Every statement on an owned
row (a run, a worker) carries the owner rule, `owned()`, so one grep shows
who may touch what. The store raises domain errors (`RunNotFound`, ...)
that the app maps to HTTP answers in one place.

Layout, top-down: limits and domain errors, the database object (psycopg 3
and its pool, or sqlite3), the owner rule, then the `Store`: users, runs,
the hand-out, task updates, tasks, workers, and the dashboard's queries.
"""

from __future__ import annotations

import heapq
import json
import random
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar('T')

MAX_INT = 2**31 - 1
REPORT_SPAN = 4096          # task numbers one report statement reads at most
STATUSES = ('waiting', 'computing', 'done', 'failed')
UUID_RE = re.compile(r'[0-9a-f]{32}')
UNPAIRED_SURROGATE_RE = re.compile(r'[\ud800-\udfff]')

# Fresh task numbers come from a run's 8 frontier rows: row s hands out
# s, s + 8, s + 16, ... so that up to 8 hand-outs of one run never wait on
# each other (schema.sql).
FRONTIER_SHARDS = 8
CLAIM_ROUNDS = 100          # a hand-out that keeps stepping over tasks gives up here
RATE_WINDOW = 600.0         # seconds over which a run's pace is measured
RATE_SAMPLE = 2000          # done tasks counted at most, to keep huge runs fast
RECONNECT_PAUSE = (0.05, 0.5)   # first and longest pause between reconnects, seconds
DEADLOCK_RETRIES = 10       # a transaction that lost a deadlock is tried this often


# ---------------------------------------------------------------------------
# Domain errors: what went wrong, in words a user can act on. The app maps
# each to its HTTP answer once (create_app).


class StoreError(Exception):
    """A request the store refuses."""


class RunNotFound(StoreError):
    def __init__(self, uuid: str) -> None:
        super().__init__(f'No run {uuid[:64]!r}.')


class WorkerNotFound(StoreError):
    def __init__(self, uuid: str) -> None:
        super().__init__(f'No worker {uuid[:64]!r} of yours; register it with POST /api/worker.')


class TaskNotFound(StoreError):
    def __init__(self, num_tasks: int) -> None:
        super().__init__(f'Task numbers of this run go from 0 to {num_tasks - 1}.')


class TaskNotHeld(StoreError):
    def __init__(self, worker: str, task: int) -> None:
        super().__init__(f'Worker {worker[:64]!r} does not hold task {task}: its lease ran '
                         'out, another worker took it over, or the run was restarted.')


class WorkerTaken(StoreError):
    def __init__(self, uuid: str) -> None:
        super().__init__(f'Worker {uuid[:64]!r} is registered with another hostname, pid '
                         'or user; use a new uuid.')


class InputsNotExpected(StoreError):
    """Inputs sent to a run without inputs, or for tasks outside the run."""


class InputsComplete(StoreError):
    def __init__(self, uuid: str) -> None:
        super().__init__(f'Every input of run {uuid} is stored already; inputs cannot '
                         'change once tasks may be handed out.')


class DatabaseUnavailable(Exception):
    """The database cannot answer now (down, locked, or out of connections)."""


# ---------------------------------------------------------------------------
# The database: one small object over PostgreSQL (psycopg 3 and its pool) or
# sqlite3 (a connection per thread). Only the store uses it.


class Dialects(NamedTuple):
    postgresql: str
    sqlite: str


# A quoted literal (kept as it is), or a run of whitespace and comments.
SQL_LITERAL_COMMENT_OR_SPACE = re.compile(r"('(?:[^']|'')*')|(?:\s|--[^\n]*)+")


def to_pyformat(sql: str) -> str:
    """A statement as psycopg takes it: `:name` placeholders as `%(name)s`,
    `%` as `%%`, and squeezed (comments dropped, each run of whitespace one
    space). psycopg parses a statement longer than 4 KiB anew on every call
    instead of caching it (0.2 ms of CPU per call): the hand-out statements
    are 4.1-4.8 KiB as written, 3.3-3.8 KiB squeezed."""
    sql = SQL_LITERAL_COMMENT_OR_SPACE.sub(lambda m: m.group(1) or ' ', sql).strip()
    sql = sql.replace('%', '%%')
    return re.sub(r'(?<![:\w]):([A-Za-z_]\w*)', r'%(\1)s', sql)


class Transaction:
    """Statements on one connection; inside `Database.run` they commit together.

    `retrying` is true when the database lost the connection during an
    earlier try of the same work, whose outcome is therefore unknown.
    """

    def __init__(self, db: Database, conn: Any, retrying: bool = False) -> None:
        self.db = db
        self.conn = conn
        self.retrying = retrying

    def _run(self, sql: str | Dialects, params: dict | None) -> Any:
        return self.db.run_on(self.conn, self.db.pick(sql), params or {})

    def one(self, sql: str | Dialects, params: dict | None = None) -> dict | None:
        return self._run(sql, params).fetchone()

    def all(self, sql: str | Dialects, params: dict | None = None) -> list[dict]:
        return self._run(sql, params).fetchall()

    def execute(self, sql: str | Dialects, params: dict | None = None) -> int:
        return self._run(sql, params).rowcount


class Database:
    """What every backend offers: run(work), one(), all(), execute(), transaction()."""

    dialect: str
    Error: type[Exception]      # the driver's base error

    def pick(self, sql: str | Dialects) -> str:
        return getattr(sql, self.dialect) if isinstance(sql, Dialects) else sql

    def run(self, work: Callable[[Transaction], T], atomic: bool = True) -> T:
        """work(tx), committed as one transaction (or statement by statement)."""
        with self.transaction(atomic) as tx:
            return work(tx)

    def one(self, sql: str | Dialects, params: dict | None = None) -> dict | None:
        return self.run(lambda tx: tx.one(sql, params), atomic=False)

    def all(self, sql: str | Dialects, params: dict | None = None) -> list[dict]:
        return self.run(lambda tx: tx.all(sql, params), atomic=False)

    def execute(self, sql: str | Dialects, params: dict | None = None) -> int:
        return self.run(lambda tx: tx.execute(sql, params), atomic=False)

    def run_on(self, conn: Any, sql: str, params: dict) -> Any:
        raise NotImplementedError

    def script(self, sql: str) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self, atomic: bool = True) -> Iterator[Transaction]:
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError


def dict_factory(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


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
    """PostgreSQL through a psycopg pool, riding out short outages.

    When the connection fails before the outcome of a piece of work is
    known (PostgreSQL restarted, a failover, a dropped connection), `run`
    reconnects and runs the work again, for up to `timeout` seconds, before
    giving up with DatabaseUnavailable (a 503). The work learns from
    `tx.retrying` that its first try may have committed. A transaction that
    lost a deadlock was rolled back whole and runs again at once.
    """

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
            # connection, not on each call (custom plans cost ~0.4 ms), and
            # by index however small the table looked when it was planned
            # (right after a VACUUM of an emptied tasks table, the hand-out
            # was planned with sequential scans of it and kept them as it
            # grew: 24 ms a claim at 2*10^5 tasks).
            kwargs={'autocommit': True, 'row_factory': dict_row,
                    'connect_timeout': max(1, int(timeout)),
                    'options': '-c plan_cache_mode=force_generic_plan -c enable_seqscan=off'},
            name='taskfarm')
        self.converted: dict[str, str] = {}

    def run(self, work: Callable[[Transaction], T], atomic: bool = True) -> T:
        deadline = time.monotonic() + self.timeout
        pause, longest = RECONNECT_PAUSE
        retrying, deadlocks = False, 0
        while True:
            try:
                return self.try_once(work, atomic, retrying, deadline)
            except self.pool_timeout_error as e:
                raise DatabaseUnavailable(str(e)) from e
            except self.psycopg.errors.TransactionRollback as e:
                # Rolled back whole (a deadlock lost): nothing to be unsure of.
                deadlocks += 1
                if deadlocks == DEADLOCK_RETRIES or time.monotonic() > deadline:
                    raise DatabaseUnavailable(str(e)) from e
                time.sleep(random.uniform(0, 0.01 * deadlocks))     # out of step
                continue
            except self.psycopg.OperationalError as e:
                # Dead connections go back to the pool marked bad; drop idle
                # ones too, so that the next try gets a live one.
                self.pool.check()
                if time.monotonic() + pause > deadline:
                    raise DatabaseUnavailable(str(e)) from e
                time.sleep(pause)
                pause = min(longest, pause * 2)
                retrying = True

    def try_once(self, work: Callable[[Transaction], T], atomic: bool, retrying: bool,
                 deadline: float) -> T:
        wait = max(0.1, deadline - time.monotonic())
        with self.pool.connection(timeout=wait) as conn:
            tx = Transaction(self, conn, retrying)
            if not atomic:
                return work(tx)
            with conn.transaction():
                return work(tx)

    def run_on(self, conn: Any, sql: str, params: dict) -> Any:
        query = self.converted.get(sql)
        if query is None:
            query = self.converted[sql] = to_pyformat(sql)
        return conn.execute(query, params)

    @contextmanager
    def transaction(self, atomic: bool = True) -> Iterator[Transaction]:
        """One transaction, not retried (for tools and tests)."""
        with self.pool.connection() as conn:
            if atomic:
                with conn.transaction():
                    yield Transaction(self, conn)
            else:
                yield Transaction(self, conn)

    def script(self, sql: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(sql)

    def close(self) -> None:
        self.pool.close()


def open_database(url: str, timeout: float = 5.0, pool_size: int = 10) -> Database:
    if url.startswith('sqlite:///'):
        return SqliteDatabase(url[len('sqlite:///'):], timeout)
    if url.startswith(('postgresql://', 'postgres://')):
        return PostgresDatabase(url, timeout, pool_size)
    raise ValueError(f'DATABASE_URL must start with sqlite:/// or postgresql://, not {url!r}')


def schema_path() -> Path:
    """schema.sql: beside this module in a checkout (and an editable install);
    a plain `pip install` puts it in <prefix>/share/taskfarm, above the
    module's site-packages, whatever the prefix."""
    here = Path(__file__).resolve().parent
    for place in [here, *(folder / 'share' / 'taskfarm' for folder in here.parents)]:
        if (place / 'schema.sql').exists():
            return place / 'schema.sql'
    raise FileNotFoundError(f'schema.sql is neither beside {__file__} nor in a share/taskfarm '
                            'above it: reinstall the package')


def schema_for(dialect: str) -> str:
    """The section of schema.sql for one dialect."""
    text = schema_path().read_text(encoding='utf-8')
    sections = re.split(r'^-- @(\w+)\s*$', text, flags=re.MULTILINE)
    return dict(zip(sections[1::2], sections[2::2], strict=True))[dialect]


# ---------------------------------------------------------------------------
# The owner rule, and who is asking.


def owned(table: str) -> str:
    """The owner rule: the caller's own rows of `table` (an alias), or any row for an admin."""
    return f'({table}.owner_id = :user_id OR :is_admin)'


# The id of the caller's run :run, as a scalar. Statements that read a run's
# tasks in `updated` order use it rather than a join: PostgreSQL then walks
# tasks_in_status in that order and stops at the LIMIT, where joined it sorts
# every task of the run in that status first (1.3 s instead of 2 ms for the
# newest 5,000 of 10^6 done tasks).
THE_RUN = f"(SELECT r.id FROM runs r WHERE r.uuid = :run AND {owned('r')})"


class Owner(NamedTuple):
    """Who is asking: every owned statement takes these two parameters."""

    user_id: int
    is_admin: bool

    @classmethod
    def of(cls, user: dict) -> Owner:
        return cls(user['id'], bool(user['is_admin']))

    def params(self, **more: Any) -> dict:
        return {'user_id': self.user_id, 'is_admin': self.is_admin, **more}


def valid_text(value: str, max_length: int) -> bool:
    """Text both databases can store: no NUL, no lone surrogate, not too long."""
    return (len(value) <= max_length and '\0' not in value
            and not UNPAIRED_SURROGATE_RE.search(value))


def check_run_uuid(uuid: str) -> None:
    if not UUID_RE.fullmatch(uuid):
        raise RunNotFound(uuid)


def check_worker_uuid(uuid: str) -> None:
    if not (1 <= len(uuid) <= 64 and valid_text(uuid, 64)):
        raise WorkerNotFound(uuid)


def percent_done(micropercent: int, num_tasks: int) -> float:
    """The run's percentDone from its exact sum of millionths of a percent.

    Integers carry no float dust, so no rounding hides the progress of a
    run of 10^9 tasks (one task done: 1e-07).
    """
    return min(100.0, max(0.0, micropercent / (num_tasks * 1_000_000)))


def run_status(row: dict) -> dict:
    """A run's status from its row and summed counts, with the API's names."""
    num_tasks = row['num_tasks']
    busy = row['computing'] + row['done'] + row['failed']
    status = {'id': row['id'], 'uuid': row['uuid'], 'numTasks': num_tasks,
              'name': row['name'], 'timeout': row['timeout'],
              'maxAttempts': row['max_attempts'], 'retries': row['retries'],
              'maxFailures': row['max_failures'], 'stopped': bool(row['stopped']),
              'percentDone': percent_done(row['micropercent'], num_tasks),
              'numWaiting': num_tasks - busy, 'numComputing': row['computing'],
              'numDone': row['done'], 'numFailed': row['failed']}
    if row['inputs'] is not None:   # a run without inputs answers as it always did
        status.update(inputs=row['inputs'], inputsMissing=row['inputs_missing'])
    return status


@dataclass(frozen=True)
class Update:
    """A change to one task: a PUT's body, or one item of a batch report."""

    task: int
    percent: float | None = None
    status: str | None = None
    message: str | None = None
    exit_code: int | None = None
    final: bool = False

    def row(self) -> dict:
        return {'n': self.task, 'percent': self.percent, 'status': self.status,
                'message': self.message, 'exit_code': self.exit_code, 'final': self.final}


def report_spans(updates: Sequence[Update]) -> list[list[Update]]:
    """The updates by task number, in spans of at most REPORT_SPAN numbers.

    A REPORT statement reads its span's range of tasks; a batch whose tasks
    lie far apart (retried ones among fresh ones) takes a statement per span.
    """
    spans: list[list[Update]] = []
    for update in sorted(updates, key=lambda update: update.task):
        if spans and update.task - spans[-1][0].task < REPORT_SPAN:
            spans[-1].append(update)
        else:
            spans.append([update])
    return spans


def update_params(updates: Sequence[Update]) -> dict:
    """Updates as the parameters of REPORT: one JSON that both dialects unpack
    into rows, and the task numbers."""
    return {'updates': json.dumps([update.row() for update in updates]),
            'tasks': json.dumps([update.task for update in updates]),
            'lowest': min(update.task for update in updates),
            'highest': max(update.task for update in updates)}


OK, NOT_HELD, UNKNOWN_TASK = 'ok', 'not held', 'unknown task'
Results = list[dict]    # [{"task": n, "result": "ok" | "not held" | "unknown task"}]


class Claim(NamedTuple):
    """What a hand-out gave: its tasks, and the results of the updates sent with it."""

    tasks: list[dict]
    results: Results | None = None


class Round(NamedTuple):
    """A hand-out so far: its tasks, the update results, and the last round's
    marker: 'end', or why to try for more ('stepped', 'busy')."""

    tasks: list[dict]
    results: Results | None
    note: str = 'end'


class Repeated(Exception):
    """The claim's request id was used before: roll back, and answer as the first time."""


# ---------------------------------------------------------------------------
# SQL fragments shared by statements.

# A run's counts: its run_stats rows (alias s) added up.
RUN_COUNTS = """
           CAST(sum(s.computing) AS integer) AS computing,
           CAST(sum(s.done) AS integer) AS done,
           CAST(sum(s.failed) AS integer) AS failed,
           CAST(sum(s.micropercent) AS bigint) AS micropercent"""

RUN_COLUMNS = """r.id, r.uuid, r.num_tasks, r.name, r.timeout, r.max_attempts, r.retries,
           r.max_failures, r.stopped, r.inputs, r.inputs_missing, r.created"""

TASK_COLUMNS = 't.id, t.task, t.status, t.percent, t.attempts, t.failures, t.message, t.exit_code'

# How an update u changes a task t of run r. A task reported failed for the
# first time since it last ran goes back to waiting while its failures stay
# within the run's retries, unless the report says the failure is final.
# A repeated report of a failed task counts no new failure.
NEWLY_FAILED = "(u.status = 'failed' AND t.status <> 'failed')"
STATUS_AFTER = f"""CASE WHEN {NEWLY_FAILED} AND NOT u.final
                      AND t.failures < COALESCE(r.retries, 0) THEN 'waiting'
                 ELSE COALESCE(u.status, t.status) END"""

# The answer of a hand-out: a task with its input, if the run has inputs.
HANDED_OUT = """id, task, status, percent, attempts, failures, message, exit_code,
       (SELECT i.input FROM task_inputs i WHERE i.run_id = {t}.run_id AND i.task = {t}.task)
       AS input"""


def report_statement(updates: str, named: str) -> str:
    """The report of updates u (`updates`, rows of n, percent, status,
    message, exit_code, final) to the tasks they name (`named`, a condition
    on t.task).

    Every update applies only to tasks of the caller's run and, when a
    worker is named, only to those that worker holds; one statement for a
    whole batch (of nearby tasks: see report_spans), whatever each item
    changes. It answers the numbers of the tasks changed.
    """
    return f"""
        UPDATE tasks AS t
        SET status = {STATUS_AFTER},
            failures = t.failures + CASE WHEN {NEWLY_FAILED} THEN 1 ELSE 0 END,
            percent = COALESCE(u.percent, t.percent),
            message = COALESCE(u.message, t.message),
            exit_code = COALESCE(u.exit_code, t.exit_code),
            worker_id = CASE WHEN {STATUS_AFTER} = 'waiting' THEN NULL ELSE t.worker_id END,
            updated = :now, lease_expires = :now + r.timeout
        FROM runs r, {updates}
        WHERE r.uuid = :run AND {owned('r')} AND t.run_id = r.id AND t.task = u.n
          AND {named}
          AND (CAST(:worker AS text) IS NULL OR t.worker_id = (
                SELECT w.id FROM workers w WHERE w.uuid = :worker AND {owned('w')}))
        RETURNING task
    """


# ---------------------------------------------------------------------------
# The PostgreSQL hand-out's statements (Store.CLAIM, CLAIM_WAITING, CLAIM_ONE).


def claim_statement(take_back: str, fresh: str, marker: str = '') -> str:
    """The PostgreSQL hand-out: whether to take back waiting rows and
    expired leases (`take_back`), the CTEs that take fresh numbers from
    frontier rows and make their tasks (`fresh`, ending in `created`),
    and the marker row that follows the tasks (`marker`: its note and
    where it comes from), if any.

    One statement, atomic across any number of server processes: rows
    are taken under FOR UPDATE SKIP LOCKED, so two hand-outs never take
    the same task. The marker says 'end' (no marker: 'end' too); 'stepped'
    when it stepped over numbers that a PUT had finished already (ask
    again); or 'busy' when it found frontier rows busy while it still
    wanted tasks (ask again, waiting for them).
    """
    marker_row = ('UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,'
                  + marker) if marker else ''
    return f"""
    WITH worker AS (
        SELECT w.id FROM workers w WHERE w.uuid = :worker AND {owned('w')}
    ), found AS (
        SELECT r.id, r.num_tasks, r.timeout, r.max_attempts, r.max_failures, r.stopped,
               r.inputs_missing
        FROM runs r
        WHERE r.uuid = :run AND {owned('r')} AND EXISTS (SELECT 1 FROM worker)
    ), exhausted AS (
        UPDATE tasks SET status = 'failed', updated = :now
        FROM found
        WHERE {take_back} AND tasks.run_id = found.id AND tasks.status = 'computing'
          AND tasks.lease_expires < :now AND tasks.attempts >= found.max_attempts
        RETURNING tasks.id
    ), run AS (
        -- A stopped run, or one still waiting for its inputs, hands out
        -- nothing; nor one that the failures just made stop it.
        SELECT * FROM found
        WHERE NOT stopped AND inputs_missing = 0
          AND (max_failures IS NULL OR NOT EXISTS (SELECT 1 FROM exhausted)
               OR (SELECT count(*) FROM exhausted)
                  + (SELECT sum(s.failed) FROM run_stats s WHERE s.run_id = found.id)
                  < max_failures)
    ), waiting AS (
        SELECT t.id, t.task FROM tasks t, run
        WHERE {take_back} AND t.run_id = run.id AND t.status = 'waiting'
        ORDER BY t.task LIMIT :count
        FOR UPDATE OF t SKIP LOCKED
    ), expired AS (
        SELECT t.id, t.task FROM tasks t, run
        WHERE {take_back} AND t.run_id = run.id AND t.status = 'computing'
          AND t.lease_expires < :now
          AND (run.max_attempts IS NULL OR t.attempts < run.max_attempts)
        ORDER BY t.lease_expires LIMIT :count
        FOR UPDATE OF t SKIP LOCKED
    ), reclaim AS (
        SELECT id, task FROM (SELECT * FROM waiting UNION ALL SELECT * FROM expired) c
        ORDER BY task LIMIT :count
    ), claimed AS (
        UPDATE tasks
        SET status = 'computing', worker_id = (SELECT id FROM worker),
            attempts = tasks.attempts + 1, started = :now, updated = :now,
            lease_expires = :now + run.timeout, claim_id = :claim
        FROM run
        WHERE tasks.id = ANY(ARRAY(SELECT id FROM reclaim))
        RETURNING tasks.*
    ), {fresh}
    SELECT {HANDED_OUT.format(t='h')}, h.fresh, NULL AS note
    FROM (SELECT *, false AS fresh FROM claimed
          UNION ALL SELECT *, true FROM created) h
    {marker_row}
    """


# The tasks made for the fresh numbers `picked`, ahead of the frontier.
CREATED = """created AS (
        INSERT INTO tasks (run_id, task, status, worker_id, attempts, started,
                           updated, lease_expires, claim_id)
        SELECT run.id, picked.task, 'computing', (SELECT id FROM worker), 1,
               :now, :now, :now + run.timeout, :claim
        FROM picked, run
        ON CONFLICT (run_id, task) DO UPDATE
        SET status = 'computing', worker_id = EXCLUDED.worker_id,
            attempts = tasks.attempts + 1, started = :now, updated = :now,
            lease_expires = EXCLUDED.lease_expires, claim_id = :claim
        WHERE tasks.status = 'waiting'
        RETURNING tasks.*
    )"""


def batch_claim(frontier_rows: str, take_back: str) -> str:
    """A batch hand-out: the lowest fresh numbers of the frontier rows taken
    (`frontier_rows`, a condition on f and its locking clause), 8 apart
    within a row, and a marker row always."""
    shards = FRONTIER_SHARDS
    return claim_statement(take_back, f"""need AS (
        SELECT :count - count(*) AS n FROM reclaim
    ), frontier AS (
        SELECT f.shard, f.next_task FROM run_frontier f, run
        WHERE f.run_id = run.id AND f.next_task < run.num_tasks
          AND (SELECT n FROM need) > 0
          {frontier_rows}
    ), picked AS (
        SELECT f.shard, f.next_task + {shards} * i AS task
        FROM frontier f, run, generate_series(0, (SELECT n FROM need) - 1) AS i
        WHERE f.next_task + {shards} * i < run.num_tasks
          AND f.next_task + {shards} * i NOT IN (SELECT task FROM reclaim)
        ORDER BY task LIMIT (SELECT n FROM need)
    ), advanced AS (
        UPDATE run_frontier f SET next_task = p.last + {shards}
        FROM (SELECT shard, max(task) AS last FROM picked GROUP BY shard) p, run
        WHERE f.run_id = run.id AND f.shard = p.shard
    ), {CREATED}""", """
           CASE WHEN (SELECT count(*) FROM picked) > (SELECT count(*) FROM created)
                THEN 'stepped'
                WHEN (SELECT count(*) FROM reclaim) + (SELECT count(*) FROM picked) < :count
                     AND EXISTS (SELECT 1 FROM run_frontier f, run
                                 WHERE f.run_id = run.id AND f.next_task < run.num_tasks
                                   AND f.shard NOT IN (SELECT shard FROM frontier))
                THEN 'busy' ELSE 'end' END
    FROM found""")


# The frontier row that a hand-out waits for when every row was busy: one
# row, chosen first and then locked alone (see Store.CLAIM_WAITING).
WAIT_FOR_ONE_ROW = f"""
              AND f.shard = (SELECT g.shard FROM run_frontier g
                             WHERE g.run_id = run.id AND g.next_task < run.num_tasks
                             ORDER BY (g.shard + :spread) % {FRONTIER_SHARDS} LIMIT 1)
            FOR UPDATE OF f"""


# ---------------------------------------------------------------------------
# The store.


class Store:
    """Every operation of the server on its database, one method each."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def close(self) -> None:
        self.db.close()

    # -- set-up and the token secret ----------------------------------------

    ADD_SECRET = """
        INSERT INTO settings (name, value) VALUES ('secret', :value)
        ON CONFLICT (name) DO NOTHING
    """

    def init(self) -> None:
        """Create the tables and a signing secret; safe to run twice."""
        self.db.script(schema_for(self.db.dialect))
        self.db.execute(self.ADD_SECRET, {'value': secrets.token_hex(32)})

    READ_SECRET = "SELECT value FROM settings WHERE name = 'secret'"

    def secret(self) -> str | None:
        """The stored token secret; DatabaseUnavailable if there are no tables to read."""
        try:
            row = self.db.one(self.READ_SECRET)
        except self.db.Error as e:
            raise DatabaseUnavailable(str(e)) from e
        return None if row is None else row['value']

    # -- users --------------------------------------------------------------

    USER_BY_ID = 'SELECT id, username, token_stamp, is_admin FROM users WHERE id = :id'

    def user_by_id(self, user_id: int) -> dict | None:
        user = self.db.one(self.USER_BY_ID, {'id': user_id})
        if user is not None:
            user['is_admin'] = bool(user['is_admin'])
        return user

    USER_BY_NAME = """
        SELECT id, password_hash, token_stamp FROM users WHERE username = :username
    """

    def user_by_name(self, username: str) -> dict | None:
        return self.db.one(self.USER_BY_NAME, {'username': username})

    ADD_USER = """
        INSERT INTO users (username, password_hash, token_stamp, is_admin)
        VALUES (:username, :password_hash, :token_stamp, :is_admin)
        ON CONFLICT (username) DO NOTHING
        RETURNING id
    """

    def add_user(self, username: str, password_hash: str, token_stamp: str,
                 is_admin: bool) -> bool:
        """Add a user; False if the name is taken."""
        return self.db.one(self.ADD_USER, {
            'username': username, 'password_hash': password_hash,
            'token_stamp': token_stamp, 'is_admin': is_admin}) is not None

    # A new token stamp makes every token issued before the change invalid.
    SET_PASSWORD = """
        UPDATE users SET password_hash = :password_hash, token_stamp = :token_stamp
        WHERE username = :username
    """

    def set_password(self, username: str, password_hash: str, token_stamp: str) -> bool:
        return self.db.execute(self.SET_PASSWORD, {
            'username': username, 'password_hash': password_hash,
            'token_stamp': token_stamp}) > 0

    COUNT_RUNS_OF = """
        SELECT count(*) AS runs FROM runs r JOIN users u ON u.id = r.owner_id
        WHERE u.username = :username
    """

    def count_runs_of(self, username: str) -> int:
        return self.db.one(self.COUNT_RUNS_OF, {'username': username})['runs']

    DELETE_USER = 'DELETE FROM users WHERE username = :username'

    def delete_user(self, username: str) -> bool:
        return self.db.execute(self.DELETE_USER, {'username': username}) > 0

    LIST_USERS = """
        SELECT u.username, u.is_admin,
               (SELECT count(*) FROM runs r WHERE r.owner_id = u.id) AS runs
        FROM users u ORDER BY u.username
    """

    def users(self) -> list[dict]:
        return self.db.all(self.LIST_USERS)

    # -- runs ---------------------------------------------------------------

    # The uuid is chosen before the statement, so that a retry after a lost
    # connection finds the run the first try made instead of making another.
    CREATE_RUN = """
        INSERT INTO runs (uuid, owner_id, num_tasks, name, timeout, max_attempts, retries,
                          max_failures, inputs, inputs_missing, created)
        VALUES (:uuid, :user_id, :num_tasks, :name, :timeout, :max_attempts, :retries,
                :max_failures, :inputs, :inputs_missing, :now)
        ON CONFLICT (uuid) DO UPDATE SET uuid = EXCLUDED.uuid
        RETURNING id
    """

    def create_run(self, owner: Owner, num_tasks: int, name: str | None = None,
                   timeout: int | None = None, max_attempts: int | None = None,
                   retries: int | None = None, max_failures: int | None = None,
                   inputs: str | None = None) -> dict:
        """A new run; with `inputs` ('text' or 'json') it hands out nothing until
        every task's input is stored."""
        uuid = secrets.token_hex(16)
        row = self.db.one(self.CREATE_RUN, owner.params(
            uuid=uuid, num_tasks=num_tasks, name=name, timeout=timeout,
            max_attempts=max_attempts, retries=retries, max_failures=max_failures,
            inputs=inputs, inputs_missing=num_tasks if inputs else 0, now=time.time()))
        return {'id': row['id'], 'uuid': uuid, 'numTasks': num_tasks}

    LIST_RUNS = f"""
        SELECT r.id, r.uuid, r.num_tasks, r.name FROM runs r
        WHERE {owned('r')}
        ORDER BY r.id
    """

    def runs(self, owner: Owner) -> list[dict]:
        return self.db.all(self.LIST_RUNS, owner.params())

    FIND_RUN = f"""
        SELECT r.id, r.num_tasks, r.inputs FROM runs r
        WHERE r.uuid = :run AND {owned('r')}
    """

    def find_run(self, owner: Owner, uuid: str) -> dict:
        """The run's id, size and kind of inputs, or RunNotFound."""
        check_run_uuid(uuid)
        row = self.db.one(self.FIND_RUN, owner.params(run=uuid))
        if row is None:
            raise RunNotFound(uuid)
        return row

    RUN_STATUS = f"""
        SELECT {RUN_COLUMNS}, {RUN_COUNTS}
        FROM runs r JOIN run_stats s ON s.run_id = r.id
        WHERE r.uuid = :run AND {owned('r')}
        GROUP BY r.id
    """

    def run_status(self, owner: Owner, uuid: str) -> dict:
        check_run_uuid(uuid)
        row = self.db.one(self.RUN_STATUS, owner.params(run=uuid))
        if row is None:
            raise RunNotFound(uuid)
        return run_status(row)

    # Every input is stored as its JSON, whatever the run's kind of inputs, so
    # that one json.loads gives the value back. An input sent again keeps its
    # first value: a chunk repeated after a lost answer changes nothing.
    LOCK_RUN_INPUTS = Dialects(
        postgresql=f"""
        SELECT r.id AS run_id, r.num_tasks, r.inputs, r.inputs_missing FROM runs r
        WHERE r.uuid = :run AND {owned('r')}
        FOR NO KEY UPDATE
        """,
        sqlite=f"""
        SELECT r.id AS run_id, r.num_tasks, r.inputs, r.inputs_missing FROM runs r
        WHERE r.uuid = :run AND {owned('r')}
        """)

    ADD_INPUTS = Dialects(
        postgresql="""
        INSERT INTO task_inputs (run_id, task, input)
        SELECT :run_id, :first + CAST(chunk.place AS integer) - 1, chunk.input
        FROM jsonb_array_elements_text(CAST(:inputs AS jsonb))
             WITH ORDINALITY AS chunk(input, place)
        ON CONFLICT (run_id, task) DO NOTHING
        """,
        sqlite="""
        INSERT INTO task_inputs (run_id, task, input)
        SELECT :run_id, :first + key, value FROM json_each(:inputs) WHERE true
        ON CONFLICT (run_id, task) DO NOTHING
        """)

    COUNT_INPUTS = """
        UPDATE runs SET inputs_missing = inputs_missing - :added
        WHERE id = :run_id
        RETURNING inputs_missing
    """

    def add_inputs(self, owner: Owner, uuid: str, first: int, inputs: Sequence[Any]) -> dict:
        """Store the inputs of tasks first, first + 1, ...: {"stored", "missing"}.

        The run hands out tasks once no input is missing (CLAIM). Raises
        InputsNotExpected (a run without inputs, or tasks outside the run)
        and InputsComplete.
        """
        check_run_uuid(uuid)
        params = owner.params(run=uuid, first=first,
                              inputs=json.dumps([json.dumps(value) for value in inputs]))

        def add(tx: Transaction) -> dict:
            run = tx.one(self.LOCK_RUN_INPUTS, params)
            if run is None:
                raise RunNotFound(uuid)
            if run['inputs'] is None:
                raise InputsNotExpected(f'Run {uuid} was created without inputs.')
            if run['inputs_missing'] == 0:
                raise InputsComplete(uuid)
            if first + len(inputs) > run['num_tasks']:
                raise InputsNotExpected(
                    f'These inputs are for tasks {first} to {first + len(inputs) - 1}; '
                    f'the run has tasks 0 to {run["num_tasks"] - 1}.')
            added = tx.execute(self.ADD_INPUTS, {**params, 'run_id': run['run_id']})
            missing = tx.one(self.COUNT_INPUTS, {'run_id': run['run_id'], 'added': added})
            return {'stored': added, 'missing': missing['inputs_missing']}

        return self.db.run(add)

    def pace(self, owner: Owner, run: dict, now: float) -> dict:
        """A run's pace: tasks done per minute lately, and the seconds left at it.

        `run` is a run summary (run_summary). A run younger than the window is
        measured over its life so far, a minute at least, so that one early
        task does not promise the moon. The newest RATE_SAMPLE done tasks are
        enough: beyond that the rate over them is as good.
        """
        window = max(60.0, min(RATE_WINDOW, now - run['created']))
        done = self.recently_done(owner, run['uuid'], now - window, RATE_SAMPLE)
        if done['done'] < RATE_SAMPLE:
            rate = done['done'] * 60 / window
        else:
            rate = done['done'] * 60 / max(1.0, now - done['oldest'])
        left = run['numTasks'] - run['numDone'] - run['numFailed']
        eta = 0.0 if left == 0 else left / rate * 60 if rate > 0 else None
        return {'donePerMinute': rate, 'etaSeconds': eta}

    # A delete first takes the run's frontier rows, in shard order as waiting
    # hand-outs take them: otherwise a hand-out holding one and waiting for
    # the run's row (to insert its tasks) deadlocks with the delete cascading
    # to it.
    LOCK_FRONTIER = Dialects(
        postgresql=f"""
        SELECT f.shard FROM run_frontier f JOIN runs r ON r.id = f.run_id
        WHERE r.uuid = :run AND {owned('r')}
        ORDER BY f.shard
        FOR UPDATE OF f
        """,
        sqlite='SELECT 1',  # the transaction already holds sqlite's one write lock
    )

    DELETE_RUN = f"""
        DELETE FROM runs
        WHERE uuid = :run AND {owned('runs')}
        RETURNING id
    """

    def delete_run(self, owner: Owner, uuid: str) -> None:
        """Delete a run and all its tasks."""
        check_run_uuid(uuid)
        params = owner.params(run=uuid)

        def delete(tx: Transaction) -> bool:
            tx.all(self.LOCK_FRONTIER, params)
            # A retry after a lost connection finds nothing: the first try did it.
            return tx.one(self.DELETE_RUN, params) is not None or tx.retrying

        if not self.db.run(delete):
            raise RunNotFound(uuid)

    # A restart clears the run's stop, then puts the chosen tasks back.
    RESUME_RUN = f"""
        UPDATE runs SET stopped = false
        WHERE uuid = :run AND {owned('runs')}
        RETURNING id
    """

    RESTART = Dialects(*(f"""
        UPDATE tasks
        SET status = 'waiting', percent = CASE WHEN :reset THEN 0 ELSE percent END,
            attempts = 0, failures = 0, message = NULL, exit_code = NULL,
            worker_id = NULL, claim_id = NULL, lease_expires = NULL, updated = :now
        WHERE run_id = {THE_RUN}
          AND (NOT :unfinished OR status <> 'done')
          AND (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
          AND (CAST(:ranges AS text) IS NULL OR EXISTS (
                SELECT 1 FROM {ranges} WHERE task BETWEEN low AND high))
    """ for ranges in (
        "jsonb_to_recordset(CAST(:ranges AS jsonb)) AS chosen(low integer, high integer)",
        ("(SELECT json_extract(value, '$.low') AS low, json_extract(value, '$.high') AS high"
         " FROM json_each(:ranges))"))))

    def restart(self, owner: Owner, uuid: str, reset_progress: bool = False,
                status: str | None = None,
                ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """Put tasks back to waiting: the unfinished ones, or all (reset_progress),
        or with `status` and/or `ranges` exactly the chosen ones."""
        check_run_uuid(uuid)
        chosen = status is not None or ranges is not None
        params = owner.params(
            run=uuid, now=time.time(), reset=reset_progress, status=status,
            unfinished=not chosen and not reset_progress,
            ranges=None if ranges is None else json.dumps(
                [{'low': low, 'high': high} for low, high in ranges]))

        def restart(tx: Transaction) -> bool:
            if tx.one(self.RESUME_RUN, params) is None:
                return False
            tx.execute(self.RESTART, params)
            return True

        if not self.db.run(restart):
            raise RunNotFound(uuid)

    # -- the hand-out --------------------------------------------------------
    #
    # Order: rows that are waiting (or whose lease ran out), lowest number
    # first; then the next numbers never handed out, lowest first. Each
    # claim has a claim id, written on the tasks it hands out: a claim that
    # is repeated (the worker sends the same requestId, recorded in
    # `claims`) or retried after a lost connection gets those tasks back
    # instead of new ones.

    # The lowest fresh numbers: from as many free frontier rows as it needs.
    CLAIM = batch_claim(f"""
            ORDER BY f.next_task LIMIT least((SELECT n FROM need), {FRONTIER_SHARDS})
            FOR UPDATE OF f SKIP LOCKED""", 'true')
    # When every frontier row was busy: wait for one (further_rounds) and
    # take the whole batch from it (numbers 8 apart), fresh numbers only, so
    # that no task row is held while waiting (a delete, which takes the
    # frontier rows and then the tasks, would deadlock with it). Starting
    # from a random shard spreads the waiting hand-outs over all of them.
    # The row is chosen first and then locked alone: locked with a LIMIT, a
    # row that ran out while we waited would stay locked as the next one was
    # waited for, and two such hand-outs deadlocked (15 times in 10 s at
    # the end of a run of 6,000 tasks in the exactly-once test).
    CLAIM_WAITING = batch_claim(WAIT_FOR_ONE_ROW, 'false')
    # A single task (count 1, the original protocol's hand-out): the next
    # number of the lowest free frontier row or, when every row was busy and
    # nothing was taken back, of one row waited for as above (only with
    # :wait, never in a transaction that holds rows already); a marker row
    # only when it hands out nothing. One statement, busy or not, where a
    # 'busy' answer and a waiting round took two (a sixth of the hand-outs
    # at 32 connections); no series of numbers nor counts to make.
    CLAIM_ONE = claim_statement('true', f"""frontier AS (
            SELECT f.shard FROM run_frontier f, run
            WHERE f.run_id = run.id AND f.next_task < run.num_tasks
              AND NOT EXISTS (SELECT 1 FROM reclaim)
            ORDER BY f.next_task LIMIT 1
            FOR UPDATE OF f SKIP LOCKED
        ), waited AS (
            SELECT f.shard FROM run_frontier f, run
            WHERE f.run_id = run.id AND f.next_task < run.num_tasks
              AND NOT EXISTS (SELECT 1 FROM reclaim) AND NOT EXISTS (SELECT 1 FROM exhausted)
              AND NOT EXISTS (SELECT 1 FROM frontier) AND CAST(:wait AS boolean)
              {WAIT_FOR_ONE_ROW}
        ), picked AS (
            UPDATE run_frontier f SET next_task = f.next_task + {FRONTIER_SHARDS}
            FROM (SELECT shard FROM frontier UNION ALL SELECT shard FROM waited) chosen, run
            WHERE f.run_id = run.id AND f.shard = chosen.shard
            RETURNING f.next_task - {FRONTIER_SHARDS} AS task
        ), {CREATED}""", """
               CASE WHEN EXISTS (SELECT 1 FROM picked) THEN 'stepped'
                    WHEN EXISTS (SELECT 1 FROM run_frontier f, run
                                 WHERE f.run_id = run.id AND f.next_task < run.num_tasks)
                    THEN 'busy' ELSE 'end' END
        FROM found
        WHERE NOT EXISTS (SELECT 1 FROM claimed) AND NOT EXISTS (SELECT 1 FROM created)""")

    # Found by the hand-out when it has nothing to give: is there a run at
    # all (for the 404), and the run and worker for the sqlite steps.
    CLAIM_PARTIES = f"""
        SELECT r.id AS run_id, r.num_tasks, r.timeout, r.max_attempts, r.stopped,
               r.inputs_missing, w.id AS worker_id
        FROM runs r, workers w
        WHERE r.uuid = :run AND {owned('r')} AND w.uuid = :worker AND {owned('w')}
    """

    RECORD_CLAIM = f"""
        INSERT INTO claims (run_id, worker_id, request_id, claim_id, results)
        SELECT r.id, w.id, :request, :claim, :results FROM runs r, workers w
        WHERE r.uuid = :run AND {owned('r')} AND w.uuid = :worker AND {owned('w')}
        ON CONFLICT (run_id, worker_id, request_id) DO NOTHING
        RETURNING claim_id
    """

    # The tasks of an earlier claim that the worker still holds, computing:
    # their leases renewed, no hand-out counted.
    REPEAT_CLAIM = f"""
        UPDATE tasks
        SET lease_expires = :now + (SELECT r.timeout FROM runs r WHERE r.id = tasks.run_id),
            updated = :now
        WHERE run_id = {THE_RUN}
          AND worker_id = (SELECT w.id FROM workers w WHERE w.uuid = :worker AND {owned('w')})
          AND status = 'computing'
          AND claim_id = COALESCE(
              (SELECT c.claim_id FROM claims c
               WHERE c.run_id = tasks.run_id AND c.worker_id = tasks.worker_id
                 AND c.request_id = CAST(:request AS text)), :claim)
        RETURNING {HANDED_OUT.format(t='tasks')}
    """

    # sqlite has no data-modifying CTEs; the same steps run as statements in
    # one BEGIN IMMEDIATE transaction, atomic because sqlite has one writer.
    # INDEXED BY: once ANALYZE has run, sqlite would rather walk the whole
    # (run_id, task) index in task order (62 ms at 10^6 tasks, not 0.1 ms).
    SQLITE_EXHAUST = """
        UPDATE tasks SET status = 'failed', updated = :now
        WHERE run_id = :run_id AND status = 'computing'
          AND lease_expires IS NOT NULL AND lease_expires < :now
          AND attempts >= :max_attempts
    """

    STOPPED = 'SELECT stopped FROM runs WHERE id = :run_id'

    SQLITE_RECLAIM = f"""
        UPDATE tasks
        SET status = 'computing', worker_id = :worker_id, attempts = attempts + 1,
            started = :now, updated = :now, lease_expires = :now + :timeout,
            claim_id = :claim
        WHERE id IN (
            SELECT id FROM (
                SELECT * FROM (SELECT id, task FROM tasks INDEXED BY tasks_waiting
                               WHERE run_id = :run_id AND status = 'waiting'
                               ORDER BY task LIMIT :count)
                UNION ALL
                SELECT * FROM (SELECT id, task FROM tasks INDEXED BY tasks_leased
                               WHERE run_id = :run_id AND status = 'computing'
                                 AND lease_expires IS NOT NULL AND lease_expires < :now
                                 AND (:max_attempts IS NULL OR attempts < :max_attempts)
                               ORDER BY lease_expires LIMIT :count)
            ) ORDER BY task LIMIT :count)
        RETURNING {HANDED_OUT.format(t='tasks')}
    """

    SQLITE_FRONTIER = """
        SELECT shard, next_task FROM run_frontier
        WHERE run_id = :run_id AND next_task < :num_tasks
    """

    SQLITE_ADVANCE = """
        UPDATE run_frontier
        SET next_task = (SELECT json_extract(value, '$[1]') FROM json_each(:advance)
                         WHERE json_extract(value, '$[0]') = shard)
        WHERE run_id = :run_id
          AND shard IN (SELECT json_extract(value, '$[0]') FROM json_each(:advance))
    """

    SQLITE_CREATE = f"""
        INSERT INTO tasks (run_id, task, status, worker_id, attempts, started, updated,
                           lease_expires, claim_id)
        SELECT :run_id, value, 'computing', :worker_id, 1, :now, :now, :now + :timeout, :claim
        FROM json_each(:numbers) WHERE true
        ON CONFLICT (run_id, task) DO UPDATE
        SET status = 'computing', worker_id = excluded.worker_id,
            attempts = tasks.attempts + 1, started = :now, updated = :now,
            lease_expires = excluded.lease_expires, claim_id = :claim
        WHERE tasks.status = 'waiting'
        RETURNING {HANDED_OUT.format(t='tasks')}
    """

    CLAIM_RESULTS = f"""
        SELECT c.results FROM claims c, runs r, workers w
        WHERE r.uuid = :run AND {owned('r')} AND w.uuid = :worker AND {owned('w')}
          AND c.run_id = r.id AND c.worker_id = w.id AND c.request_id = :request
    """

    def claim(self, owner: Owner, run: str, worker: str, count: int = 1,
              request_id: str | None = None,
              updates: Sequence[Update] | None = None) -> Claim:
        """Hand the worker up to `count` tasks, after applying its `updates`.

        A `request_id` the worker used before on this run gets that claim's
        tasks back (those it still holds, computing) and that claim's update
        results, ignoring count and updates. Raises RunNotFound or WorkerNotFound.
        """
        check_run_uuid(run)
        check_worker_uuid(worker)
        # With a request id or updates the first round is one transaction:
        # the updates applied, the claim recorded and the tasks handed out
        # together, or none of it. It holds rows then, so it must not wait
        # for a busy frontier row (a delete takes those first, then tasks).
        atomic = (request_id is not None or updates is not None
                  or self.db.dialect == 'sqlite')
        params = owner.params(run=run, worker=worker, count=count, request=request_id,
                              claim=random.getrandbits(62), wait=not atomic,
                              spread=random.randrange(FRONTIER_SHARDS))
        try:
            handed = self.db.run(lambda tx: self.first_round(tx, params, updates), atomic)
        except Repeated:
            handed = self.db.run(lambda tx: self.repeated(tx, params, updates), atomic=False)
        if handed is None:
            self.db.run(lambda tx: self.parties(tx, params), atomic=False)
        if self.db.dialect == 'postgresql':
            handed = self.further_rounds(handed, params, count)
        return Claim(sorted_handout(handed.tasks), handed.results)

    def first_round(self, tx: Transaction, params: dict,
                    updates: Sequence[Update] | None) -> Round | None:
        """Updates, the claim's record and the first hand-out; None: unknown run or worker."""
        params['now'] = time.time()
        if tx.retrying and params['request'] is None:
            # The lost try may have committed: then its tasks carry our claim id.
            again = tx.all(self.REPEAT_CLAIM, params)
            if again:
                return Round(again, self.apply(tx, params, updates))
        results = self.apply(tx, params, updates)
        if params['request'] is not None:
            recorded = tx.one(self.RECORD_CLAIM, {**params, 'results': json.dumps(results)})
            if recorded is None:
                self.parties(tx, params)
                raise Repeated  # roll the updates back: they were applied the first time
        if self.db.dialect == 'sqlite':
            return self.claim_sqlite(tx, params, results)
        return self.claim_round(tx, self.hand_out(params['count'], waiting=False), params,
                                Round([], results))

    def repeated(self, tx: Transaction, params: dict,
                 updates: Sequence[Update] | None) -> Round:
        """A repeated claim: its tasks still held and computing, and its first answer's results."""
        params['now'] = time.time()
        tasks = tx.all(self.REPEAT_CLAIM, params)
        results = None
        if updates is not None:
            row = tx.one(self.CLAIM_RESULTS, params)
            results = (json.loads(row['results']) if row and row['results'] else None) or []
        return Round(tasks, results)

    def hand_out(self, count: int, waiting: bool) -> str:
        """The PostgreSQL hand-out statement for `count` tasks, waiting for a
        busy frontier row or not."""
        if count == 1:
            return self.CLAIM_ONE   # it waits by itself
        return self.CLAIM_WAITING if waiting else self.CLAIM

    def claim_round(self, tx: Transaction, statement: str, params: dict,
                    so_far: Round) -> Round | None:
        """One PostgreSQL hand-out statement; None if the run or worker is unknown."""
        rows = tx.all(statement, params)
        if not rows:
            return None
        tasks = [row for row in rows if row['note'] is None]
        note = next((row['note'] for row in rows if row['note'] is not None), 'end')
        return Round(so_far.tasks + tasks, so_far.results, note)

    def further_rounds(self, handed: Round, params: dict, count: int) -> Round:
        """PostgreSQL rounds after a first one that stepped over tasks or met busy rows.

        A claim that met busy frontier rows and has tasks already answers with
        them (the worker will ask again); one that has none waits for one busy
        row and takes what it wants from that row alone. So a waiting hand-out
        never holds one frontier row while it waits for another, and hand-outs
        cannot deadlock over them.
        """
        for _ in range(CLAIM_ROUNDS):
            busy = handed.note == 'busy'
            if handed.note == 'end' or len(handed.tasks) >= count or (busy and handed.tasks):
                break
            next_params = {**params, 'count': count - len(handed.tasks), 'request': None,
                           'wait': True, 'spread': random.randrange(FRONTIER_SHARDS)}
            handed = self.db.run(lambda tx, so_far=handed, wanted=next_params: self.next_round(
                tx, wanted, so_far), atomic=False)
        return handed

    def next_round(self, tx: Transaction, params: dict, so_far: Round) -> Round:
        params['now'] = time.time()
        if tx.retrying:
            # The lost try may have committed: every task of this claim so far.
            return Round(tx.all(self.REPEAT_CLAIM, params), so_far.results, 'stepped')
        statement = self.hand_out(params['count'], waiting=so_far.note != 'stepped')
        return self.claim_round(tx, statement, params, so_far) or Round(so_far.tasks,
                                                                        so_far.results)

    def claim_sqlite(self, tx: Transaction, params: dict,
                     results: Results | None) -> Round | None:
        """The sqlite hand-out: the same steps as CLAIM, in one transaction."""
        parties = tx.one(self.CLAIM_PARTIES, params)
        if parties is None:
            return None
        if parties['stopped'] or parties['inputs_missing']:
            return Round([], results)
        params = {**params, **parties}
        if tx.execute(self.SQLITE_EXHAUST, params) and tx.one(self.STOPPED, params)['stopped']:
            return Round([], results)   # those failures stopped the run
        tasks = [{**row, 'fresh': False} for row in tx.all(self.SQLITE_RECLAIM, params)]
        taken = {row['task'] for row in tasks}
        for _ in range(CLAIM_ROUNDS):
            wanted = params['count'] - len(tasks)
            numbers, advance = fresh_numbers(tx.all(self.SQLITE_FRONTIER, params), wanted,
                                             parties['num_tasks'], taken)
            if not numbers:
                break
            tx.execute(self.SQLITE_ADVANCE, {**params, 'advance': json.dumps(advance)})
            created = tx.all(self.SQLITE_CREATE, {**params, 'numbers': json.dumps(numbers)})
            tasks += [{**row, 'fresh': True} for row in created]
            taken.update(numbers)   # numbers a PUT finished already are stepped over
        return Round(tasks, results)

    def parties(self, tx: Transaction, params: dict) -> dict:
        """The run and worker of a hand-out or report, or which of them is unknown."""
        found = tx.one(self.CLAIM_PARTIES, params)
        if found is not None:
            return found
        if tx.one(self.FIND_RUN, params) is None:
            raise RunNotFound(params['run'])
        raise WorkerNotFound(params['worker'])

    # -- task updates ---------------------------------------------------------

    # The unpacked updates (u) of a batch: one JSON that each dialect
    # unpacks into rows. The range of task numbers keeps PostgreSQL on the
    # unique (run_id, task) index: a generic plan made while the table was
    # small used it for run_id alone, and read every task of the run for
    # each report (one worker in batches of 100: 1,000 tasks a second at
    # 2*10^5 tasks done, down from 10,000 at the start; 20,000 throughout
    # with the range).
    REPORT = Dialects(report_statement(
        """jsonb_to_recordset(CAST(:updates AS jsonb))
               AS u(n integer, percent double precision, status text, message text,
                    exit_code integer, final boolean)""",
        """t.task BETWEEN :lowest AND :highest
          AND t.task = ANY(ARRAY(SELECT CAST(value AS integer)
                                FROM jsonb_array_elements_text(CAST(:tasks AS jsonb))))"""),
        report_statement("""(SELECT json_extract(value, '$.n') AS n,
                   json_extract(value, '$.percent') AS percent,
                   json_extract(value, '$.status') AS status,
                   json_extract(value, '$.message') AS message,
                   json_extract(value, '$.exit_code') AS exit_code,
                   json_extract(value, '$.final') AS final
            FROM json_each(:updates)) AS u""",
        "t.task IN (SELECT value FROM json_each(:tasks))"))
    # One update (a PUT, most reports of one task) as scalar parameters,
    # the same in both dialects: no JSON to unpack, a tenth cheaper.
    REPORT_ONE = report_statement("""(SELECT CAST(:n AS integer) AS n,
                   CAST(:percent AS double precision) AS percent,
                   CAST(:status AS text) AS status, CAST(:message AS text) AS message,
                   CAST(:exit_code AS integer) AS exit_code,
                   CAST(:final AS boolean) AS final) AS u""", 't.task = :n')

    # A PUT without a worker (the original client's) on a task that has no
    # row yet: the row is made first, waiting at 0%.
    ADD_TASK_ROW = f"""
        INSERT INTO tasks (run_id, task, updated)
        SELECT r.id, :n, :now FROM runs r
        WHERE r.uuid = :run AND {owned('r')} AND :n < r.num_tasks
        ON CONFLICT (run_id, task) DO NOTHING
    """

    def apply(self, tx: Transaction, params: dict,
              updates: Sequence[Update] | None) -> Results | None:
        """Apply a worker's updates in tx: a result per update, in order."""
        if updates is None:
            return None
        changed = set()
        for span in report_spans(updates):
            changed.update(row['task'] for row in self.report_span(tx, params, span))
        num_tasks = MAX_INT + 1
        if len(changed) < len(updates):
            num_tasks = self.parties(tx, params)['num_tasks']
        return [{'task': update.task,
                 'result': OK if update.task in changed
                 else UNKNOWN_TASK if update.task >= num_tasks else NOT_HELD}
                for update in updates]

    def report_span(self, tx: Transaction, params: dict, span: Sequence[Update]) -> list[dict]:
        """Apply the updates of one span (see report_spans): the tasks changed."""
        if len(span) == 1:
            return tx.all(self.REPORT_ONE, {**params, **span[0].row()})
        return tx.all(self.REPORT, {**params, **update_params(span)})

    def report(self, owner: Owner, run: str, worker: str,
               updates: Sequence[Update]) -> Results:
        """A worker's batch report: a result per update ('ok', 'not held', 'unknown task')."""
        check_run_uuid(run)
        check_worker_uuid(worker)
        params = owner.params(run=run, worker=worker)

        def report(tx: Transaction) -> Results:
            params['now'] = time.time()
            return self.apply(tx, params, updates)

        return self.db.run(report, atomic=len(report_spans(updates)) > 1)

    def update_task(self, owner: Owner, run: str, update: Update,
                    worker: str | None = None) -> None:
        """A PUT: with a worker, only while it holds the task (else TaskNotHeld)."""
        check_run_uuid(run)
        if worker is not None:
            check_worker_uuid(worker)
        if not 0 <= update.task <= MAX_INT:
            raise TaskNotFound(self.find_run(owner, run)['num_tasks'])
        params = owner.params(run=run, worker=worker)

        def put(tx: Transaction) -> bool:
            params['now'] = time.time()
            return bool(self.report_span(tx, params, [update]))

        def add_row_and_put(tx: Transaction) -> bool:
            params['now'] = time.time()
            tx.execute(self.ADD_TASK_ROW, {**params, 'n': update.task})
            return put(tx)

        # One statement for a task that has its row; a task without one (no
        # worker named) gets it made and updated in one transaction.
        if self.db.run(put, atomic=False) or (
                worker is None and self.db.run(add_row_and_put, atomic=True)):
            return
        num_tasks = self.find_run(owner, run)['num_tasks']
        if update.task >= num_tasks:
            raise TaskNotFound(num_tasks)
        if worker is not None:
            self.find_worker(owner, worker)
            raise TaskNotHeld(worker, update.task)

    # -- tasks --------------------------------------------------------------

    GET_TASK = f"""
        SELECT r.num_tasks, r.inputs, {TASK_COLUMNS},
               (SELECT i.input FROM task_inputs i
                WHERE i.run_id = r.id AND i.task = :task) AS input
        FROM runs r LEFT JOIN tasks t ON t.run_id = r.id AND t.task = :task
        WHERE r.uuid = :run AND {owned('r')}
    """

    def task(self, owner: Owner, run: str, task: int) -> dict:
        """One task (id None when it has no row yet); the run's inputs kind with it."""
        check_run_uuid(run)
        if not 0 <= task <= MAX_INT:
            raise TaskNotFound(self.find_run(owner, run)['num_tasks'])
        row = self.db.one(self.GET_TASK, owner.params(run=run, task=task))
        if row is None:
            raise RunNotFound(run)
        if task >= row['num_tasks']:
            raise TaskNotFound(row['num_tasks'])
        row['task'] = task
        return row

    LIST_TASKS = f"""
        SELECT {TASK_COLUMNS}, t.started, t.updated,
               w.uuid AS worker_uuid, w.hostname, w.pid
        FROM runs r JOIN tasks t ON t.run_id = r.id
        LEFT JOIN workers w ON w.id = t.worker_id
        WHERE r.uuid = :run AND {owned('r')} AND t.task > :after
          AND (CAST(:status AS text) IS NULL OR t.status = CAST(:status AS text))
        ORDER BY t.task
        LIMIT :limit
    """

    def list_tasks(self, owner: Owner, run: str, status: str | None = None,
                   after: int = -1, limit: int = 100) -> list[dict]:
        """The tasks that have a row, by number, after `after`."""
        check_run_uuid(run)
        rows = self.db.all(self.LIST_TASKS, owner.params(
            run=run, status=status, after=after, limit=limit))
        if not rows:
            self.find_run(owner, run)
        return rows

    LIST_ATTEMPTS = f"""
        SELECT a.attempt, a.started, a.ended, a.outcome, a.exit_code, a.message,
               w.uuid AS worker_uuid, w.hostname, w.pid
        FROM runs r JOIN attempts a ON a.run_id = r.id AND a.task = :task
        LEFT JOIN workers w ON w.id = a.worker_id
        WHERE r.uuid = :run AND {owned('r')}
        ORDER BY a.id
        LIMIT :limit
    """

    def attempts(self, owner: Owner, run: str, task: int, limit: int = 1000) -> list[dict]:
        """The ended attempts of a task that did not end done, oldest first."""
        num_tasks = self.find_run(owner, run)['num_tasks']
        if not 0 <= task < num_tasks:
            raise TaskNotFound(num_tasks)
        return self.db.all(self.LIST_ATTEMPTS, owner.params(run=run, task=task, limit=limit))

    # -- workers ------------------------------------------------------------

    REGISTER_WORKER = """
        INSERT INTO workers (uuid, owner_id, hostname, pid, start, last_seen)
        VALUES (:uuid, :user_id, :hostname, :pid, :now, :now)
        ON CONFLICT (uuid) DO NOTHING
        RETURNING id
    """

    # Identity, not access: the same uuid of another user's is a clash even for an admin.
    SAME_WORKER = """
        SELECT w.id FROM workers w
        WHERE w.uuid = :uuid AND w.hostname = :hostname AND w.pid = :pid
          AND w.owner_id = :user_id
    """

    def register_worker(self, owner: Owner, uuid: str, hostname: str, pid: int) -> int:
        """The worker's id; registering the same worker again is no error."""
        params = owner.params(uuid=uuid, hostname=hostname, pid=pid, now=time.time())
        row = self.db.one(self.REGISTER_WORKER, params) or self.db.one(self.SAME_WORKER, params)
        if row is None:
            raise WorkerTaken(uuid)
        return row['id']

    FIND_WORKER = f"""
        SELECT w.id FROM workers w WHERE w.uuid = :worker AND {owned('w')}
    """

    def find_worker(self, owner: Owner, uuid: str) -> int:
        check_worker_uuid(uuid)
        row = self.db.one(self.FIND_WORKER, owner.params(worker=uuid))
        if row is None:
            raise WorkerNotFound(uuid)
        return row['id']

    # A worker's last sign of life is its heartbeat or its latest task update.
    LIST_WORKERS = Dialects(*(f"""
        SELECT w.id, w.uuid, w.hostname, w.pid, w.start,
               {last_seen} AS last_seen,
               COALESCE(h.computing, 0) AS computing
        FROM workers w LEFT JOIN (
            SELECT worker_id, count(*) AS computing, max(updated) AS updated
            FROM tasks WHERE status = 'computing' GROUP BY worker_id
        ) h ON h.worker_id = w.id
        WHERE {owned('w')}
        ORDER BY w.id
    """ for last_seen in ('greatest(w.last_seen, h.updated)',
                          'max(w.last_seen, COALESCE(h.updated, 0))')))

    def workers(self, owner: Owner) -> list[dict]:
        return self.db.all(self.LIST_WORKERS, owner.params())

    TOUCH_WORKER = f"""
        UPDATE workers AS w SET last_seen = :now
        WHERE w.uuid = :worker AND {owned('w')}
        RETURNING id
    """

    # Without a list, every computing task the worker holds (Part 2); with
    # one, only the listed tasks of the run, so that a task the worker lost
    # track of comes back to the pool when its lease runs out.
    RENEW_LEASES = Dialects(*(f"""
        UPDATE tasks AS t SET lease_expires = :now + r.timeout, updated = :now
        FROM runs r, workers w
        WHERE w.uuid = :worker AND {owned('w')} AND t.worker_id = w.id
          AND t.status = 'computing' AND r.id = t.run_id AND r.timeout IS NOT NULL
          AND (CAST(:run AS text) IS NULL OR (r.uuid = :run AND {owned('r')}
               AND t.task IN (SELECT {listed})))
    """ for listed in (('CAST(value AS integer) FROM jsonb_array_elements_text('
                        'CAST(:tasks AS jsonb))'),
                       'value FROM json_each(:tasks)')))

    def heartbeat(self, owner: Owner, worker: str, run: str | None = None,
                  tasks: Sequence[int] = ()) -> None:
        """A worker's sign of life: renews its leases (all, or those listed of `run`)."""
        check_worker_uuid(worker)
        if run is not None:
            check_run_uuid(run)
        params = owner.params(worker=worker, run=run, tasks=json.dumps(list(tasks)),
                              now=time.time())

        def beat(tx: Transaction) -> bool:
            if tx.one(self.TOUCH_WORKER, params) is None:
                return False
            tx.execute(self.RENEW_LEASES, params)
            return True

        if run is not None:
            self.find_run(owner, run)
        if not self.db.run(beat):
            raise WorkerNotFound(worker)

    # -- the dashboard --------------------------------------------------------
    #
    # The counts are the API's (run_stats summed, then run_status). The task
    # queries name their status literally and read the tasks_in_status index
    # (run_id, status, updated), or for computing tasks tasks_held, so a run
    # of 10^6 tasks costs no scan.

    RUN_SUMMARIES = """
        SELECT {columns}, u.username AS owner, {counts},
               count(*) OVER () AS total
        FROM runs r
        JOIN users u ON u.id = r.owner_id
        JOIN run_stats s ON s.run_id = r.id
        WHERE {which} AND {owned}
        GROUP BY r.id, u.username
        ORDER BY r.id DESC
        LIMIT :limit
    """
    LIST_RUN_SUMMARIES = RUN_SUMMARIES.format(
        which='1 = 1', owned=owned('r'), counts=RUN_COUNTS, columns=RUN_COLUMNS)
    ONE_RUN_SUMMARY = RUN_SUMMARIES.format(
        which='r.uuid = :run', owned=owned('r'), counts=RUN_COUNTS, columns=RUN_COLUMNS)

    def run_summaries(self, owner: Owner, limit: int) -> tuple[list[dict], int]:
        """The newest runs with their status, owner and creation time; and how many in all."""
        rows = self.db.all(self.LIST_RUN_SUMMARIES, owner.params(limit=limit))
        return [summary(row) for row in rows], rows[0]['total'] if rows else 0

    def run_summary(self, owner: Owner, uuid: str) -> dict:
        check_run_uuid(uuid)
        row = self.db.one(self.ONE_RUN_SUMMARY, owner.params(run=uuid, limit=1))
        if row is None:
            raise RunNotFound(uuid)
        return summary(row)

    # The newest done tasks of the window, at most :sample of them: exact up
    # to that many, and beyond it the rate over the newest :sample is as good.
    RECENTLY_DONE = f"""
        SELECT count(*) AS done, min(updated) AS oldest FROM (
            SELECT t.updated FROM tasks t
            WHERE t.run_id = {THE_RUN} AND t.status = 'done' AND t.updated >= :since
            ORDER BY t.updated DESC
            LIMIT :sample
        ) recent
    """

    def recently_done(self, owner: Owner, uuid: str, since: float, sample: int) -> dict:
        """How many tasks were done since `since` (at most `sample`), and the oldest's time."""
        return self.db.one(self.RECENTLY_DONE, owner.params(run=uuid, since=since,
                                                            sample=sample))

    # Longest silent first, so tasks whose lease ran out head the table.
    TASKS_IN_STATUS = f"""
        SELECT t.task, t.percent, t.attempts, t.failures, t.exit_code, t.message,
               t.started, t.updated, w.uuid AS worker_uuid, w.hostname, w.pid
        FROM tasks t LEFT JOIN workers w ON w.id = t.worker_id
        WHERE t.run_id = {THE_RUN} AND t.status = '{{status}}'
        ORDER BY {{order}}
        LIMIT :limit
    """
    COMPUTING_TASKS = TASKS_IN_STATUS.format(status='computing', order='t.updated, t.task')
    FAILED_TASKS = TASKS_IN_STATUS.format(status='failed', order='t.updated DESC, t.task')

    def computing_tasks(self, owner: Owner, uuid: str, limit: int) -> list[dict]:
        return self.db.all(self.COMPUTING_TASKS, owner.params(run=uuid, limit=limit))

    def failed_tasks(self, owner: Owner, uuid: str, limit: int) -> list[dict]:
        return self.db.all(self.FAILED_TASKS, owner.params(run=uuid, limit=limit))

    # The workers holding the run's most recently active computing tasks.
    RUN_WORKERS = f"""
        SELECT w.uuid, w.hostname, w.pid, w.start, w.last_seen,
               count(*) AS held, max(t.updated) AS updated
        FROM (SELECT t.worker_id, t.updated FROM tasks t
              WHERE t.run_id = {THE_RUN} AND t.status = 'computing'
              ORDER BY t.updated DESC
              LIMIT :sample) t
        JOIN workers w ON w.id = t.worker_id
        GROUP BY w.id, w.uuid, w.hostname, w.pid, w.start, w.last_seen
        ORDER BY w.hostname, w.pid, w.uuid
    """

    def run_workers(self, owner: Owner, uuid: str, sample: int) -> list[dict]:
        return self.db.all(self.RUN_WORKERS, owner.params(run=uuid, sample=sample))

    # -- the dashboard: failures, one task, and the charts --------------------

    # The first line of a task's message, cut at FIRST_LINE_CHARS characters:
    # failures are grouped by it and by the exit code.
    FIRST_LINE_CHARS = 200
    FIRST_LINE = Dialects(
        postgresql=f"substr(split_part(t.message, chr(10), 1), 1, {FIRST_LINE_CHARS})",
        sqlite=(f"substr(substr(t.message, 1, instr(t.message || char(10), char(10)) - 1),"
                f" 1, {FIRST_LINE_CHARS})"))

    # The run's newest :sample failed tasks with the first line of their
    # message: the tasks_in_status index read backwards, no further.
    NEWEST_FAILED = f"""
              SELECT t.task, t.percent, t.attempts, t.failures, t.exit_code, t.updated,
                     t.worker_id, {{line}} AS line
              FROM tasks t
              WHERE t.run_id = {THE_RUN} AND t.status = 'failed'
              ORDER BY t.updated DESC
              LIMIT :sample"""
    FAILED_SAMPLE = Dialects(NEWEST_FAILED.format(line=FIRST_LINE.postgresql),
                             NEWEST_FAILED.format(line=FIRST_LINE.sqlite))

    # Those grouped, the biggest groups first.
    FAILURE_GROUPS = Dialects(*(f"""
        SELECT f.exit_code, f.line, count(*) AS tasks, min(f.task) AS first_task,
               max(f.updated) AS latest, count(*) OVER () AS groups,
               CAST(sum(count(*)) OVER () AS integer) AS sampled
        FROM ({sample}) f
        GROUP BY f.exit_code, f.line
        ORDER BY tasks DESC, f.exit_code IS NULL, f.exit_code, f.line
        LIMIT :limit
    """ for sample in FAILED_SAMPLE))

    def failure_groups(self, owner: Owner, uuid: str, sample: int, limit: int) -> list[dict]:
        """The run's newest `sample` failed tasks by exit code and first line of
        message: at most `limit` groups, each with its count, lowest task and
        latest failure; every row also says how many groups and tasks there were."""
        return self.db.all(self.FAILURE_GROUPS, owner.params(run=uuid, sample=sample,
                                                             limit=limit))

    # One group of FAILURE_GROUPS, by task number after :after. `IS` is
    # sqlite's null-safe equality: a group may have no exit code or message.
    FAILED_IN_GROUP = Dialects(*(f"""
        SELECT f.task, f.percent, f.attempts, f.failures, f.exit_code, f.line, f.updated,
               w.uuid AS worker_uuid, w.hostname, w.pid, count(*) OVER () AS total
        FROM ({sample}) f
        LEFT JOIN workers w ON w.id = f.worker_id
        WHERE f.exit_code {same} :exit_code AND f.line {same} :line AND f.task > :after
        ORDER BY f.task
        LIMIT :limit
    """ for sample, same in zip(FAILED_SAMPLE, ('IS NOT DISTINCT FROM', 'IS'), strict=True)))

    def failed_in_group(self, owner: Owner, uuid: str, exit_code: int | None,
                        line: str | None, after: int, sample: int, limit: int) -> list[dict]:
        """The failed tasks of one group among the newest `sample`, by number
        after `after`, at most `limit`; each row says how many there are from `after` on."""
        return self.db.all(self.FAILED_IN_GROUP, owner.params(
            run=uuid, exit_code=exit_code, line=line, after=after, sample=sample,
            limit=limit))

    TASK_DETAIL = f"""
        SELECT r.name AS run_name, r.num_tasks, r.timeout, {TASK_COLUMNS},
               t.started, t.updated,
               w.uuid AS worker_uuid, w.hostname, w.pid,
               (SELECT i.input FROM task_inputs i
                WHERE i.run_id = r.id AND i.task = :task) AS input
        FROM runs r LEFT JOIN tasks t ON t.run_id = r.id AND t.task = :task
        LEFT JOIN workers w ON w.id = t.worker_id
        WHERE r.uuid = :run AND {owned('r')}
    """

    def task_detail(self, owner: Owner, uuid: str, task: int) -> dict:
        """One task with its times and worker (id None when it has no row yet)."""
        check_run_uuid(uuid)
        row = self.db.one(self.TASK_DETAIL, owner.params(run=uuid, task=task))
        if row is None:
            raise RunNotFound(uuid)
        if not 0 <= task < row['num_tasks']:
            raise TaskNotFound(row['num_tasks'])
        return {**row, 'task': task}

    # The newest done tasks, for the chart of durations and the chart's end.
    NEWEST_DONE = f"""
        SELECT t.started, t.updated FROM tasks t
        WHERE t.run_id = {THE_RUN} AND t.status = 'done'
        ORDER BY t.updated DESC
        LIMIT :sample
    """

    def newest_done(self, owner: Owner, uuid: str, sample: int) -> list[dict]:
        """The hand-out and done times of the newest `sample` done tasks, newest first."""
        return self.db.all(self.NEWEST_DONE, owner.params(run=uuid, sample=sample))

    # The run's newest :sample done tasks since :start (no more, however fast
    # the run), counted by bar of :width seconds; each row also says how many
    # were read and how far back they reach. Bar 0 starts at :start.
    COUNT_DONE_BY_BAR = f"""
        SELECT d.bar, count(*) AS done,
               CAST(sum(count(*)) OVER () AS integer) AS sampled,
               min(min(d.updated)) OVER () AS reach
        FROM (SELECT t.updated, {{bar}} AS bar
              FROM tasks t
              WHERE t.run_id = {THE_RUN} AND t.status = 'done' AND t.updated >= :start
              ORDER BY t.updated DESC
              LIMIT :sample) d
        GROUP BY d.bar
        ORDER BY d.bar
    """
    DONE_BY_BAR = Dialects(
        COUNT_DONE_BY_BAR.format(bar='CAST(floor((t.updated - :start) / :width) AS integer)'),
        # sqlite's CAST truncates, which is floor() here: updated >= start.
        COUNT_DONE_BY_BAR.format(bar='CAST((t.updated - :start) / :width AS integer)'))

    def done_by_bar(self, owner: Owner, uuid: str, start: float, width: float,
                    sample: int) -> list[dict]:
        """How many of the newest `sample` tasks done since `start` fall in each
        bar of `width` seconds: [{"bar", "done", "sampled", "reach"}], bars with none left out."""
        return self.db.all(self.DONE_BY_BAR, owner.params(
            run=uuid, start=start, width=width, sample=sample))

    # -- metrics (metrics.py: GET /metrics) ---------------------------------

    # Every user's unfinished runs, newest first, with their counts: one pass
    # over run_stats (8 to 64 rows a run), never over tasks.
    UNFINISHED_RUNS = f"""
        SELECT r.uuid, r.num_tasks, {RUN_COUNTS}
        FROM runs r JOIN run_stats s ON s.run_id = r.id
        GROUP BY r.id, r.uuid, r.num_tasks
        HAVING sum(s.done) + sum(s.failed) < r.num_tasks
        ORDER BY r.id DESC
        LIMIT :limit
    """

    def unfinished_runs(self, limit: int) -> list[dict]:
        """The newest `limit` runs, of any owner, with tasks neither done nor failed:
        uuid, num_tasks and the computing, done and failed counts."""
        return self.db.all(self.UNFINISHED_RUNS, {'limit': limit})


# Moves a run's frontier past the first :count tasks, for tools that fill a
# run with task rows directly (tests, benchmarks).
ADVANCE_FRONTIER = f"""
    UPDATE run_frontier
    SET next_task = :count + ((shard - :count) % {FRONTIER_SHARDS} + {FRONTIER_SHARDS})
                             % {FRONTIER_SHARDS}
    WHERE run_id = :run_id
"""


def summary(row: dict) -> dict:
    """A dashboard's run: the API's status with its owner and creation time."""
    return {**run_status(row), 'owner': row['owner'], 'created': row['created']}


def fresh_numbers(frontier: Sequence[dict], wanted: int, num_tasks: int,
                  taken: set[int]) -> tuple[list[int], list[list[int]]]:
    """The lowest `wanted` numbers that the frontier rows offer, skipping those
    in `taken`; and [shard, next number] for each row they move on."""
    offers = [zip(range(row['next_task'], num_tasks, FRONTIER_SHARDS), repeat(row['shard']))
              for row in frontier]
    numbers: list[int] = []
    passed: dict[int, int] = {}
    for number, shard in heapq.merge(*offers):
        if len(numbers) == wanted:
            break
        passed[shard] = number
        if number not in taken:
            numbers.append(number)
    return numbers, [[shard, last + FRONTIER_SHARDS] for shard, last in passed.items()]


def sorted_handout(tasks: list[dict]) -> list[dict]:
    """Hand-out order: taken-back tasks first, then fresh ones, each by number."""
    return sorted(tasks, key=lambda row: (bool(row.get('fresh')), row['task']))
