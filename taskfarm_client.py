"""Taskfarm client: the `taskfarm` command and a small Python API.

Stdlib only, so a worker node needs nothing but Python to take part in a run.

    taskfarm create 100 --timeout 60          # prints the run's uuid
    taskfarm work RUN -j 4 -- ./process.sh {}
    taskfarm watch RUN

The Python API has a `Client` with one method per route of the HTTP API, and
`Run` / `Worker` (alias `TaskFarm` / `TaskFarmWorker`), which mirror the
`taskfarm_worker` package so that an existing worker script ports by
changing its import line.

The module reads top-down: constants, the HTTP client, the Run/Worker API,
the work pool behind `taskfarm work`, the other commands, then `main()`.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import email.utils
import getpass
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import IO, Any
from uuid import uuid4

__all__ = [
    'AuthError',
    'Client',
    'NotFound',
    'Run',
    'TaskFarm',
    'TaskFarmWorker',
    'TaskfarmError',
    'Unreachable',
    'Worker',
    'main',
    'tfRuns',
]

DEFAULT_URL = 'http://localhost:5000'
DEFAULT_URL_BASE = 'http://localhost:5000/api/'  # the original client's form

# Retries: connection errors and these answers are worth waiting out (a
# restarting server, a proxy in front of it); anything else is final.
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_RETRY_SECONDS = 30.0   # total time spent waiting before giving up
FIRST_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 8.0
SOCKET_TIMEOUT_SECONDS = 60.0

TASK_PAGE_SIZE = 1000          # the server's largest `limit`

# `taskfarm work`
PROGRESS_PREFIX = 'TASKFARM_PROGRESS'
STDERR_TAIL_LINES = 20
MAX_LINE_CHARS = 2000          # a tail line longer than this is cut
DEFAULT_HEARTBEAT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 0.5
KILL_GRACE_SECONDS = 10.0      # SIGTERM, then SIGKILL after this long

# `taskfarm watch`
DEFAULT_WATCH_SECONDS = 2.0
RATE_WINDOW_SAMPLES = 30       # tasks/minute over the last this many polls
BAR_WIDTH = 30

# Environment, read in one place (`settings_from_env`).
ENV_URL = 'TASKFARM_URL'
ENV_USER = 'TASKFARM_USER'
ENV_PASSWORD = 'TASKFARM_PASSWORD'
ENV_RETRY_SECONDS = 'TASKFARM_RETRY_SECONDS'

EXIT_FAILED = 1


# --------------------------------------------------------------------------
# Errors

class TaskfarmError(RuntimeError):
    """A request the server refused, or a server that could not be reached.

    A RuntimeError, as the original client raised, so that scripts which
    catch that keep working. `status` is the HTTP status, if there was one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(TaskfarmError):
    """Wrong user name or password."""


class NotFound(TaskfarmError):
    """Unknown run, task or worker (404)."""


class Unreachable(TaskfarmError):
    """No answer from the server within the retry budget."""


def retry_seconds_from_env() -> float:
    """The retry budget: TASKFARM_RETRY_SECONDS, or 30 seconds."""
    value = os.environ.get(ENV_RETRY_SECONDS, '')
    try:
        return max(0.0, float(value)) if value else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS


# --------------------------------------------------------------------------
# HTTP client

def api_root(url: str) -> tuple[str, str, int | None, str]:
    """Split a server URL into (scheme, host, port, path of /api).

    Accepts both `http://host:5000` and the original's `http://host:5000/api/`,
    and a server mounted below a path (`https://example.org/taskfarm`).
    """
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise TaskfarmError(f'not an http(s) URL: {url!r}')
    try:
        port = parts.port
    except ValueError:
        raise TaskfarmError(f'bad port in URL {url!r}') from None
    path = parts.path.rstrip('/')
    if not path.endswith('/api'):
        path += '/api'
    return parts.scheme, parts.hostname, port, path


def basic_auth(user: str, password: str) -> str:
    """The value of an HTTP Basic Authorization header."""
    pair = f'{user}:{password}'.encode()
    return 'Basic ' + base64.b64encode(pair).decode('ascii')


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_text(body: bytes) -> str:
    """The server's own words from an error body {"title", "description"}."""
    try:
        error = json.loads(body)
    except ValueError:
        return ''
    if not isinstance(error, dict):
        return ''
    words = [str(error[key]).strip() for key in ('title', 'description')
             if error.get(key)]
    return ': '.join(words)


def connection_problem(exc: BaseException) -> str:
    """A short human reason for a failed connection."""
    if isinstance(exc, ConnectionRefusedError):
        return 'connection refused'
    if isinstance(exc, socket.gaierror):
        return 'unknown host'
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return 'no answer (timed out)'
    return getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__


def is_unknown_host(exc: BaseException) -> bool:
    """A name that does not resolve (not a passing DNS hiccup)."""
    return (isinstance(exc, socket.gaierror)
            and exc.errno not in (socket.EAI_AGAIN, getattr(socket, 'EAI_SYSTEM', None)))


