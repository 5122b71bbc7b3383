"""Taskfarm client: the `taskfarm` command and a small Python API.

Stdlib only, so a worker node needs nothing but Python to take part in a run.

    taskfarm create 100 --timeout 60          # prints the run's uuid
    taskfarm work RUN -j 4 -- ./process.sh {}
    taskfarm watch RUN

The Python API has a `Client` with one method per route of the HTTP API,
`Run` / `Worker`, and `TaskFarm` / `TaskFarmWorker`, which behave as the
`taskfarm_worker` package does, so that an existing worker script ports by
changing its import line.

The module reads top-down: constants, the HTTP client, the Run/Worker API,
the work pool behind `taskfarm work`, inputs, the other commands, then `main()`.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import csv
import datetime
import email.utils
import getpass
import http.client
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple
from uuid import uuid4

__all__ = [
    'AnswerLost',
    'AuthError',
    'Client',
    'NotFound',
    'Run',
    'TaskFarm',
    'TaskFarmWorker',
    'TaskfarmError',
    'Unreachable',
    'WorkOptions',
    'WorkPool',
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

# The server's bounds (API.md).
TASK_PAGE_SIZE = 1000          # the largest `limit` of a listing
MAX_BATCH = 1000               # tasks of one claim, items of one report or heartbeat
MAX_MESSAGE_CHARS = 4096       # a failure message
MAX_INPUT_CHARS = 4096         # one task's input
MAX_BODY_BYTES = 60_000        # what we send in one body; the server takes 64 KiB
MAX_INPUTS = 1_000_000         # inputs of one run

# `taskfarm work`
PROGRESS_PREFIX = 'TASKFARM_PROGRESS'
STDERR_TAIL_LINES = 20         # shown on the terminal when a task fails
MAX_LINE_CHARS = 2000          # a shown tail line longer than this is cut
STDERR_KEEP_BYTES = 4 * MAX_MESSAGE_CHARS   # enough for 4096 characters of UTF-8
DEFAULT_HEARTBEAT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 0.5
KILL_GRACE_SECONDS = 10.0      # SIGTERM, then SIGKILL after this long
CLAIM_BATCH = 100              # the most tasks one claim asks for
LOOKAHEAD_SECONDS = 1.0        # claim ahead only tasks that start within this
REPORT_DELAY_SECONDS = 1.0     # a finished task's report waits at most this long
QUEUE_WAIT_SECONDS = 2.0       # tasks claimed ahead that wait longer go back
FIRST_IDLE_POLL_SECONDS = 0.5  # asking again after "nothing waiting", doubling...
MAX_IDLE_POLL_SECONDS = 30.0   # ...up to this, or a third of the lease (at least 2 s)
MIN_IDLE_POLL_SECONDS = 2.0

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


class AnswerLost(TaskfarmError):
    """A request not safe to repeat reached the server, but its answer did not
    come back: whether the server acted on it is unknown."""


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
    if isinstance(exc, http.client.RemoteDisconnected):
        return 'the connection closed before the answer'
    return getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__


def is_final(exc: BaseException) -> bool:
    """A connection error that waiting will not cure: a name that does not
    resolve (not a passing DNS hiccup), or a certificate we do not trust."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return (isinstance(exc, socket.gaierror)
            and exc.errno not in (socket.EAI_AGAIN, getattr(socket, 'EAI_SYSTEM', None)))


def compact(value: Any) -> str:
    """JSON without spaces: smaller bodies, and the form the server measures."""
    return json.dumps(value, separators=(',', ':'))


class Answer(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    repeated: bool      # the request was sent more than once


class NotSent(Exception):
    """The connection failed before the request left: safe to send again."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Client:
    """One method per route of the taskfarm HTTP API.

    Gets a token with the user name and password on first use and sends
    that token afterwards, renewing it when the server answers 401. Each
    thread keeps its own keep-alive connection, so one Client can serve
    many threads.

    Connection errors and 502/503/504 are retried with exponential backoff
    (honouring Retry-After) for at most `retry_seconds` in total; then the
    call raises `Unreachable` (or `TaskfarmError`). Only requests that are
    safe to repeat are retried so: claims carry a request id that makes a
    repeat answer the same tasks, reports and heartbeats change nothing the
    second time, and a repeated delete that finds nothing means the first
    one did it. A request that is not safe to repeat (creating a run, a
    restart) is retried only when it never left; when its answer is lost it
    raises `AnswerLost`. A certificate that fails verification, like an
    unknown host, is final at once. A `token` given up front is used until
    the server refuses it.
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

    # -- routes: runs ------------------------------------------------------

    def index(self) -> str:
        """GET / : the server's HTML front page (needs no login)."""
        root = self._api[:-len('api')]  # the server may live below a path
        answer = self._send('GET', root, None, auth=None)
        if answer.status != 200:
            raise self._error(answer.status, answer.body)
        return answer.body.decode('utf-8', 'replace')

    def token(self) -> str:
        """GET /api/token : the token in use, fetched on first call."""
        with self._token_lock:
            if self._token is None:
                self._token = self._fetch_token()
            return self._token

    def create_run(self, num_tasks: int, name: str | None = None,
                   timeout: int | None = None, max_attempts: int | None = None,
                   retries: int | None = None, max_failures: int | None = None,
                   inputs: str | None = None) -> dict:
        """POST /api/run : a new run of `num_tasks` tasks, {"id", "uuid", "numTasks"}.

        `inputs` ('text' or 'json'): the run hands out nothing until every
        task's input is stored (`put_inputs`). Not safe to repeat: a lost
        answer raises AnswerLost rather than risk making a second run.
        """
        body: dict[str, Any] = {'numTasks': num_tasks}
        optional = {'name': name, 'timeout': timeout, 'maxAttempts': max_attempts,
                    'retries': retries, 'maxFailures': max_failures, 'inputs': inputs}
        body.update({key: value for key, value in optional.items()
                     if value is not None})
        return self.request('POST', '/run', body, ok=(201,), safe=False)

    def runs(self) -> list[dict]:
        """GET /api/runs : the runs this user may see, oldest first."""
        return self.request('GET', '/runs')['data']

    def run_info(self, uuid: str, info: str = '') -> Any:
        """GET /api/runs/{uuid} : all counts, or the value of one `info`."""
        # A 404 for a given `info` may mean an unknown key: the server says which.
        answer = self.request('GET', run_path(uuid), query={'info': info or None},
                              not_found=None if info else unknown_run(uuid, self.url))
        return answer[info] if info else answer

    def pace(self, uuid: str) -> dict:
        """GET /api/runs/{uuid}/pace : {"donePerMinute", "etaSeconds"}."""
        return self.request('GET', run_path(uuid, 'pace'),
                            not_found=unknown_run(uuid, self.url))

    def delete_run(self, uuid: str) -> None:
        """DELETE /api/runs/{uuid} : the run and all its tasks."""
        self.request('DELETE', run_path(uuid), ok=(204,),
                     not_found=unknown_run(uuid, self.url), gone_ok=True)

    def restart(self, uuid: str, everything: bool = False, status: str | None = None,
                tasks: str | None = None) -> None:
        """POST /api/runs/{uuid}/restart : tasks wait again.

        Without `status` and `tasks`: the unfinished ones (all, with progress
        reset, if `everything`). With them, exactly the tasks in that status
        and/or in the ranges `tasks` ("3-5,9"); `everything` then resets
        their progress. Not safe to repeat (tasks handed out in between would
        go back too): a lost answer raises AnswerLost.
        """
        self.request('POST', run_path(uuid, 'restart'),
                     query={'all': str(bool(everything)), 'status': status, 'tasks': tasks},
                     ok=(204,), not_found=unknown_run(uuid, self.url), safe=False)

    def put_inputs(self, uuid: str, first: int, inputs: Sequence[Any] | None = None,
                   encoded: Sequence[str] | None = None) -> dict:
        """PUT /api/runs/{uuid}/inputs : the inputs of tasks first, first + 1, ...

        Give the values, or `encoded`: each value already as compact JSON.
        {"stored", "missing"}; once every input is stored the server answers
        409, which a repeated last chunk meets: then {"stored": 0, "missing": 0}.
        """
        if encoded is None:
            encoded = [compact(value) for value in inputs or ()]
        raw = f'{{"first":{int(first)},"inputs":[{",".join(encoded)}]}}'.encode()
        try:
            return self.request('PUT', run_path(uuid, 'inputs'), raw=raw,
                                not_found=unknown_run(uuid, self.url))
        except TaskfarmError as exc:
            if exc.status == 409:
                return {'stored': 0, 'missing': 0}
            raise

    # -- routes: tasks -----------------------------------------------------

    def claim_task(self, uuid: str, worker_uuid: str,
                   request_id: str | None = None) -> dict | None:
        """POST /api/runs/{uuid}/task : a task for the worker, None when none waits.

        Sent with a request id (a new one unless given), so that a retry
        after a lost answer gets the same task, not a second one.
        """
        body = {'worker_uuid': worker_uuid, 'requestId': request_id or uuid4().hex}
        return self.request('POST', run_path(uuid, 'task'), body, ok=(201, 204))

    def claim_tasks(self, uuid: str, worker_uuid: str, count: int = 1,
                    updates: Sequence[dict] | None = None,
                    request_id: str | None = None) -> dict:
        """POST /api/runs/{uuid}/tasks/claim : up to `count` tasks, after `updates`.

        Answers {"data": [task, ...]} and, when updates were given, "updates":
        a result per update as `report` answers. Sent with a request id (a
        new one unless given): a retry after a lost answer gets that claim's
        tasks again and no others.
        """
        body: dict[str, Any] = {'worker_uuid': worker_uuid, 'count': count,
                                'requestId': request_id or uuid4().hex}
        if updates is not None:
            body['updates'] = list(updates)
        return self.request('POST', run_path(uuid, 'tasks', 'claim'), body)

    def report(self, uuid: str, worker_uuid: str, updates: Sequence[dict]) -> list[dict]:
        """PATCH /api/runs/{uuid}/tasks : updates of tasks the worker holds.

        Each update is {"task": n, ...} with percentCompleted, status,
        message, exitCode and/or final. A result per update, in order:
        [{"task", "result": "ok" | "not held" | "unknown task"}, ...].
        """
        body = {'worker_uuid': worker_uuid, 'updates': list(updates)}
        return self.request('PATCH', run_path(uuid, 'tasks'), body,
                            not_found=unknown_run(uuid, self.url))['updates']

    def task_info(self, uuid: str, task: int, info: str = '') -> Any:
        """GET /api/runs/{uuid}/tasks/{task} : the task, or one `info` of it."""
        answer = self.request('GET', run_path(uuid, 'tasks', str(task)),
                              query={'info': info or None})
        return answer[info] if info else answer

    def attempts(self, uuid: str, task: int) -> list[dict]:
        """GET /api/runs/{uuid}/tasks/{task}/attempts : its attempts that did
        not end done, oldest first."""
        return self.request('GET', run_path(uuid, 'tasks', str(task), 'attempts'))['data']

    def update_task(self, uuid: str, task: int,
                    percent_completed: float | None = None,
                    status: str | None = None,
                    worker_uuid: str | None = None, **more: Any) -> None:
        """PUT /api/runs/{uuid}/tasks/{task} : progress and/or status.

        `more` takes the other keys of an update (message, exitCode, final).
        With worker_uuid, the server refuses (409) unless that worker still
        holds the task.
        """
        body: dict[str, Any] = dict(more)
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
        """Every listed task of a run, fetching page after page (one in memory)."""
        after = None
        while True:
            page = self.list_tasks(uuid, status=status, after=after,
                                   limit=page_size)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1]['task']

    # -- routes: workers ---------------------------------------------------

    def register_worker(self, worker_uuid: str, hostname: str,
                        pid: int) -> dict:
        """POST /api/worker : register a worker, {"uuid", "id"}."""
        body = {'uuid': worker_uuid, 'hostname': hostname, 'pid': pid}
        return self.request('POST', '/worker', body, ok=(201,))

    def heartbeat(self, worker_uuid: str, run: str | None = None,
                  tasks: Sequence[int] | None = None) -> None:
        """POST /api/workers/{uuid}/heartbeat : renew the worker's leases.

        With `run` and `tasks`, only those tasks of that run (up to 1000),
        so that a task the worker lost track of comes back when its lease
        runs out; without, every task the worker holds.
        """
        path = '/workers/' + urllib.parse.quote(worker_uuid, safe='') + '/heartbeat'
        body = None if run is None else {'run': run, 'tasks': list(tasks or ())}
        self.request('POST', path, body, ok=(204,))

    def workers(self) -> list[dict]:
        """GET /api/workers : this user's workers (an admin's: all)."""
        return self.request('GET', '/workers')['data']

    # -- plumbing ----------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                query: dict | None = None, ok: Sequence[int] = (200,),
                not_found: str | None = None, safe: bool = True,
                gone_ok: bool = False, raw: bytes | None = None) -> Any:
        """Send an /api request with the token; the decoded JSON answer.

        A 401 renews the token once (it may have expired, or the password
        changed). An answer not in `ok` raises; `not_found` words a 404.
        `safe`: the request may be sent again after a lost answer.
        `gone_ok`: a 404 after a repeat means the first one did it.
        `raw`: the body, already encoded.
        """
        target = self._api + path + query_string(query)
        payload = raw if raw is not None else (
            None if body is None else compact(body).encode())
        token = self.token()
        answer = self._send(method, target, payload, basic_auth(token, ''), safe)
        if answer.status == 401:
            token = self._renew_token(token)
            answer = self._send(method, target, payload, basic_auth(token, ''), safe)
        if answer.status == 404 and gone_ok and answer.repeated:
            return None
        if answer.status not in ok:
            raise self._error(answer.status, answer.body, not_found)
        return decode_json(answer.body, self.url)

    def _fetch_token(self) -> str:
        answer = self._send('GET', self._api + '/token', None,
                            basic_auth(self.user, self._password))
        if answer.status == 401:
            raise AuthError(f'wrong user name or password for user '
                            f'{self.user!r} at {self.url}', answer.status)
        if answer.status != 200:
            raise self._error(answer.status, answer.body)
        return decode_json(answer.body, self.url)['token']

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

    def _send(self, method: str, target: str, payload: bytes | None,
              auth: str | None, safe: bool = True) -> Answer:
        """One request, retried on connection errors and 502/503/504 while
        that is safe (see the class), with backoff, within the retry budget."""
        deadline = time.monotonic() + self.retry_seconds
        backoff = FIRST_BACKOFF_SECONDS
        sent = 0
        while True:
            try:
                sent += 1
                status, headers, body, again = self._exchange(method, target, payload,
                                                              auth, safe)
            except (OSError, http.client.HTTPException, NotSent) as exc:
                cause = exc.cause if isinstance(exc, NotSent) else exc
                problem: TaskfarmError = Unreachable(
                    f'cannot reach the taskfarm server at {self.url}: '
                    f'{connection_problem(cause)}')
                if is_final(cause):
                    raise problem from None  # a typo, a distrusted certificate
                if not safe and not isinstance(exc, NotSent):
                    raise AnswerLost(f'lost the answer of the taskfarm server at '
                                     f'{self.url}: {connection_problem(cause)}') from None
                wait = backoff
            else:
                if status not in RETRY_STATUSES:
                    return Answer(status, headers, body, sent > 1 or again)
                words = error_text(body) or f'HTTP {status}'
                if not safe:   # a proxy may have passed it on before it failed
                    raise AnswerLost(f'the taskfarm server at {self.url} is '
                                     f'unavailable: {words}', status)
                asked = retry_after_seconds(headers.get('Retry-After'))
                wait = backoff if asked is None else asked
                problem = TaskfarmError(
                    f'the taskfarm server at {self.url} is unavailable: {words}', status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise problem
            time.sleep(min(wait, remaining))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _exchange(self, method: str, target: str, payload: bytes | None, auth: str | None,
                  safe: bool) -> tuple[int, http.client.HTTPMessage, bytes, bool]:
        """The answer, and whether the request may have reached the server twice."""
        headers = {'Accept': 'application/json', 'User-Agent': 'taskfarm-client'}
        if auth:
            headers['Authorization'] = auth
        if payload is not None:
            headers['Content-Type'] = 'application/json'
        if not safe:
            return (*self._exchange_once(method, target, payload, headers), False)
        connection, reused = self._connection()
        try:
            connection.request(method, target, payload, headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read(), False
        except (OSError, http.client.HTTPException):
            connection.close()
            self._local.connection = None
            if not reused:
                raise
        except BaseException:
            # Interrupted (Ctrl-C) halfway: the connection may hold half an
            # exchange, so the next request must not use it.
            connection.close()
            self._local.connection = None
            raise
        # The server closed our idle keep-alive connection: that is no
        # outage, so try once more at once on a fresh connection. The first
        # try may have reached the server all the same.
        status, headers_in, body, _ = self._exchange(method, target, payload, auth, safe)
        return status, headers_in, body, True

    def _exchange_once(self, method: str, target: str, payload: bytes | None,
                       headers: dict) -> tuple[int, http.client.HTTPMessage, bytes]:
        """A request not safe to repeat, on a connection of its own: a failure
        to connect is NotSent; any later failure may have reached the server."""
        connection = self._new_connection()
        try:
            try:
                connection.connect()
            except OSError as exc:
                raise NotSent(exc) from None
            connection.request(method, target, payload, headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            return connection, True
        connection = self._new_connection()
        self._local.connection = connection
        return connection, False

    def _new_connection(self) -> http.client.HTTPConnection:
        kind = (http.client.HTTPSConnection if self._scheme == 'https'
                else http.client.HTTPConnection)
        return kind(self._host, self._port, timeout=self._timeout)


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


def idle_outlook(info: dict) -> str:
    """What a worker told "nothing waiting" may expect of a run, from its info:

    'finished' (nothing waiting or computing), 'stopped' (too many failures),
    'inputs' (its inputs are not all stored), 'wait' (tasks may come back:
    computing ones whose leases can run out, or waiting ones another worker
    took first), or 'none' (computing without a lease: nothing comes back).
    """
    if info['numWaiting'] == 0 and info['numComputing'] == 0:
        return 'finished'
    if info.get('stopped'):
        return 'stopped'
    if info.get('inputsMissing'):
        return 'inputs'
    if info['numWaiting'] > 0 or (info['numComputing'] > 0 and info.get('timeout')):
        return 'wait'
    return 'none'


def idle_poll_limit(info: dict) -> float:
    """The longest pause between asks while waiting: a third of the lease,
    from 2 to 30 seconds, so that a thousand idle workers stay a trickle."""
    lease = info.get('timeout') or MAX_IDLE_POLL_SECONDS
    return max(MIN_IDLE_POLL_SECONDS, min(MAX_IDLE_POLL_SECONDS, lease / 3))


def jittered(seconds: float) -> float:
    """Between half and all of `seconds`, so that idle workers spread out."""
    return seconds * random.uniform(0.5, 1.0)


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

        for task in worker.tasks:
            ...                      # compute, calling worker.update(percent)
            worker.update(100)
            worker.done()

    When nothing is waiting but tasks of dead workers may still come back
    (the run has a timeout and tasks computing), it keeps asking, with
    growing pauses, until the run is finished; `exit_when_idle=True` stops
    at the first "nothing waiting", as the original does.
    """

    def __init__(self, username: str, password: str, uuid: str,
                 url_base: str = DEFAULT_URL_BASE, exit_when_idle: bool = False) -> None:
        super().__init__(username, password, uuid=uuid, url_base=url_base)
        self._task: int | None = None
        self._percentDone: float | None = None
        self._exit_when_idle = exit_when_idle
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
            claimed = self._next_task()
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

    def _next_task(self) -> dict | None:
        pause = FIRST_IDLE_POLL_SECONDS
        while True:
            claimed = self.client.claim_task(self.uuid, self.worker_uuid)
            if claimed is not None or self._exit_when_idle:
                return claimed
            info = self.client.run_info(self.uuid)
            if idle_outlook(info) != 'wait':
                return None
            time.sleep(jittered(pause))
            pause = min(pause * 2, idle_poll_limit(info))


class TaskFarm(Run):
    """taskfarm_worker.TaskFarm, as the original behaves."""


class TaskFarmWorker(Worker):
    """taskfarm_worker.TaskFarmWorker, as the original behaves: its tasks end
    at the first "nothing waiting"."""

    def __init__(self, username: str, password: str, uuid: str,
                 url_base: str = DEFAULT_URL_BASE) -> None:
        super().__init__(username, password, uuid, url_base=url_base, exit_when_idle=True)


def hostname() -> str:
    return (socket.gethostname() or 'unknown')[:255]


# --------------------------------------------------------------------------
# `taskfarm work`: run a command for each task

PLACEHOLDER = re.compile(r'\{input\}|\{\}')
PROGRESS_BYTES = PROGRESS_PREFIX.encode()
PIPE_READ_BYTES = 65536
MAX_PARTIAL_LINE_BYTES = 65536   # a stdout line longer than this passes on in pieces


def task_command(command: Sequence[str], task: int, text: str | None = None) -> list[str]:
    """The command for one task: in its words `{}` becomes the task number
    and `{input}` the task's input."""
    return CommandTemplate(command).argv(task, text)


class CommandTemplate:
    """A command whose words may hold `{}` and `{input}`; filled in one pass,
    so that an input holding `{}` stays as it is."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self._filled = [i for i, word in enumerate(self.words) if PLACEHOLDER.search(word)]
        self.uses_input = any('{input}' in word for word in self.words)

    def argv(self, task: int, text: str | None) -> list[str]:
        if not self._filled:
            return self.words
        values = {'{}': str(task), '{input}': '' if text is None else text}
        argv = list(self.words)
        for i in self._filled:
            argv[i] = PLACEHOLDER.sub(lambda match: values[match.group()], argv[i])
        return argv


def input_text(task: dict, kind: str | None) -> str | None:
    """A task's input as the command gets it: the line of a text run, the
    compact JSON of a json run's value; None without inputs."""
    if 'input' not in task:
        return None
    return task['input'] if kind == 'text' else compact(task['input'])


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


def stderr_tail(data: bytes, limit: int) -> str:
    """The end of a command's stderr as a message: at most `limit` characters,
    starting at a line when cut, without NULs (the server refuses them)."""
    text = data.decode('utf-8', 'replace').replace('\x00', '')
    if len(text) <= limit:
        return text
    text = text[-limit:]
    newline = text.find('\n')
    return text[newline + 1:] if 0 <= newline < len(text) - 1 else text


def tail_lines(data: bytes) -> list[str]:
    """The last lines of stderr, each cut short, for the terminal."""
    lines = data.decode('utf-8', 'replace').splitlines()[-STDERR_TAIL_LINES:]
    return [line[:MAX_LINE_CHARS] + ' [...]' if len(line) > MAX_LINE_CHARS else line
            for line in lines]


@dataclass
class WorkOptions:
    """How `taskfarm work` takes and runs tasks, beyond the command itself."""

    heartbeat_seconds: float | None = None   # default: from the run's timeout
    time_limit: float | None = None          # seconds a command may run
    final_exit: frozenset[int] = frozenset()  # exit codes that fail a task for good
    stdin: bool = False                      # the input on the command's stdin
    stop_at: float | None = None             # time.time() after which no new task
    max_tasks: int | None = None
    exit_when_idle: bool = False             # stop at the first "nothing waiting"


class Command:
    """One running command: its task, process, pipes and what it wrote."""

    __slots__ = ('task', 'pid', 'out_fd', 'err_fd', 'pid_fd', 'open', 'code', 'started',
                 'partial', 'stderr', 'deadline', 'kill_at', 'timed_out', 'stopped')

    def __init__(self, task: dict, pid: int, out_fd: int, err_fd: int,
                 pid_fd: int | None, deadline: float | None) -> None:
        self.task = task
        self.pid = pid
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.pid_fd = pid_fd
        self.open = 3               # its two pipes and its exit, to wait for
        self.code: int | None = None
        self.started = time.monotonic()
        self.partial = b''          # a stdout line not ended yet
        self.stderr = bytearray()   # its last STDERR_KEEP_BYTES or so
        self.deadline = deadline
        self.kill_at: float | None = None
        self.timed_out = False
        self.stopped = False        # by us: the task goes back to waiting


class Job:
    """One request for the courier thread, and what came of it."""

    __slots__ = ('kind', 'call', 'updates', 'busy', 'result', 'error')

    def __init__(self, kind: str, call: Callable[[], Any], updates: dict[int, dict],
                 busy: bool = False) -> None:
        self.kind = kind
        self.call = call
        self.updates = updates      # task -> update sent with it
        self.busy = busy            # we had tasks of our own when it left
        self.result: Any = None
        self.error: BaseException | None = None


class WorkPool:
    """Runs a command for the tasks of one run, `slots` tasks at a time.

    One registered worker, one thread of events: the main thread starts
    the commands, reads their output and notes their ends, without waiting
    on the server, while a courier thread sends one request at a time (a
    claim carrying the reports of finished tasks, or a report alone) and a
    heartbeat thread renews the leases of exactly the tasks held. Tasks
    that start within about a second are claimed ahead, up to CLAIM_BATCH;
    longer ones only when a slot is free. `stop()` (from a signal handler)
    terminates the commands' process groups and puts every held task back
    to `waiting`.
    """

    def __init__(self, client: Client, run_uuid: str, command: Sequence[str],
                 slots: int = 1, options: WorkOptions | None = None,
                 out: IO[str] | None = None, err: IO[str] | None = None,
                 run: dict | None = None) -> None:
        self.client = client
        self.run_uuid = run_uuid
        self.template = CommandTemplate(command)
        self.slots = slots
        self.options = options or WorkOptions()
        self.worker_uuid = uuid4().hex
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.run_info = run
        self.stop_signal: int | None = None
        self.num_done = 0
        self.num_failed = 0         # failed for good
        self.num_retried = 0        # failed, and the run tries again
        self.num_put_back = 0
        self.num_taken = 0
        self.errors: list[str] = []
        self._queue: collections.deque[tuple[float, dict]] = collections.deque()  # (claimed, task)
        self._running: dict[int, Command] = {}
        self._held: set[int] = set()           # read by the heartbeat thread
        self._lock = threading.Lock()
        self._output_lock = threading.Lock()
        self._pending: dict[int, dict] = {}    # task -> update not sent yet
        self._pending_bytes = 0
        self._pending_since: float | None = None
        self._urgent = False                   # a pending update frees a task
        self._request: Job | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._signals: list[int] = []
        self._no_more: str | None = None       # why we claim no more
        self._winding_down = False             # start nothing new, put the queue back
        self._next_poll = 0.0
        self._idle_pause = FIRST_IDLE_POLL_SECONDS
        self._own_finished = False
        self._kill_at: float | None = None
        self._mean_seconds: float | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=100)
        self._run_typical: float | None = None
        self._warned: set[int] = set()
        self._claimed_failures: dict[int, int] = {}   # task -> failures when it started
        self._programs: dict[str, str] = {}
        self._out_gone = False
        self._kind: str | None = None
        self._retries = 0

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Work until the run is finished or stop() is called; the exit status."""
        self._prepare()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        if self._signals:
            self._wake()
        self._devnull = os.open(os.devnull, os.O_RDONLY)
        self._env = {**os.environ, 'TASKFARM_RUN': self.run_uuid}
        self._beats_stop = threading.Event()
        threads = [threading.Thread(target=self._courier, daemon=True),
                   threading.Thread(target=self._send_heartbeats, daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while True:
                self._start_queued()
                self._send_requests()
                if self._over():
                    break
                self._wait_for_events(self._timeout())
                self._on_timers()
        finally:
            for command in self._running.values():   # only after an unexpected error
                self._signal_command(command, signal.SIGTERM)
            self._jobs.put(None)
            self._beats_stop.set()
            for thread in threads:
                thread.join(timeout=5)
            self._selector.close()
            for fd in (self._wake_r, self._wake_w, self._devnull):
                os.close(fd)
        return self._exit_status()

    def stop(self, signum: int) -> None:
        """Stop: no new tasks, terminate the commands; twice: kill them now.

        Safe in a signal handler and from any thread: the loop acts on it.
        """
        self._signals.append(signum)
        self._wake()

    def _prepare(self) -> None:
        info = self.run_info or self.client.run_info(self.run_uuid)
        self.run_info = info
        self._kind = info.get('inputs')
        self._retries = info.get('retries') or 0
        if (self.template.uses_input or self.options.stdin) and self._kind is None:
            what = '{input} in its arguments' if self.template.uses_input else '--stdin'
            raise TaskfarmError(f'the command uses {what}, but run {self.run_uuid} '
                                'has no inputs (create it with --inputs or --inputs-json)')
        if info.get('inputsMissing'):
            raise TaskfarmError(f'run {self.run_uuid} still waits for '
                                f'{info["inputsMissing"]} of its inputs')
        self.heartbeat_seconds = heartbeat_interval(info, self.options.heartbeat_seconds)
        self.client.register_worker(self.worker_uuid, hostname(), os.getpid())
        if self.options.stop_at is not None:
            self._run_typical = self._typical_of_run()

    def _over(self) -> bool:
        return (self._no_more is not None and not self._queue and not self._running
                and not self._pending and self._request is None)

    def _timeout(self) -> float | None:
        """Seconds until the next thing to do at a given time; None: none."""
        now = time.monotonic()
        times = [self._kill_at]
        if self._queue:
            times.append(self._queue[0][0] + QUEUE_WAIT_SECONDS)
        times += [moment for command in self._running.values()
                  for moment in (command.deadline, command.kill_at)]
        if self._request is None:
            if self._pending_since is not None:
                times.append(self._pending_since + REPORT_DELAY_SECONDS)
            if self._no_more is None and self._next_poll > now:
                times.append(self._next_poll)
        if self.options.stop_at is not None and not self._winding_down:
            times.append(now + max(0.0, self.options.stop_at - time.time()))
        due = [moment for moment in times if moment is not None]
        return max(0.0, min(due) - now) if due else None

    def _wait_for_events(self, timeout: float | None) -> None:
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._on_wake()
            else:
                handler, command = key.data
                handler(command)

    def _wake(self) -> None:
        wake = getattr(self, '_wake_w', None)   # None: the loop has not begun
        with contextlib.suppress(BlockingIOError, OSError):  # already awake, or over
            if wake is not None:
                os.write(wake, b'.')

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self._signals:
            self._on_signal(self._signals.pop(0))
        while not self._answers.empty():
            self._on_answer(self._answers.get())

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for command in self._running.values():
                self._signal_command(command, signal.SIGKILL)
        for command in list(self._running.values()):
            if command.deadline is not None and now >= command.deadline:
                command.deadline = None
                command.timed_out = True
                command.kill_at = now + KILL_GRACE_SECONDS
                self._signal_command(command, signal.SIGTERM)
            elif command.kill_at is not None and now >= command.kill_at:
                command.kill_at = None
                self._signal_command(command, signal.SIGKILL)
        if (self.options.stop_at is not None and not self._winding_down
                and time.time() >= self.options.stop_at):
            self._wind_down('the time given by --stop-after/--stop-at is up')
        if self._queue and now >= self._queue[0][0] + QUEUE_WAIT_SECONDS:
            self._give_back_queue()

    def _give_back_queue(self) -> None:
        """The tasks claimed ahead wait on long ones: another worker may run
        them now. And claim no more ahead until the long ones have ended."""
        now = time.monotonic()
        longest = max((now - command.started for command in self._running.values()),
                      default=0.0)
        self._mean_seconds = max(self._mean_seconds or 0.0, longest)
        for _, task in self._queue:
            self._queue_update(task['task'], {'status': 'waiting'})
        self._queue.clear()

    # -- taking tasks --------------------------------------------------------

    def _start_queued(self) -> None:
        while self._queue and len(self._running) < self.slots and not self._winding_down:
            if not self._time_for_another():
                return
            self._spawn(self._queue.popleft()[1])

    def _time_for_another(self) -> bool:
        """Before --stop-after/--stop-at: is there time left for a typical task?"""
        if self.options.stop_at is None:
            return True
        left = self.options.stop_at - time.time()
        typical = self._typical_seconds()
        if left > typical:
            return True
        self._wind_down(f'{duration(left)} left, less than a typical task '
                        f'({duration(typical)})' if left > 0 else
                        'the time given by --stop-after/--stop-at is up')
        return False

    def _send_requests(self) -> None:
        if self._request is not None:
            return
        now = time.monotonic()
        count = self._claim_count(now)
        if count:
            self._submit_claim(count)
        elif self._pending and self._report_due(now):
            self._submit_report()

    def _claim_count(self, now: float) -> int:
        """How many tasks to claim now: 0 unless a slot would idle, or the
        tasks claimed ahead run low."""
        if self._no_more is not None or self._winding_down:
            return 0
        if now < self._next_poll and not self._own_finished:
            return 0
        ahead = self._lookahead()
        waiting = len(self._queue)
        if self.slots - len(self._running) <= waiting and not (ahead and waiting <= ahead // 2):
            return 0
        want = min(MAX_BATCH, self.slots + ahead - waiting - len(self._running))
        if self.options.max_tasks is not None:
            left = self.options.max_tasks - self.num_taken
            if left <= 0:
                self._no_more = 'max tasks'
                return 0
            want = min(want, left)
        if want < 1 or not self._time_for_another():
            return 0
        return want

    def _lookahead(self) -> int:
        """Tasks to hold beyond the slots: those that would start within
        LOOKAHEAD_SECONDS at the pace seen so far (none while unknown, nor
        while no slot has freed for that long)."""
        if self._mean_seconds is None:
            return 0
        if len(self._running) >= self.slots:
            now = time.monotonic()
            if min(now - command.started for command in self._running.values()) > \
                    LOOKAHEAD_SECONDS:
                return 0
        starts = self.slots * LOOKAHEAD_SECONDS / max(self._mean_seconds, 1e-4)
        return min(CLAIM_BATCH, int(starts))

    def _submit_claim(self, count: int) -> None:
        updates = self._take_pending()
        request_id = uuid4().hex      # a retry of this claim sends the same
        items = list(updates.values()) or None

        def call() -> tuple[dict, dict | None]:
            answer = self.client.claim_tasks(self.run_uuid, self.worker_uuid, count,
                                             items, request_id)
            info = None if answer['data'] else self.client.run_info(self.run_uuid)
            return answer, info

        busy = bool(self._queue or self._running or self._pending)
        self._submit(Job('claim', call, updates, busy))

    def _submit_report(self) -> None:
        updates = self._take_pending()
        items = list(updates.values())
        self._submit(Job('report', lambda: self.client.report(
            self.run_uuid, self.worker_uuid, items), updates))

    def _submit(self, job: Job) -> None:
        self._request = job
        self._own_finished = False
        self._jobs.put(job)

    def _report_due(self, now: float) -> bool:
        return (self._urgent or self._no_more is not None or self._winding_down
                or len(self._pending) >= CLAIM_BATCH
                or self._pending_bytes >= MAX_BODY_BYTES // 2
                or now >= (self._pending_since or now) + REPORT_DELAY_SECONDS)

    def _take_pending(self) -> dict[int, dict]:
        """Pending updates for one request: up to MAX_BATCH, within the body limit."""
        taken: dict[int, dict] = {}
        size = 0
        for task, update in self._pending.items():
            cost = update_size(update)
            if len(taken) >= MAX_BATCH or (taken and size + cost > MAX_BODY_BYTES):
                break
            taken[task] = update
            size += cost
        for task in taken:
            del self._pending[task]
        self._pending_bytes = max(0, self._pending_bytes - size)
        if not self._pending:
            self._pending_since = None
            self._urgent = False
        return taken

    # -- answers -----------------------------------------------------------

    def _courier(self) -> None:
        """The thread that talks to the server, one request at a time."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.call()
            except Exception as exc:   # handed to the loop, which decides
                job.error = exc
            self._answers.put(job)
            self._wake()

    def _on_answer(self, job: Job) -> None:
        self._request = None
        if job.error is not None:
            self._on_request_failed(job)
        elif job.kind == 'claim':
            answer, info = job.result
            self._on_results(job.updates, answer.get('updates'))
            self._on_claimed(answer['data'], info, job.busy)
        else:
            self._on_results(job.updates, job.result)

    def _on_request_failed(self, job: Job) -> None:
        if not isinstance(job.error, TaskfarmError):
            raise job.error
        self._record_error(str(job.error))
        self._no_more = 'error'
        retry_reports = job.kind == 'claim' and not isinstance(job.error, (NotFound, AuthError))
        if job.error.status is not None and job.error.status < 500:
            retry_reports = False
        if retry_reports:      # those reports get one more try, alone
            for task, update in job.updates.items():
                self._queue_update(task, update)
        else:                  # their leases will bring them back
            for task in job.updates:
                self._release(task)

    def _on_claimed(self, tasks: list[dict], info: dict | None, busy: bool) -> None:
        if tasks:
            with self._lock:
                self._held.update(task['task'] for task in tasks)
            self.num_taken += len(tasks)
            if self._winding_down:   # a claim that left before we began to stop
                for task in tasks:
                    self._queue_update(task['task'], {'status': 'waiting'})
                return
            now = time.monotonic()
            self._queue.extend((now, task) for task in tasks)
            self._idle_pause = FIRST_IDLE_POLL_SECONDS
            self._next_poll = 0.0
            return
        outlook = idle_outlook(info)
        if outlook == 'finished':
            self._no_more = outlook
        elif outlook == 'stopped':
            self._no_more = outlook
            self._say(f'taskfarm: run {self.run_uuid} is stopped: {info["numFailed"]} '
                      'tasks failed (its maxFailures); restart it to go on\n')
        elif outlook == 'inputs':
            self._no_more = outlook
            self._record_error(f'run {self.run_uuid} still waits for '
                               f'{info["inputsMissing"]} of its inputs')
        elif self.options.exit_when_idle:
            self._no_more = 'idle'
        elif busy or outlook == 'wait':
            # Ask again later; or sooner, when a task of ours ends (a retry
            # may bring it back).
            self._next_poll = time.monotonic() + jittered(self._idle_pause)
            self._idle_pause = min(self._idle_pause * 2, idle_poll_limit(info))
        else:
            self._no_more = 'idle'

    def _on_results(self, sent: dict[int, dict], results: list[dict] | None) -> None:
        for item in results or ():
            task = item['task']
            update = sent.get(task, {})
            status = update.get('status')
            if item['result'] == 'ok':
                self._count_outcome(task, update)
                if status is not None:
                    self._release(task)
                continue
            # A put-back or failure report sent twice finds the task gone
            # the second time (back to waiting): only the others are news.
            if status not in ('waiting', 'failed') and task not in self._warned:
                self._warned.add(task)
                self._say(f'taskfarm: task {task}: another worker holds it now (this lease '
                          'ran out); leaving it to them\n')
            if status is not None:
                self._release(task)

    def _count_outcome(self, task: int, update: dict) -> None:
        status = update.get('status')
        if status == 'done':
            self.num_done += 1
        elif status == 'waiting':
            self.num_put_back += 1
        elif status == 'failed':
            if self._retried(task, update):
                self.num_retried += 1
            else:
                self.num_failed += 1

    def _retried(self, task: int, update: dict) -> bool:
        """Whether the run gives a task reported failed another try."""
        failures = self._claimed_failures.get(task, 0)
        return not update.get('final') and failures < self._retries

    def _release(self, task: int) -> None:
        with self._lock:
            self._held.discard(task)
        self._claimed_failures.pop(task, None)

    # -- commands ----------------------------------------------------------

    def _spawn(self, task: dict) -> None:
        number = task['task']
        self._claimed_failures[number] = task.get('failures', 0)
        text = input_text(task, self._kind)
        env = self._env | {'TASKFARM_TASK': str(number)}
        if text is not None:
            env['TASKFARM_INPUT'] = text
        argv = self.template.argv(number, text)
        program = self._program(argv[0])
        stdin = self._devnull
        if self.options.stdin:
            stdin = feed(text or '')
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # Its own session, so that we can stop the command and all its
            # children at once, and a terminal's Ctrl-C reaches us only: we
            # decide what happens to the task.
            pid = os.posix_spawnp(program, argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2)])
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            self._record_error(f'cannot run {argv[0]!r}: {exc.strerror or exc}')
            # The task is not to blame (a typo, say): it waits again, and we stop.
            self._queue_update(number, {'status': 'waiting'})
            self._wind_down(None)
            return
        finally:
            os.close(out_w)
            os.close(err_w)
            if stdin != self._devnull:
                os.close(stdin)
        limit = self.options.time_limit
        command = Command(task, pid, out_r, err_r, open_pidfd(pid),
                          None if limit is None else time.monotonic() + limit)
        self._running[pid] = command
        register = self._selector.register
        register(out_r, selectors.EVENT_READ, (self._on_stdout, command))
        register(err_r, selectors.EVENT_READ, (self._on_stderr, command))
        if command.pid_fd is not None:
            register(command.pid_fd, selectors.EVENT_READ, (self._on_exit, command))

    def _program(self, name: str) -> str:
        """The command's file, looked up in PATH once rather than at every task."""
        found = self._programs.get(name)
        if found is None:
            found = name if os.sep in name else shutil.which(name) or name
            if len(self._programs) < 100:   # `{}` in the command's name: keep a few
                self._programs[name] = found
        return found

    def _on_stdout(self, command: Command) -> None:
        data = os.read(command.out_fd, PIPE_READ_BYTES)
        if not data:
            self._pass_on(command, command.partial)
            command.partial = b''
            self._close_pipe(command, command.out_fd)
            return
        if command.partial:
            data = command.partial + data
        cut = data.rfind(b'\n') + 1
        command.partial = data[cut:]
        if len(command.partial) > MAX_PARTIAL_LINE_BYTES:
            cut, command.partial = len(data), b''
        self._pass_on(command, data[:cut])

    def _pass_on(self, command: Command, data: bytes) -> None:
        """Output lines to our stdout; progress lines to the server."""
        if PROGRESS_BYTES in data:
            kept = []
            for line in data.splitlines(keepends=True):
                percent = parse_progress(line.decode('utf-8', 'replace'))
                if percent is None:
                    kept.append(line)
                else:
                    self._queue_update(command.task['task'], {'percentCompleted': percent})
            data = b''.join(kept)
        if data and not self._out_gone:
            self._emit(data)

    def _on_stderr(self, command: Command) -> None:
        data = os.read(command.err_fd, PIPE_READ_BYTES)
        if not data:
            self._close_pipe(command, command.err_fd)
            return
        kept = command.stderr
        kept += data
        if len(kept) > 2 * STDERR_KEEP_BYTES:
            del kept[:-STDERR_KEEP_BYTES]

    def _on_exit(self, command: Command) -> None:
        self._selector.unregister(command.pid_fd)
        os.close(command.pid_fd)
        command.pid_fd = None
        self._reap(command)

    def _reap(self, command: Command) -> None:
        _, status = os.waitpid(command.pid, 0)
        command.code = os.waitstatus_to_exitcode(status)
        command.open -= 1
        if command.open == 0:
            self._finish(command)

    def _close_pipe(self, command: Command, fd: int) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        command.open -= 1
        if command.open == 0:
            self._finish(command)
        elif command.open == 1 and command.pid_fd is None and command.code is None:
            self._reap(command)   # no pidfd (not Linux): its pipes closed, so it ends

    def _finish(self, command: Command) -> None:
        """A command ended and its output is read: what becomes of its task."""
        del self._running[command.pid]
        task = command.task['task']
        seconds = time.monotonic() - command.started
        code = command.code
        if command.stopped:
            self._queue_update(task, {'status': 'waiting'})
            return
        self._durations.append(seconds)
        self._mean_seconds = (seconds if self._mean_seconds is None
                              else 0.8 * self._mean_seconds + 0.2 * seconds)
        if code == 0 and not command.timed_out:
            self._queue_update(task, {'status': 'done', 'percentCompleted': 100})
            return
        note = self._failure_note(command)
        message = stderr_tail(bytes(command.stderr),
                              MAX_MESSAGE_CHARS - (len(note) + 1 if note else 0))
        update: dict[str, Any] = {'status': 'failed', 'exitCode': code,
                                  'message': f'{note}\n{message}' if note else message}
        if code in self.options.final_exit:
            update['final'] = True
        self._queue_update(task, update)
        self._show_failure(task, code, note, command.stderr, self._retried(task, update))

    def _failure_note(self, command: Command) -> str:
        if command.timed_out:
            return (f'taskfarm: stopped at the time limit of '
                    f'{duration(self.options.time_limit)} (--time-limit)')
        if command.code is not None and command.code < 0:
            return f'taskfarm: killed by {signal_name(-command.code)}'
        return ''

    def _signal_command(self, command: Command, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(command.pid, signum)   # unless already gone

    # -- stopping ----------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if self.stop_signal is not None:   # a second signal: kill them now
            for command in self._running.values():
                self._signal_command(command, signal.SIGKILL)
            return
        self.stop_signal = signum
        self._wind_down(None)
        for command in self._running.values():
            command.stopped = True
            self._signal_command(command, signal.SIGTERM)
        self._kill_at = time.monotonic() + KILL_GRACE_SECONDS

    def _wind_down(self, why: str | None) -> None:
        """Take no new task; the tasks claimed ahead go back to waiting."""
        if self._winding_down:
            return
        self._winding_down = True
        if self._no_more is None:
            self._no_more = 'stopping'
        if why:
            self._say(f'taskfarm: taking no more tasks: {why}\n')
        for _, task in self._queue:
            self._queue_update(task['task'], {'status': 'waiting'})
        self._queue.clear()

    # -- --stop-after: how long a task takes ---------------------------------

    def _typical_seconds(self) -> float:
        """A typical task's duration: the median of ours, else of the run's."""
        if len(self._durations) >= 3 or (self._durations and self._run_typical is None):
            return statistics.median(self._durations)
        return self._run_typical or 0.0

    def _typical_of_run(self) -> float | None:
        """The median duration of the run's done tasks (from a page of them)."""
        tasks = self.client.list_tasks(self.run_uuid, status='done', limit=100)
        seconds = [parse_iso(task['updated']) - parse_iso(task['started'])
                   for task in tasks if task.get('started') and task.get('updated')]
        return statistics.median(seconds) if seconds else None

    # -- shared state ------------------------------------------------------

    def _queue_update(self, task: int, update: dict) -> None:
        """An update to send with the next claim or report (one per task)."""
        current = self._pending.get(task)
        if current is None:
            current = self._pending[task] = {'task': task}
        else:
            self._pending_bytes -= update_size(current)
        current.update(update)
        self._pending_bytes += update_size(current)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        if update.get('status') in ('failed', 'waiting'):
            self._urgent = True     # another worker may take it at once
        if 'status' in update:
            self._own_finished = True

    def _send_heartbeats(self) -> None:
        while not self._beats_stop.wait(self.heartbeat_seconds):
            with self._lock:
                tasks = sorted(self._held)
            try:
                for first in range(0, len(tasks), MAX_BATCH):
                    self.client.heartbeat(self.worker_uuid, self.run_uuid,
                                          tasks[first:first + MAX_BATCH])
            except TaskfarmError as exc:
                self._say(f'taskfarm: heartbeat failed: {exc}\n')

    def _record_error(self, message: str) -> None:
        if message not in self.errors:
            self.errors.append(message)

    def _emit(self, data: bytes) -> None:
        """Pass bytes on to our stdout as they came."""
        try:
            with self._output_lock:
                buffer = getattr(self.out, 'buffer', None)
                if buffer is None:
                    self.out.write(data.decode('utf-8', 'replace'))
                else:
                    self.out.flush()
                    buffer.write(data)
                    buffer.flush()
        except BrokenPipeError:
            self._out_gone = True   # `taskfarm work ... | head`: the reader left

    def _say(self, text: str) -> None:
        with self._output_lock:
            try:
                self.err.write(text)
                self.err.flush()
            except BrokenPipeError:
                pass

    def _show_failure(self, task: int, code: int | None, note: str, stderr: bytes,
                      retried: bool) -> None:
        how = note.removeprefix('taskfarm: ') if note else f'exit status {code}'
        text = f'taskfarm: task {task} failed ({how})'
        if retried:
            text += ', to be retried'
        lines = tail_lines(bytes(stderr))
        if lines:
            text += '; the end of its stderr:\n' + ''.join(f'  | {line}\n' for line in lines)
        else:
            text += ' and wrote nothing to stderr\n'
        self._say(text)

    def _exit_status(self) -> int:
        summary = (f'taskfarm: worker {self.worker_uuid[:8]}: '
                   f'{self.num_done} done, {self.num_failed} failed')
        if self.num_retried:
            summary += f', {self.num_retried} failed and retried'
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            summary += (f'; stopped by {name}, {self.num_put_back} '
                        f'task(s) put back to waiting')
        self._say(summary + '\n')
        for message in self.errors:
            self._say(f'taskfarm: {message}\n')
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return EXIT_FAILED if self.num_failed or self.errors else 0


def update_size(update: dict) -> int:
    """About how many bytes an update takes in a body (exact for messages)."""
    message = update.get('message')
    return 80 + (len(compact(message)) if message else 0)


def open_pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when the process ends (Linux)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def feed(text: str) -> int:
    """The read end of a pipe holding `text` and a newline (a task's input
    is at most 4096 characters, so the pipe's buffer holds it whole)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, (text + '\n').encode())
    finally:
        os.close(write_end)
    return read_end


def signal_name(signum: int) -> str:
    try:
        return f'signal {signum} ({signal.Signals(signum).name})'
    except ValueError:
        return f'signal {signum}'


def install_stop_handlers(pool: WorkPool) -> None:
    """SIGINT and SIGTERM stop the pool (its tasks go back to waiting)."""
    def handle(signum: int, frame: Any) -> None:
        pool.stop(signum)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


# --------------------------------------------------------------------------
# Inputs: one per task, from a file of lines or of JSON values

MAX_CHUNK_INPUTS = 10_000      # the server's most inputs in one chunk


class InputError(TaskfarmError):
    """An input file that cannot make a run; the message names the line."""


def no_constants(name: str) -> Any:
    raise ValueError(f'{name} is not JSON')


def load_json(text: str) -> Any:
    """Strict JSON: NaN and Infinity, which Python would take, are refused."""
    return json.loads(text, parse_constant=no_constants)


def text_inputs(stream: IO[bytes], name: str) -> Iterator[str]:
    """The lines of a text file, each a task's input, checked as the server will."""
    limit = 4 * MAX_INPUT_CHARS + 3    # bytes: 4096 characters of UTF-8, and CR LF
    number = 0
    while True:
        raw = stream.readline(limit)   # never a whole huge line in memory
        if not raw:
            return
        number += 1
        if len(raw) >= limit and not raw.endswith(b'\n'):
            raise too_long(name, number)
        line = raw[:-1] if raw.endswith(b'\n') else raw
        if line.endswith(b'\r'):
            line = line[:-1]
        try:
            text = line.decode('utf-8')
        except UnicodeDecodeError:
            raise InputError(f'{name} line {number}: not UTF-8 text') from None
        if len(text) > MAX_INPUT_CHARS:
            raise too_long(name, number)
        if '\x00' in text:
            raise InputError(f'{name} line {number}: holds a NUL character, which no '
                             'command line or environment variable can carry')
        yield text


def too_long(name: str, number: int) -> InputError:
    return InputError(f'{name} line {number}: longer than {MAX_INPUT_CHARS} characters, '
                      'the most one input may have')


def json_inputs(stream: IO[bytes], name: str) -> Iterator[Any]:
    """The values of a JSON-lines file (blank lines skipped), or the items of
    a JSON array; a file that holds one array is read as an array."""
    lines = enumerate(stream, 1)
    for number, raw in lines:
        first = decode_line(raw, name, number)
        if first.strip():
            break
    else:
        return
    if first.lstrip().startswith('['):
        try:
            value = load_json(first)
        except ValueError:   # an array over several lines: read it whole
            yield from array_items(first + decode_line(stream.read(), name, number),
                                   name, number)
            return
        rest = next(((n, line) for n, raw in lines
                     if (line := decode_line(raw, name, n)).strip()), None)
        if rest is None:
            yield from value
            return
        yield value
        yield json_line(rest[1], name, rest[0])
    else:
        yield json_line(first, name, number)
    for number, raw in lines:
        line = decode_line(raw, name, number)
        if line.strip():
            yield json_line(line, name, number)


def decode_line(raw: bytes, name: str, number: int) -> str:
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        raise InputError(f'{name} line {number}: not UTF-8 text') from None


def json_line(line: str, name: str, number: int) -> Any:
    try:
        return load_json(line)
    except ValueError as exc:
        raise InputError(f'{name} line {number}: invalid JSON: {json_reason(exc)}') from None


def array_items(text: str, name: str, first_line: int) -> list:
    try:
        value = load_json(text)
    except json.JSONDecodeError as exc:
        raise InputError(f'{name} line {first_line + exc.lineno - 1}: invalid JSON: '
                         f'{exc.msg}') from None
    except ValueError as exc:
        raise InputError(f'{name}: invalid JSON: {exc}') from None
    if not isinstance(value, list):
        raise InputError(f'{name}: not a JSON array nor JSON lines')
    return value


def json_reason(exc: ValueError) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


def spool_inputs(stream: IO[bytes], name: str, kind: str, spool: IO[str]) -> int:
    """Check every input of `stream` and write each to `spool` as compact
    JSON, one a line, before anything is sent; the number of inputs."""
    values: Iterable[Any] = (text_inputs(stream, name) if kind == 'text'
                             else json_inputs(stream, name))
    count = 0
    for count, value in enumerate(values, 1):
        encoded = compact(value)
        if kind == 'json' and len(encoded) > MAX_INPUT_CHARS:
            raise InputError(f'{name}: input {count} is longer than {MAX_INPUT_CHARS} '
                             'characters as compact JSON, the most one input may have')
        if count > MAX_INPUTS:
            raise InputError(f'{name} has more than {MAX_INPUTS} inputs, the most '
                             'one run may have')
        spool.write(encoded + '\n')
    if count == 0:
        raise InputError(f'{name} holds no input (it is empty)')
    return count


def read_inputs(path: str, kind: str, spool: IO[str]) -> int:
    """spool_inputs from a file, or from stdin for `-`."""
    if path == '-':
        return spool_inputs(sys.stdin.buffer, 'stdin', kind, spool)
    try:
        stream = open(path, 'rb')  # noqa: SIM115 (closed below, errors worded first)
    except OSError as exc:
        raise InputError(f'cannot read {path}: {exc.strerror or exc}') from None
    with stream:
        return spool_inputs(stream, path, kind, spool)


def upload_inputs(client: Client, uuid: str, spool: IO[str]) -> None:
    """Send the spooled inputs in chunks that keep under the body limit."""
    spool.seek(0)
    first, chunk, size = 0, [], 0
    for line in spool:
        item = line[:-1]
        if chunk and (size + len(item) > MAX_BODY_BYTES or len(chunk) >= MAX_CHUNK_INPUTS):
            client.put_inputs(uuid, first, encoded=chunk)
            first, chunk, size = first + len(chunk), [], 0
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        client.put_inputs(uuid, first, encoded=chunk)
    missing = client.run_info(uuid).get('inputsMissing')
    if missing:
        raise TaskfarmError(f'the server still misses {missing} inputs after the upload')


# --------------------------------------------------------------------------
# Parsing the options a user types

DURATION_RE = re.compile(r'(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d*)?)s)?')
RANGES_RE = re.compile(r'\d{1,10}(?:-\d{1,10})?(?:,\d{1,10}(?:-\d{1,10})?)*')
MAX_RANGES = 1000


def parse_duration(text: str, option: str) -> float:
    """Seconds from `90s`, `10m`, `2h`, `1h30m`, `1d` or a bare number of seconds."""
    spoken = text.strip().lower()
    if re.fullmatch(r'\d+(?:\.\d*)?', spoken):
        seconds = float(spoken)
    else:
        match = DURATION_RE.fullmatch(spoken)
        if match is None or not any(match.groups()):
            raise TaskfarmError(f'bad {option} {text!r}: give a duration such as 90s, 10m, '
                                '2h or 1h30m')
        days, hours, minutes, secs = (float(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise TaskfarmError(f'bad {option} {text!r}: the duration must be more than 0')
    return seconds


def parse_moment(text: str, option: str = '--stop-at') -> float:
    """A time (epoch seconds) from `18:30` (the next such time), an ISO 8601
    date and time (local unless it says Z or an offset), or `@EPOCH`."""
    spoken = text.strip()
    try:
        if spoken.startswith('@'):
            return float(spoken[1:])
        if re.fullmatch(r'\d{1,2}:\d\d(?::\d\d)?', spoken):
            clock = datetime.time(*(int(part) for part in spoken.split(':')))
            now = datetime.datetime.now()
            moment = datetime.datetime.combine(now.date(), clock)
            if moment <= now:
                moment += datetime.timedelta(days=1)
            return moment.timestamp()
        if spoken.endswith(('Z', 'z')):
            spoken = spoken[:-1] + '+00:00'
        return datetime.datetime.fromisoformat(spoken).timestamp()
    except ValueError:
        raise TaskfarmError(f'bad {option} {text!r}: give a time such as 18:30, '
                            '2026-12-24T18:30 or @EPOCH-SECONDS') from None


def parse_ranges(text: str) -> str:
    """Check a --tasks value (`3-5,9`); the server checks it is within the run."""
    if not RANGES_RE.fullmatch(text):
        raise TaskfarmError(f'bad --tasks {text!r}: give task numbers and ranges a-b, '
                            'comma-separated, without spaces (e.g. 3-5,9)')
    items = text.split(',')
    if len(items) > MAX_RANGES:
        raise TaskfarmError(f'bad --tasks: more than {MAX_RANGES} items')
    for item in items:
        low, _, high = item.partition('-')
        if high and int(low) > int(high):
            raise TaskfarmError(f'bad --tasks {text!r}: the range {item} ends before it starts')
    return text


def parse_codes(text: str | None) -> frozenset[int]:
    """Exit codes from `2,42`."""
    if not text:
        return frozenset()
    try:
        codes = frozenset(int(code) for code in text.split(','))
    except ValueError:
        raise TaskfarmError(f'bad --final-exit {text!r}: give exit codes, comma-separated '
                            '(e.g. 2,42)') from None
    if any(not -2**31 <= code < 2**31 for code in codes):
        raise TaskfarmError(f'bad --final-exit {text!r}: an exit code is out of range')
    return codes


def parse_iso(text: str) -> float:
    """Epoch seconds from the server's ISO 8601 UTC times (`...Z`)."""
    return datetime.datetime.fromisoformat(text.replace('Z', '+00:00')).timestamp()


def cpu_slots() -> int:
    """The cores this process may use (a batch system's allocation, say)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def jobs_value(text: str) -> int:
    if text == 'auto':
        return cpu_slots()
    return positive_int(text)


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


def first_line(message: str | None) -> str:
    """The first non-empty line of a message, for a one-line listing."""
    for line in (message or '').splitlines():
        if line.strip():
            return line.strip()
    return ''


def shown(value: Any) -> str:
    return '-' if value is None else str(value)


def worker_where(task: dict) -> str:
    worker = task.get('worker')
    return f'{worker["hostname"]}:{worker["pid"]}' if worker else '-'


# --------------------------------------------------------------------------
# Commands: each takes the Client and the parsed arguments, returns a status

def cmd_create(client: Client, args: argparse.Namespace) -> int:
    settings = {'name': args.name, 'timeout': args.timeout,
                'max_attempts': args.max_attempts, 'retries': args.retries,
                'max_failures': args.max_failures}
    if args.inputs is not None or args.inputs_json is not None:
        run = create_with_inputs(client, args, settings)
    elif args.num_tasks is None:
        raise TaskfarmError('give the number of tasks N, or --inputs FILE')
    else:
        run = create(client, args.num_tasks, settings)
    print(run['uuid'])  # alone, for RUN=$(taskfarm create 100)
    return 0


def create(client: Client, num_tasks: int, settings: dict, inputs: str | None = None) -> dict:
    try:
        return client.create_run(num_tasks, inputs=inputs, **settings)
    except AnswerLost as exc:
        raise TaskfarmError(f'{exc}; the run may have been created all the same: see '
                            '`taskfarm list`' + (' (without all its inputs it hands out '
                                                 'nothing)' if inputs else '')) from None


def create_with_inputs(client: Client, args: argparse.Namespace, settings: dict) -> dict:
    """A run with one task per input, made only once every input is checked,
    and deleted again if the upload fails, so nothing half made is left."""
    kind, path = (('text', args.inputs) if args.inputs is not None
                  else ('json', args.inputs_json))
    with tempfile.TemporaryFile('w+', encoding='ascii') as spool:
        count = read_inputs(path, kind, spool)
        if args.num_tasks is not None and args.num_tasks != count:
            raise InputError(f'{path} holds {count} inputs, not the {args.num_tasks} '
                             'tasks asked for')
        # Ctrl-C waits until the run is known, so that it can be deleted.
        stopping = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
        try:
            run = create(client, count, settings, inputs=kind)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
            raise
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)   # a Ctrl-C lands here
            upload_inputs(client, run['uuid'], spool)
        except BaseException as exc:
            why = str(exc) if isinstance(exc, TaskfarmError) else 'interrupted'
            try:
                client.delete_run(run['uuid'])
            except TaskfarmError as second:
                raise TaskfarmError(
                    f'uploading the inputs failed ({why}), and deleting run {run["uuid"]} '
                    f'failed too ({second}); it hands out nothing, delete it with '
                    '`taskfarm delete`') from None
            if isinstance(exc, TaskfarmError):
                raise TaskfarmError(f'uploading the inputs failed ({why}); the run was '
                                    'deleted') from None
            raise
    return run


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
    pace = client.pace(args.uuid)
    lines += [('pace', f'{pace["donePerMinute"]:.1f} done/min (recent)'),
              ('eta', duration(pace['etaSeconds']))]
    if info.get('stopped'):
        lines.append(('stopped', f'yes: {info.get("numFailed", 0)} failed, maxFailures '
                                 f'{info.get("maxFailures")}; a restart resumes it'))
    if info.get('inputs'):
        missing = info.get('inputsMissing') or 0
        lines.append(('inputs', info['inputs'] + (f', {missing} missing' if missing else '')))
    settings = [('timeout', info.get('timeout')), ('retries', info.get('retries')),
                ('max failures', info.get('maxFailures'))]
    lines += [(label, value) for label, value in settings if value is not None]
    for label, value in lines:
        print(f'{label:<10} {value}')
    return 0


TASK_ROW = '{:>10}  {:<9}  {:>7}  {:>8}  {:>8}  {:>6}  {:<24}  {:<20}  {}\n'
CSV_FIELDS = ('task', 'status', 'percentCompleted', 'attempts', 'failures', 'exitCode',
              'started', 'updated', 'hostname', 'pid', 'worker', 'message')


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    # Page after page: a run of a million tasks takes the memory of one page.
    tasks = client.iter_tasks(args.uuid, status=args.status)
    out = sys.stdout
    if args.format == 'json':
        for task in tasks:
            out.write(compact(task) + '\n')
    elif args.format == 'csv':
        writer = csv.writer(out, lineterminator='\n')
        writer.writerow(CSV_FIELDS)
        for task in tasks:
            worker = task.get('worker') or {}
            writer.writerow([
                task['task'], task['status'], task['percentCompleted'],
                task.get('attempts'), task.get('failures'), task.get('exitCode'),
                task.get('started'), task.get('updated'), worker.get('hostname'),
                worker.get('pid'), worker.get('uuid'), task.get('message')])
    else:
        out.write(TASK_ROW.format('TASK', 'STATUS', 'PERCENT', 'ATTEMPTS', 'FAILURES',
                                  'EXIT', 'UPDATED', 'WORKER', 'MESSAGE'))
        for task in tasks:
            out.write(TASK_ROW.format(
                task['task'], task['status'], f'{task["percentCompleted"]:.1f}',
                shown(task.get('attempts')), shown(task.get('failures')),
                shown(task.get('exitCode')), task.get('updated') or '-',
                worker_where(task), first_line(task.get('message'))).rstrip() + '\n')
    return 0


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    """One task, with every attempt that did not end done and its whole message."""
    task = client.task_info(args.uuid, args.task)
    attempts = client.attempts(args.uuid, args.task)
    out = sys.stdout
    fields = [('task', task['task']), ('status', task['status']),
              ('progress', f'{task["percentCompleted"]:.1f}%'),
              ('attempts', task.get('attempts')), ('failures', task.get('failures')),
              ('exit code', shown(task.get('exitCode')))]
    if 'input' in task:
        value = task['input']
        fields.append(('input', value if isinstance(value, str) else compact(value)))
    for label, value in fields:
        out.write(f'{label:<10} {value}\n')
    write_message(out, task.get('message'))
    out.write(f'\n{len(attempts)} earlier attempt(s) that did not end done\n')
    for attempt in attempts:
        worker = attempt.get('worker')
        where = f'{worker["hostname"]}:{worker["pid"]}' if worker else '-'
        out.write(f'\nattempt {attempt["attempt"]}: {attempt["outcome"]}, exit code '
                  f'{shown(attempt.get("exitCode"))}, {shown(attempt.get("started"))} to '
                  f'{shown(attempt.get("ended"))} on {where}\n')
        write_message(out, attempt.get('message'))
    return 0


def write_message(out: IO[str], message: str | None) -> None:
    if not message:
        out.write('message    -\n')
        return
    out.write('message\n')
    out.write(''.join(f'  | {line}\n' for line in message.splitlines()))


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
    tasks = None if args.tasks is None else parse_ranges(args.tasks)
    try:
        client.restart(args.uuid, everything=args.all, status=args.status, tasks=tasks)
    except AnswerLost as exc:
        raise TaskfarmError(f'{exc}; the restart may or may not have happened: see '
                            f'`taskfarm info {args.uuid}`') from None
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_run(args.uuid)
    return 0


def work_options(args: argparse.Namespace) -> WorkOptions:
    """The options of `taskfarm work`, checked before the server is asked anything."""
    if args.stop_after is not None and args.stop_at is not None:
        raise TaskfarmError('give --stop-after or --stop-at, not both')
    stop_at = None
    if args.stop_after is not None:
        stop_at = time.time() + parse_duration(args.stop_after, '--stop-after')
    elif args.stop_at is not None:
        stop_at = parse_moment(args.stop_at)
    return WorkOptions(
        heartbeat_seconds=args.heartbeat,
        time_limit=(None if args.time_limit is None
                    else parse_duration(args.time_limit, '--time-limit')),
        final_exit=parse_codes(args.final_exit), stdin=args.stdin, stop_at=stop_at,
        max_tasks=args.max_tasks, exit_when_idle=args.exit_when_idle)


def cmd_work(client: Client, args: argparse.Namespace) -> int:
    options = work_options(args)
    run = client.run_info(args.uuid)  # an unknown run fails here, not later
    pool = WorkPool(client, args.uuid, args.command, slots=args.jobs, options=options,
                    run=run)
    install_stop_handlers(pool)
    return pool.run()


# --------------------------------------------------------------------------
# Command line

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1: {text}')
    return value


def natural_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be at least 0: {text}')
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be more than 0: {text}')
    return value


STATUSES = ('waiting', 'computing', 'done', 'failed')

WORK_EPILOG = (
    'COMMAND runs with TASKFARM_TASK, TASKFARM_RUN and, for a run with inputs, '
    'TASKFARM_INPUT in its environment; {} in ARGS is the task number and {input} '
    'its input. Exit status 0 marks the task done, anything else failed (the end of '
    'its stderr is shown and stored with the task). A stdout line '
    f'"{PROGRESS_PREFIX} <0-100>" reports progress. When nothing is waiting it '
    'keeps asking while tasks of other workers may still come back (their leases '
    'can run out), and stops when the run is finished. Ctrl-C or SIGTERM stops '
    'the commands and puts their tasks back to waiting. Exit status: 0, or 1 if a '
    'task failed for good.')


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
    create.add_argument('num_tasks', type=positive_int, metavar='N', nargs='?',
                        help='the number of tasks (with --inputs: as many as inputs)')
    create.add_argument('--name', help='a name to recognise the run by')
    create.add_argument('--timeout', type=positive_int, metavar='SECONDS',
                        help='hand a task out again after this long without '
                             'a sign of life from its worker')
    create.add_argument('--max-attempts', type=positive_int, metavar='N',
                        help='mark a task failed when its lease runs out '
                             'after N hand-outs')
    create.add_argument('--retries', type=natural_int, metavar='R',
                        help='hand a failed task out again, up to R times')
    create.add_argument('--max-failures', type=positive_int, metavar='M',
                        help='stop handing out tasks once M tasks have failed')
    inputs = create.add_mutually_exclusive_group()
    inputs.add_argument('--inputs', metavar='FILE',
                        help='one task per line of FILE (- for stdin), the line its input')
    inputs.add_argument('--inputs-json', metavar='FILE',
                        help='one task per value of FILE, a JSON array or JSON lines')

    add('list', cmd_list, 'list your runs')

    info = add('info', cmd_info, "show a run's counts, progress, pace and ETA")
    info.add_argument('uuid')

    tasks = add('tasks', cmd_tasks, 'list the tasks of a run handed out or changed so far')
    tasks.add_argument('uuid')
    tasks.add_argument('--status', choices=STATUSES)
    tasks.add_argument('--format', choices=('table', 'csv', 'json'), default='table',
                       help='table (default), csv, or json (one task a line)')

    show = add('show', cmd_show, 'show one task with all its attempts and messages')
    show.add_argument('uuid')
    show.add_argument('task', type=natural_int, metavar='TASK')

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
                         help='all tasks, done ones too, with progress reset; with '
                              '--status or --tasks: reset the progress of those')
    restart.add_argument('--status', choices=STATUSES,
                         help='only the tasks in this status')
    restart.add_argument('--tasks', metavar='RANGES',
                         help='only these tasks, e.g. 3-5,9')

    delete = add('delete', cmd_delete, 'delete a run and all its tasks')
    delete.add_argument('uuid')

    work = add('work', cmd_work,
               'run COMMAND for each task of a run; {} in ARGS is the task number',
               WORK_EPILOG)
    work.usage = 'taskfarm work UUID [-j N|auto] [options] -- COMMAND [ARGS...]'
    work.add_argument('uuid')
    work.add_argument('-j', '--jobs', type=jobs_value, default=1, metavar='N',
                      help='tasks to run at a time (default 1; auto: one per core)')
    work.add_argument('--heartbeat', type=positive_float, metavar='S',
                      help="seconds between heartbeats (default: a third of "
                           "the run's timeout, at most 30)")
    work.add_argument('--time-limit', metavar='DURATION',
                      help='stop a command that runs longer (90s, 10m, 2h, 1h30m) '
                           'and report its task failed')
    work.add_argument('--final-exit', metavar='CODES',
                      help='exit codes (e.g. 2,42) that fail a task for good, '
                           'whatever retries the run allows')
    work.add_argument('--stdin', action='store_true',
                      help="feed the task's input to the command's stdin")
    work.add_argument('--stop-after', metavar='DURATION',
                      help='take no new task after this long (e.g. 23h30m), nor one '
                           'that would not end in time; finish the running ones, exit 0')
    work.add_argument('--stop-at', metavar='TIME',
                      help='the same at a time: 18:30, 2026-12-24T18:30 or @EPOCH')
    work.add_argument('--max-tasks', type=positive_int, metavar='N',
                      help='take at most N tasks')
    work.add_argument('--exit-when-idle', action='store_true',
                      help='stop at the first "nothing waiting", even while tasks of '
                           'other workers may still come back')
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