class Client:
    """One method per route of the taskfarm HTTP API.

    Gets a token with the user name and password on first use and sends
    that token afterwards, renewing it when the server answers 401. Each
    thread keeps its own keep-alive connection, so one Client can serve
    many threads. Connection errors and 502/503/504 are retried with
    exponential backoff (honouring Retry-After) for at most `retry_seconds`
    in total; then the call raises `Unreachable` (or `TaskfarmError`).
    A `token` given up front is used until the server refuses it.
    """

    def __init__(self, url: str = DEFAULT_URL, user: str = '',
                 password: str = '', retry_seconds: float | None = None,
                 timeout: float = SOCKET_TIMEOUT_SECONDS,
                 token: str | None = None) -> None:
        self._scheme, self._host, self._port, self._api = api_root(url)
        self.url = url
        self.user = user
        self._password = password
        self.retry_seconds = (retry_seconds_from_env()
                              if retry_seconds is None else retry_seconds)
        self._timeout = timeout
        self._token = token  # None: fetched with user and password on first use
        self._token_lock = threading.Lock()
        self._local = threading.local()

    # -- routes ------------------------------------------------------------

    def index(self) -> str:
        """GET / : the server's HTML front page (needs no login)."""
        root = self._api[:-len('api')]  # the server may live below a path
        status, _, body = self._send('GET', root, None, auth=None)
        if status != 200:
            raise self._error(status, body)
        return body.decode('utf-8', 'replace')

    def token(self) -> str:
        """GET /api/token : the token in use, fetched on first call."""
        with self._token_lock:
            if self._token is None:
                self._token = self._fetch_token()
            return self._token

    def create_run(self, num_tasks: int, name: str | None = None,
                   timeout: int | None = None,
                   max_attempts: int | None = None) -> dict:
        """POST /api/run : a new run of `num_tasks` tasks."""
        body: dict[str, Any] = {'numTasks': num_tasks}
        optional = {'name': name, 'timeout': timeout,
                    'maxAttempts': max_attempts}
        body.update({key: value for key, value in optional.items()
                     if value is not None})
        return self.request('POST', '/run', body, ok=(201,))

    def runs(self) -> list[dict]:
        """GET /api/runs : the runs this user may see, oldest first."""
        return self.request('GET', '/runs')['data']

    def run_info(self, uuid: str, info: str = '') -> Any:
        """GET /api/runs/{uuid} : all counts, or the value of one `info`."""
        # A 404 for a given `info` may mean an unknown key: the server says which.
        answer = self.request('GET', run_path(uuid), query={'info': info or None},
                              not_found=None if info else unknown_run(uuid, self.url))
        return answer[info] if info else answer

    def delete_run(self, uuid: str) -> None:
        """DELETE /api/runs/{uuid} : the run and all its tasks."""
        self.request('DELETE', run_path(uuid), ok=(204,),
                     not_found=unknown_run(uuid, self.url))

    def restart(self, uuid: str, everything: bool = False) -> None:
        """POST /api/runs/{uuid}/restart : unfinished (or all) tasks wait again."""
        self.request('POST', run_path(uuid, 'restart'),
                     query={'all': str(bool(everything))}, ok=(204,),
                     not_found=unknown_run(uuid, self.url))

    def claim_task(self, uuid: str, worker_uuid: str) -> dict | None:
        """POST /api/runs/{uuid}/task : a task for the worker, None when none waits."""
        return self.request('POST', run_path(uuid, 'task'),
                            {'worker_uuid': worker_uuid}, ok=(201, 204))

    def task_info(self, uuid: str, task: int, info: str = '') -> Any:
        """GET /api/runs/{uuid}/tasks/{task} : the task, or one `info` of it."""
        answer = self.request('GET', run_path(uuid, 'tasks', str(task)),
                              query={'info': info or None})
        return answer[info] if info else answer

    def update_task(self, uuid: str, task: int,
                    percent_completed: float | None = None,
                    status: str | None = None,
                    worker_uuid: str | None = None) -> None:
        """PUT /api/runs/{uuid}/tasks/{task} : progress and/or status.

        With worker_uuid, the server refuses (409) unless that worker still
        holds the task.
        """
        body: dict[str, Any] = {}
        if percent_completed is not None:
            body['percentCompleted'] = percent_completed
        if status is not None:
            body['status'] = status
        if worker_uuid is not None:
            body['worker_uuid'] = worker_uuid
        self.request('PUT', run_path(uuid, 'tasks', str(task)), body,
                     ok=(204,))

    def list_tasks(self, uuid: str, status: str | None = None,
                   after: int | None = None,
                   limit: int | None = None) -> list[dict]:
        """GET /api/runs/{uuid}/tasks : one page of the tasks that have a row."""
        query = {'status': status, 'after': after, 'limit': limit}
        return self.request('GET', run_path(uuid, 'tasks'), query=query,
                            not_found=unknown_run(uuid, self.url))['data']

    def iter_tasks(self, uuid: str, status: str | None = None,
                   page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """Every listed task of a run, fetching page after page."""
        after = None
        while True:
            page = self.list_tasks(uuid, status=status, after=after,
                                   limit=page_size)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1]['task']

    def register_worker(self, worker_uuid: str, hostname: str,
                        pid: int) -> dict:
        """POST /api/worker : register a worker, {"uuid", "id"}."""
        body = {'uuid': worker_uuid, 'hostname': hostname, 'pid': pid}
        return self.request('POST', '/worker', body, ok=(201,))

    def heartbeat(self, worker_uuid: str) -> None:
        """POST /api/workers/{uuid}/heartbeat : renew the worker's leases."""
        path = '/workers/' + urllib.parse.quote(worker_uuid, safe='')
        self.request('POST', path + '/heartbeat', ok=(204,))

    def workers(self) -> list[dict]:
        """GET /api/workers : this user's workers (an admin's: all)."""
        return self.request('GET', '/workers')['data']

    # -- plumbing ----------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                query: dict | None = None, ok: Sequence[int] = (200,),
                not_found: str | None = None) -> Any:
        """Send an /api request with the token; the decoded JSON answer.

        A 401 renews the token once (it may have expired, or the password
        changed). An answer not in `ok` raises; `not_found` words a 404.
        """
        target = self._api + path + query_string(query)
        token = self.token()
        status, _, answer = self._send(method, target, body,
                                       basic_auth(token, ''))
        if status == 401:
            token = self._renew_token(token)
            status, _, answer = self._send(method, target, body,
                                           basic_auth(token, ''))
        if status not in ok:
            raise self._error(status, answer, not_found)
        return decode_json(answer, self.url)

    def _fetch_token(self) -> str:
        status, _, answer = self._send(
            'GET', self._api + '/token', None,
            basic_auth(self.user, self._password))
        if status == 401:
            raise AuthError(f'wrong user name or password for user '
                            f'{self.user!r} at {self.url}', status)
        if status != 200:
            raise self._error(status, answer)
        return decode_json(answer, self.url)['token']

    def _renew_token(self, stale: str) -> str:
        with self._token_lock:
            if self._token == stale:  # another thread may have renewed it
                self._token = self._fetch_token()
            return self._token

    def _error(self, status: int, body: bytes,
               not_found: str | None = None) -> TaskfarmError:
        words = error_text(body) or f'HTTP {status}'
        if status == 404:
            return NotFound(not_found or words, status)
        if status == 401:
            return AuthError(f'not allowed at {self.url}: {words}', status)
        return TaskfarmError(f'the server refused: {words}', status)

    def _send(self, method: str, target: str, body: Any,
              auth: str | None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request, retried on connection errors and 502/503/504."""
        deadline = time.monotonic() + self.retry_seconds
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            try:
                status, headers, answer = self._exchange(
                    method, target, body, auth)
            except (OSError, http.client.HTTPException) as exc:
                wait = backoff
                problem: TaskfarmError = Unreachable(
                    f'cannot reach the taskfarm server at {self.url}: '
                    f'{connection_problem(exc)}')
                if is_unknown_host(exc):
                    raise problem from None  # a typo: waiting will not help
            else:
                if status not in RETRY_STATUSES:
                    return status, headers, answer
                asked = retry_after_seconds(headers.get('Retry-After'))
                wait = backoff if asked is None else asked
                problem = TaskfarmError(
                    f'the taskfarm server at {self.url} is unavailable: '
                    f'{error_text(answer) or f"HTTP {status}"}', status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise problem
            time.sleep(min(wait, remaining))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _exchange(self, method: str, target: str, body: Any,
                  auth: str | None) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = {'Accept': 'application/json',
                   'User-Agent': 'taskfarm-client'}
        if auth:
            headers['Authorization'] = auth
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers['Content-Type'] = 'application/json'
        connection, reused = self._connection()
        try:
            connection.request(method, target, payload, headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            self._local.connection = None
            if not reused:
                raise
        # The server closed our idle keep-alive connection: that is no
        # outage, so try once more at once on a fresh connection.
        return self._exchange(method, target, body, auth)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            return connection, True
        kind = (http.client.HTTPSConnection if self._scheme == 'https'
                else http.client.HTTPConnection)
        connection = kind(self._host, self._port, timeout=self._timeout)
        self._local.connection = connection
        return connection, False


def decode_json(answer: bytes, url: str) -> Any:
    """The JSON of an answer; None for an empty one (204)."""
    if not answer.strip():
        return None
    try:
        return json.loads(answer)
    except ValueError:
        # A proxy's HTML page, say: the URL points at something else.
        raise TaskfarmError(f'{url} answered something that is not JSON; '
                            'is it a taskfarm server?') from None


def run_path(uuid: str, *rest: str) -> str:
    """/runs/{uuid}/..., with the uuid quoted so no input leaves the path."""
    return '/'.join(['/runs', urllib.parse.quote(uuid, safe=''), *rest])


def query_string(query: dict | None) -> str:
    """?key=value for the keys whose value is not None."""
    present = {key: value for key, value in (query or {}).items()
               if value is not None}
    return '?' + urllib.parse.urlencode(present) if present else ''


def unknown_run(uuid: str, url: str) -> str:
    return f'unknown run {uuid!r} at {url} (no such run, or not yours)'


# --------------------------------------------------------------------------
# Run / Worker: the original taskfarm_worker API

def tfRuns(username: str, password: str,
           url_base: str = DEFAULT_URL_BASE) -> list[dict]:
    """The runs of this user: [{"id", "uuid", "numTasks", ...}, ...]."""
    return Client(url_base, username, password).runs()


class Run:
    """A run: loads the run `uuid`, or creates one of `numTasks` tasks.

    Mirrors taskfarm_worker.TaskFarm; errors raise TaskfarmError, which is
    a RuntimeError like the original's.
    """

    def __init__(self, username: str, password: str, uuid: str | None = None,
                 numTasks: int | None = None,
                 url_base: str = DEFAULT_URL_BASE) -> None:
        self._client = Client(url_base, username, password)
        self._client.token()  # a wrong password fails here, as it did before
        if uuid is None:
            if numTasks is None:
                raise RuntimeError('numTasks must be set when creating a new task')
            run = self._client.create_run(numTasks)
        else:
            run = self._client.run_info(uuid)
        self._uuid: str = run['uuid']
        self._numTasks: int = run['numTasks']

    @property
    def client(self) -> Client:
        """The Client underneath, for the routes this class has no method for."""
        return self._client

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def numTasks(self) -> int:
        return self._numTasks

    def info(self, info: str) -> Any:
        """One piece of run information, or all of it (a dict) for ''."""
        return self._client.run_info(self.uuid, info)

    @property
    def percentDone(self) -> float:
        return self.info('percentDone')

    @property
    def numDone(self) -> int:
        return self.info('numDone')

    @property
    def numWaiting(self) -> int:
        return self.info('numWaiting')

    @property
    def numComputing(self) -> int:
        return self.info('numComputing')

    @property
    def numFailed(self) -> int:
        return self.info('numFailed')

    def getTaskInfo(self, task: int, info: str) -> Any:
        """One piece of a task's information, or all of it for ''."""
        self._check_task(task)
        return self._client.task_info(self.uuid, task, info)

    def setTaskInfo(self, task: int, info: str, value: Any) -> None:
        """Set `percentCompleted` or `status` of a task."""
        self._check_task(task)
        self._client.request('PUT', run_path(self.uuid, 'tasks', str(task)),
                             {info: value}, ok=(204,))

    def restart(self, everything: bool = False) -> None:
        """Put unfinished tasks (all tasks, if everything) back to waiting."""
        self._client.restart(self.uuid, everything)

    def delete(self) -> None:
        self._client.delete_run(self.uuid)

    def _check_task(self, task: int) -> None:
        if task < 0 or task >= self.numTasks:
            raise RuntimeError(f'task ID outside range 0 {self.numTasks - 1}')


class Worker(Run):
    """A worker of the run `uuid`: takes tasks one at a time.

    Mirrors taskfarm_worker.TaskFarmWorker:

        for task in worker.tasks:
            ...                      # compute, calling worker.update(percent)
            worker.update(100)
            worker.done()
    """

    def __init__(self, username: str, password: str, uuid: str,
                 url_base: str = DEFAULT_URL_BASE) -> None:
        super().__init__(username, password, uuid=uuid, url_base=url_base)
        self._task: int | None = None
        self._percentDone: float | None = None
        self._worker_uuid = uuid4().hex
        self.client.register_worker(self._worker_uuid, hostname(), os.getpid())

    @property
    def worker_uuid(self) -> str:
        return self._worker_uuid

    @property
    def task(self) -> int | None:
        """The current task; takes a new one if there is none. None: no more."""
        if self._task is None:
            self._percentDone = None
            claimed = self.client.claim_task(self.uuid, self.worker_uuid)
            if claimed is None:
                return None
            self._task = claimed['task']
            self._percentDone = claimed['percentCompleted']
        return self._task

    @property
    def tasks(self) -> Iterator[int]:
        """Iterate over the remaining tasks."""
        while self.task is not None:
            yield self.task

    def update(self, percentage: float) -> None:
        """Report the current task's progress, 0 to 100."""
        if self._task is None:
            return
        if percentage < 0 or percentage > 100:
            raise ValueError(f'percentage {percentage} out of range')
        self._percentDone = percentage
        self.setTaskInfo(self._task, 'percentCompleted', percentage)

    def done(self) -> None:
        """Release the task; it is marked done only if its progress is 100."""
        if self._task is None:
            return
        if self._percentDone is not None and abs(self._percentDone - 100) < 1e-6:
            self.setTaskInfo(self._task, 'status', 'done')
        self._task = None


TaskFarm = Run
TaskFarmWorker = Worker


def hostname() -> str:
    return (socket.gethostname() or 'unknown')[:255]


# --------------------------------------------------------------------------
# `taskfarm work`: run a command for each task

def task_command(command: Sequence[str], task: int) -> list[str]:
    """The command for one task: every `{}` in its words becomes the number."""
    return [word.replace('{}', str(task)) for word in command]


def parse_progress(line: str) -> float | None:
    """The percentage of a `TASKFARM_PROGRESS <0-100>` line, else None."""
    words = line.split()
    if len(words) != 2 or words[0] != PROGRESS_PREFIX:
        return None
    try:
        percent = float(words[1])
    except ValueError:
        return None
    return percent if 0 <= percent <= 100 else None


def heartbeat_interval(run: dict, override: float | None) -> float:
    """How often to send heartbeats: a third of the run's lease, if known."""
    if override is not None:
        return max(MIN_HEARTBEAT_SECONDS, override)
    lease = run.get('timeout')
    if isinstance(lease, (int, float)) and lease > 0:
        return max(MIN_HEARTBEAT_SECONDS,
                   min(DEFAULT_HEARTBEAT_SECONDS, lease / 3))
    return DEFAULT_HEARTBEAT_SECONDS


class WorkPool:
    """Runs a command for the tasks of one run, `slots` tasks at a time.

    One registered worker with `slots` threads; each thread takes a task,
    runs the command and reports the outcome, until the server has no task
    left. `stop()` (from a signal handler) terminates the commands' process
    groups and puts their tasks back to `waiting`.
    """

    def __init__(self, client: Client, run_uuid: str, command: Sequence[str],
                 slots: int = 1, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
                 out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.client = client
        self.run_uuid = run_uuid
        self.command = list(command)
        self.slots = slots
        self.heartbeat_seconds = heartbeat_seconds
        self.worker_uuid = uuid4().hex
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stop_signal: int | None = None
        self.num_done = 0
        self.num_failed = 0
        self.num_put_back = 0
        self.errors: list[str] = []
        self._stopping = threading.Event()
        self._finished = threading.Event()
        # RLock: stop() runs in a signal handler, which may interrupt the
        # main thread anywhere.
        self._lock = threading.RLock()
        self._held: set[int] = set()
        self._running: dict[int, subprocess.Popen] = {}
        self._signalled: set[int] = set()
        self._output_lock = threading.Lock()

    def run(self) -> int:
        """Work until no task is left or stop() is called; the exit status."""
        self.client.register_worker(self.worker_uuid, hostname(), os.getpid())
        beats = threading.Thread(target=self._send_heartbeats, daemon=True)
        beats.start()
        slots = [threading.Thread(target=self._slot, daemon=True)
                 for _ in range(self.slots)]
        for slot in slots:
            slot.start()
        for slot in slots:
            while slot.is_alive():  # a timeout keeps signals handled promptly
                slot.join(0.5)
        self._finished.set()
        return self._exit_status()

    def stop(self, signum: int) -> None:
        """Stop: no new tasks, terminate the commands; twice: kill them now."""
        with self._lock:
            if self._stopping.is_set():
                self._signal_commands(signal.SIGKILL)
                return
            self.stop_signal = signum
            self._stopping.set()
            self._signal_commands(signal.SIGTERM)
        killer = threading.Timer(KILL_GRACE_SECONDS, self._signal_commands,
                                 args=(signal.SIGKILL,))
        killer.daemon = True
        killer.start()

    # -- one slot ----------------------------------------------------------

    def _slot(self) -> None:
        try:
            while not self._stopping.is_set():
                claimed = self.client.claim_task(self.run_uuid, self.worker_uuid)
                if claimed is None:
                    return
                self._work_on(claimed['task'])
        except TaskfarmError as exc:
            self._record_error(str(exc))

    def _work_on(self, task: int) -> None:
        with self._lock:
            self._held.add(task)
        try:
            try:
                process = self._start(task)
            except TaskfarmError:
                # The command cannot start (a typo, say): the task is not
                # to blame, so it waits again, and this worker stops.
                self._stopping.set()
                self._put_back(task)
                raise
            if process is None:
                self._put_back(task)
                return
            code, stderr_tail = self._follow(task, process)
            with self._lock:
                self._running.pop(task, None)
                signalled = task in self._signalled
            if signalled:
                self._put_back(task)
            elif code == 0:
                if self._update(task, percent_completed=100, status='done'):
                    self._count('num_done')
            else:
                if self._update(task, status='failed'):
                    self._count('num_failed')
                self._show_failure(task, code, stderr_tail)
        finally:
            with self._lock:
                self._held.discard(task)

    def _start(self, task: int) -> subprocess.Popen | None:
        """Start the command for a task, unless we are stopping (then None)."""
        env = dict(os.environ, TASKFARM_TASK=str(task),
                   TASKFARM_RUN=self.run_uuid)
        with self._lock:  # so that stop() cannot miss a command just started
            if self._stopping.is_set():
                return None
            try:
                # Its own session, so that we can stop the command and all
                # its children at once, and a terminal's Ctrl-C reaches us
                # only: we decide what happens to the task.
                process = subprocess.Popen(
                    task_command(self.command, task), env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                raise TaskfarmError(
                    f'cannot run {self.command[0]!r}: '
                    f'{exc.strerror or exc}') from None
            self._running[task] = process
        return process

    def _follow(self, task: int, process: subprocess.Popen) -> tuple[int, list[str]]:
        """Pass on the command's output, report its progress; exit code and stderr tail."""
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        reader = threading.Thread(target=keep_tail, args=(process.stderr, tail),
                                  daemon=True)
        reader.start()
        for raw in process.stdout:
            line = raw.decode('utf-8', 'replace')
            percent = parse_progress(line)
            if percent is None:
                self._write(self.out, line)
            else:
                self._report_progress(task, percent)
        code = process.wait()
        reader.join()
        return code, list(tail)

    def _report_progress(self, task: int, percent: float) -> None:
        # Progress is a courtesy: a lost update must not stop the task.
        try:
            self._update(task, percent_completed=percent)
        except TaskfarmError as exc:
            self._write(self.err, f'taskfarm: task {task}: progress not '
                                  f'recorded: {exc}\n')

    def _put_back(self, task: int) -> None:
        if self._update(task, status='waiting'):
            self._count('num_put_back')

    def _update(self, task: int, **change: Any) -> bool:
        """Update a task this worker holds; False if it no longer holds it.

        A task whose lease ran out (this machine was too slow to send a
        heartbeat, say) may have gone to another worker: leave it to them.
        """
        try:
            self.client.update_task(self.run_uuid, task, worker_uuid=self.worker_uuid,
                                    **change)
        except TaskfarmError as exc:
            if exc.status != 409:
                raise
            self._write(self.err, f'taskfarm: task {task}: another worker holds it now '
                                  '(this lease ran out); leaving it to them\n')
            return False
        return True

    # -- shared state ------------------------------------------------------

    def _signal_commands(self, signum: int) -> None:
        with self._lock:
            for task, process in self._running.items():
                if process.returncode is None:
                    self._signalled.add(task)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signum)  # unless already gone

    def _send_heartbeats(self) -> None:
        while not self._finished.wait(self.heartbeat_seconds):
            with self._lock:
                holding = bool(self._held)
            if not holding:
                continue
            try:
                self.client.heartbeat(self.worker_uuid)
            except TaskfarmError as exc:
                self._write(self.err, f'taskfarm: heartbeat failed: {exc}\n')

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def _record_error(self, message: str) -> None:
        with self._lock:
            if message not in self.errors:
                self.errors.append(message)

    def _write(self, stream: IO[str], text: str) -> None:
        with self._output_lock:
            try:
                stream.write(text)
                stream.flush()
            except BrokenPipeError:
                pass  # `taskfarm work ... | head`: the reader left; work goes on

    def _show_failure(self, task: int, code: int, tail: list[str]) -> None:
        how = f'killed by signal {-code}' if code < 0 else f'exit status {code}'
        text = f'taskfarm: task {task} failed ({how})'
        if tail:
            text += '; the end of its stderr:\n' + ''.join(f'  | {line}' for line in tail)
        else:
            text += ' and wrote nothing to stderr\n'
        self._write(self.err, text)

    def _exit_status(self) -> int:
        summary = (f'taskfarm: worker {self.worker_uuid[:8]}: '
                   f'{self.num_done} done, {self.num_failed} failed')
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            summary += (f'; stopped by {name}, {self.num_put_back} '
                        f'task(s) put back to waiting')
        self._write(self.err, summary + '\n')
        for message in self.errors:
            self._write(self.err, f'taskfarm: {message}\n')
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return EXIT_FAILED if self.num_failed or self.errors else 0


def keep_tail(stream: IO[bytes], tail: collections.deque) -> None:
    """Read a stream to its end, keeping its last lines (each cut short)."""
    for raw in stream:
        line = raw.decode('utf-8', 'replace')
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + ' [...]\n'
        tail.append(line if line.endswith('\n') else line + '\n')


def install_stop_handlers(pool: WorkPool) -> None:
    """SIGINT and SIGTERM stop the pool (its tasks go back to waiting)."""
    def handle(signum: int, frame: Any) -> None:
        pool.stop(signum)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


# --------------------------------------------------------------------------
# Output helpers for the other commands

def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """[#######.......] for a fraction from 0 to 1."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return '[' + '#' * filled + '.' * (width - filled) + ']'


def duration(seconds: float | None) -> str:
    """4m10s, 1h02m, 12s; '--' when unknown."""
    if seconds is None:
        return '--'
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f'{hours}h{minutes:02d}m'
    if minutes:
        return f'{minutes}m{secs:02d}s'
    return f'{secs}s'


def finished_count(info: dict) -> int:
    """Tasks that will not run again without a restart: done and failed."""
    return info['numDone'] + info.get('numFailed', 0)


def is_finished(info: dict) -> bool:
    return finished_count(info) >= info['numTasks']


def rate_per_minute(samples: Sequence[tuple[float, int]]) -> float | None:
    """Finished tasks per minute over the (time, finished) samples."""
    if len(samples) < 2:
        return None
    (start, first), (end, last) = samples[0], samples[-1]
    if end <= start:
        return None
    return (last - first) / (end - start) * 60


def watch_line(info: dict, rate: float | None) -> str:
    """One line of `taskfarm watch`: bar, counts, rate, ETA."""
    total = info['numTasks']
    remaining = total - finished_count(info)
    eta = None
    if remaining == 0:
        eta = 0.0
    elif rate:
        eta = remaining / rate * 60
    rate_text = '--' if rate is None else f'{rate:.1f}'
    return (f'{progress_bar(info["percentDone"] / 100)} '
            f'{info["percentDone"]:5.1f}%  '
            f'done {info["numDone"]}/{total}  '
            f'computing {info["numComputing"]}  '
            f'failed {info.get("numFailed", 0)}  '
            f'{rate_text} tasks/min  ETA {duration(eta)}')


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str],
                out: IO[str]) -> None:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write('  '.join(cell.ljust(width)
                            for cell, width in zip(row, widths, strict=True)).rstrip() + '\n')


# --------------------------------------------------------------------------
# Commands: each takes the Client and the parsed arguments, returns a status

def cmd_create(client: Client, args: argparse.Namespace) -> int:
    run = client.create_run(args.num_tasks, name=args.name,
                            timeout=args.timeout, max_attempts=args.max_attempts)
    print(run['uuid'])  # alone, for RUN=$(taskfarm create 100)
    return 0


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    rows = [(run['uuid'], run['numTasks'], run.get('name') or '')
            for run in client.runs()]
    print_table(rows, ('UUID', 'TASKS', 'NAME'), sys.stdout)
    return 0


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.run_info(args.uuid)
    total = info['numTasks']
    lines = [('run', info['uuid'] + (f'  ({info["name"]})' if info.get('name') else '')),
             ('tasks', total),
             ('done', info['numDone']),
             ('computing', info['numComputing']),
             ('waiting', info['numWaiting']),
             ('failed', info.get('numFailed', 0)),
             ('progress', (f'{progress_bar(info["percentDone"] / 100)} '
                           f'{info["percentDone"]:.1f}%'))]
    for label, value in lines:
        print(f'{label:<10} {value}')
    return 0


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    # Fixed columns, so that a run of a million tasks streams page by page.
    row = '{:>10}  {:<9}  {:>7}  {:>8}  {:<24}  {}\n'
    sys.stdout.write(row.format('TASK', 'STATUS', 'PERCENT', 'ATTEMPTS', 'UPDATED',
                                'WORKER'))
    for task in client.iter_tasks(args.uuid, status=args.status):
        worker = task.get('worker')
        where = f'{worker["hostname"]}:{worker["pid"]}' if worker else '-'
        sys.stdout.write(row.format(task['task'], task['status'],
                                    f'{task["percentCompleted"]:.1f}',
                                    task.get('attempts', '-'),
                                    task.get('updated') or '-', where))
    return 0


def cmd_workers(client: Client, args: argparse.Namespace) -> int:
    rows = [(w['uuid'], w['hostname'], w['pid'], w.get('numComputing', ''),
             w.get('lastSeen', '')) for w in client.workers()]
    print_table(rows, ('UUID', 'HOSTNAME', 'PID', 'TASKS', 'LAST SEEN'),
                sys.stdout)
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    """Show progress until done + failed == numTasks; 1 if any task failed."""
    out = sys.stdout
    live = out.isatty()
    samples: collections.deque = collections.deque(maxlen=RATE_WINDOW_SAMPLES)
    try:
        while True:
            info = client.run_info(args.uuid)
            samples.append((time.monotonic(), finished_count(info)))
            line = watch_line(info, rate_per_minute(samples))
            if live:  # redraw one line in place
                out.write('\r' + line + '\x1b[K')
            else:
                out.write(time.strftime('%H:%M:%S ') + line + '\n')
            out.flush()
            if is_finished(info):
                break
            time.sleep(args.interval)
    finally:
        if live:
            out.write('\n')
    return EXIT_FAILED if info.get('numFailed', 0) else 0


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    client.restart(args.uuid, everything=args.all)
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_run(args.uuid)
    return 0


def cmd_work(client: Client, args: argparse.Namespace) -> int:
    run = client.run_info(args.uuid)  # an unknown run fails here, not later
    pool = WorkPool(client, args.uuid, args.command, slots=args.jobs,
                    heartbeat_seconds=heartbeat_interval(run, args.heartbeat))
    install_stop_handlers(pool)
    return pool.run()


# --------------------------------------------------------------------------
# Command line

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1: {text}')
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be more than 0: {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    # Connection options work before and after the subcommand; SUPPRESS
    # keeps a subcommand's default from hiding a value given before it.
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group('server')
    group.add_argument('--url', default=argparse.SUPPRESS,
                       help=f'server URL (${ENV_URL}, default {DEFAULT_URL})')
    group.add_argument('--user', default=argparse.SUPPRESS,
                       help=f'user name (${ENV_USER})')
    group.add_argument('--password', default=argparse.SUPPRESS,
                       help=f'password (${ENV_PASSWORD}; asked for if missing)')

    parser = argparse.ArgumentParser(
        prog='taskfarm', parents=[connection],
        description='Create, watch and work on taskfarm runs.')
    commands = parser.add_subparsers(dest='command_name', required=True,
                                     metavar='COMMAND')

    def add(name: str, handler: Any, help_text: str,
            epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[connection], help=help_text,
                                  description=help_text, epilog=epilog)
        sub.set_defaults(handler=handler)
        return sub

    create = add('create', cmd_create, 'create a run of N tasks; print its uuid')
    create.add_argument('num_tasks', type=positive_int, metavar='N')
    create.add_argument('--name', help='a name to recognise the run by')
    create.add_argument('--timeout', type=positive_int, metavar='SECONDS',
                        help='hand a task out again after this long without '
                             'a sign of life from its worker')
    create.add_argument('--max-attempts', type=positive_int, metavar='N',
                        help='mark a task failed when its lease runs out '
                             'after N hand-outs')

    add('list', cmd_list, 'list your runs')

    info = add('info', cmd_info, "show a run's counts and progress")
    info.add_argument('uuid')

    tasks = add('tasks', cmd_tasks, 'list the tasks of a run handed out so far')
    tasks.add_argument('uuid')
    tasks.add_argument('--status',
                       choices=('waiting', 'computing', 'done', 'failed'))

    add('workers', cmd_workers, 'list your workers')

    watch = add('watch', cmd_watch, 'show progress until the run is finished',
                'Finished means every task is done or failed. Exit status 0 '
                'when all are done, 1 when some failed.')
    watch.add_argument('uuid')
    watch.add_argument('--interval', type=positive_float, metavar='S',
                       default=DEFAULT_WATCH_SECONDS,
                       help=f'seconds between updates (default {DEFAULT_WATCH_SECONDS:g})')

    restart = add('restart', cmd_restart,
                  'put unfinished (failed, computing) tasks back to waiting')
    restart.add_argument('uuid')
    restart.add_argument('--all', action='store_true',
                         help='all tasks, done ones too, with progress reset')

    delete = add('delete', cmd_delete, 'delete a run and all its tasks')
    delete.add_argument('uuid')

    work = add('work', cmd_work,
               'run COMMAND for each task of a run; {} in ARGS is the task number',
               'COMMAND runs with TASKFARM_TASK and TASKFARM_RUN in its '
               'environment. Exit status 0 marks the task done, anything else '
               'failed (the end of its stderr is shown). A stdout line '
               f'"{PROGRESS_PREFIX} <0-100>" reports progress. Ctrl-C or '
               'SIGTERM stops the commands and puts their tasks back to '
               'waiting. Exit status: 0, or 1 if a task failed.')
    work.usage = 'taskfarm work UUID [-j N] [--heartbeat S] -- COMMAND [ARGS...]'
    work.add_argument('uuid')
    work.add_argument('-j', '--jobs', type=positive_int, default=1, metavar='N',
                      help='tasks to run at a time (default 1)')
    work.add_argument('--heartbeat', type=positive_float, metavar='S',
                      help="seconds between heartbeats (default: a third of "
                           "the run's timeout, at most 30)")
    work.add_argument('command', nargs='*', help=argparse.SUPPRESS)
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str]) -> argparse.Namespace:
    # Everything after the first `--` is the command of `work`, options and
    # all; argparse alone would take its `-x` for ours.
    argv = list(argv)
    command: list[str] = []
    if '--' in argv:
        cut = argv.index('--')
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.command_name == 'work':
        args.command = list(args.command) + command
        if not args.command:
            parser.error('work: give the command to run after --')
    elif command:
        parser.error(f'{args.command_name} takes no command after --')
    return args


def settings_from_env(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """URL, user and password: from the options, else the environment."""
    url = getattr(args, 'url', None) or os.environ.get(ENV_URL) or DEFAULT_URL
    user = getattr(args, 'user', None) or os.environ.get(ENV_USER, '')
    password = getattr(args, 'password', None)
    if password is None:
        password = os.environ.get(ENV_PASSWORD)
    return url, user, password


def client_from_args(args: argparse.Namespace) -> Client:
    url, user, password = settings_from_env(args)
    if not user:
        raise TaskfarmError(f'no user name: set {ENV_USER} or give --user')
    if password is None:
        if not sys.stdin.isatty():
            raise TaskfarmError(f'no password: set {ENV_PASSWORD} or give --password')
        password = getpass.getpass(f'taskfarm password for {user} at {url}: ')
    return Client(url, user, password, retry_seconds=retry_seconds_from_env())


def main(argv: Sequence[str] | None = None) -> int:
    """The `taskfarm` command; returns the exit status."""
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    try:
        client = client_from_args(args)
        return args.handler(client, args)
    except TaskfarmError as exc:
        print(f'taskfarm: {exc}', file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print('taskfarm: interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `taskfarm tasks RUN | head`: the reader left, which is no error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == '__main__':
    sys.exit(main())
