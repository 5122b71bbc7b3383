"""Benchmark our taskfarm server against the original and a bare Falcon ceiling.

`make bench` runs this (issue 5). In one run on one machine it deploys, side
by side:

- ours: taskfarm.py on PostgreSQL and on sqlite, as users deploy it;
- the original: PyPI taskfarm 0.4.0 in a venv of its own under gunicorn with
  2 sync workers, on the same PostgreSQL (and on sqlite);
- the ceiling: a bare Falcon app answering a tiny JSON, served by waitress
  with the same processes and threads as ours.

It drives each with keep-alive HTTP clients from separate processes and
prints (and writes to .bench/last.md) hand-outs/s, worker cycles/s and
hand-out latency at several connection counts, how run status and hand-out
latency scale with the number of tasks handed out, the servers' peak memory,
and whether the issue's targets are met. Everything stays on 127.0.0.1 and
every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / '.bench'
LOG_DIR = BENCH_DIR / 'logs'
REPORT_PATH = BENCH_DIR / 'last.md'
HOST = '127.0.0.1'

PG_SERVER_URL = os.environ.get('BENCH_PG_URL', 'postgresql://root@127.0.0.1:5432')
OURS_DATABASE = 'bench_taskfarm'
ORIGINAL_DATABASE = 'bench_taskfarm_original'

BENCH_USER = 'bench'
BENCH_PASSWORD = 'bench-password'
BENCH_SECRET = 'bench-secret-not-for-production'

ORIGINAL_REQUIREMENTS = (
    'taskfarm==0.4.0',
    # The newest releases that still run taskfarm 0.4.0 on Python 3.11.
    'flask<2.2',
    'werkzeug<2.2',
    'flask-sqlalchemy<3',
    'sqlalchemy<2',
    'gunicorn',
    'psycopg2-binary',
)
ORIGINAL_GUNICORN_WORKERS = 2

CONNECTIONS = (1, 8, 32, 64)
HUGE_RUN = 10**9
SCALE_LEVELS = (10**4, 10**5, 10**6)
PROGRESS_STEPS = tuple(range(10, 101, 10))  # the 10 progress PUTs of a cycle

# The load generator runs in at most this many processes: the machine has 2
# cores, and a third client process would only take CPU from the server.
LOADGEN_PROCESSES = 2
WARMUP_SECONDS = 0.5
# Worker cycles take longer to settle: at 64 clients the original needs more
# than a second to hand out the first task to every client.
CYCLE_WARMUP_SECONDS = 1.5
# How long after its window a load process may take to give up its in-flight
# requests; bounds every load point even if a server hangs.
LOAD_GRACE_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 60.0
SCALE_SAMPLES = 20
# A simulated worker whose connections are refused this often in a row gives up.
MAX_CONNECT_FAILURES = 100

# --- the ceiling: a bare Falcon app --------------------------------------


def create_ceiling_app() -> Any:
    """A Falcon app that answers every request like a task server, doing nothing.

    It accepts the same requests the load generator sends (hand-out POSTs,
    progress PUTs), so the very same workloads measure what the framework and
    the HTTP server alone cost.
    """
    import falcon

    task_numbers = itertools.count()

    def answer(req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        if req.method == 'POST':
            resp.status = falcon.HTTP_201
            resp.media = {'id': 1, 'task': next(task_numbers),
                          'percentCompleted': 0.0, 'status': 'computing'}
        elif req.method in ('PUT', 'DELETE'):
            resp.status = falcon.HTTP_204
        else:
            resp.media = {'ok': True}

    app = falcon.App()
    app.add_sink(answer, prefix='/')
    return app


# --- load generator -------------------------------------------------------


class LoadError(Exception):
    """A response that a task client cannot use."""


def parse_response(buffer: bytearray, eof: bool) -> tuple[int, bytes, bool] | None:
    """Take one complete HTTP response off buffer: (status, body, keep_alive).

    None while the response is incomplete. Only what a task client needs:
    Content-Length bodies, bodyless statuses, and bodies that end at EOF.
    """
    head_end = buffer.find(b'\r\n\r\n')
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    status = int(head[9:12])
    body_start = head_end + 4
    length = header_int(head, b'content-length')
    if length is None:
        if b'\r\ntransfer-encoding:' in head:
            raise LoadError('chunked responses are not supported')
        if status in (204, 304) or status < 200:
            length = 0
        elif eof:
            length = len(buffer) - body_start
        else:
            return None
    if len(buffer) < body_start + length:
        return None
    body = bytes(buffer[body_start:body_start + length])
    del buffer[:body_start + length]
    keep_alive = b'\r\nconnection: close' not in head
    return status, body, keep_alive


def header_int(head: bytes, name: bytes) -> int | None:
    start = head.find(b'\r\n' + name + b':')
    if start < 0:
        return None
    value_start = start + len(name) + 3
    value_end = head.find(b'\r\n', value_start)
    return int(head[value_start:value_end if value_end >= 0 else None])


def http_request(method: str, path: str, port: int, auth: str,
                 body: dict | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request, as a worker client would send it."""
    lines = [f'{method} {path} HTTP/1.1', f'Host: {HOST}:{port}']
    if auth:
        lines.append(f'Authorization: {auth}')
    payload = b''
    if body is not None:
        payload = json.dumps(body).encode()
        lines.append('Content-Type: application/json')
    lines.append(f'Content-Length: {len(payload)}')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode() + payload


@dataclass(frozen=True)
class LoadSpec:
    """What the load generator sends; `handouts_per_connection` turns a timed
    window into a fixed amount of work (used to fill a run)."""

    port: int
    auth: str
    run_uuid: str
    workload: str  # 'handout' or 'cycle'
    duration: float
    warmup: float = WARMUP_SECONDS
    handouts_per_connection: int | None = None


@dataclass
class Recorder:
    """Counts what one load process did inside the measurement window."""

    window_start: float = 0.0
    window_end: float = 0.0
    handouts: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    handout_latencies: list[float] = field(default_factory=list)

    def running(self) -> bool:
        return time.monotonic() < self.window_end

    def in_window(self, at: float) -> bool:
        return self.window_start <= at < self.window_end

    def answered(self, started: float, finished: float, is_handout: bool) -> None:
        if self.in_window(finished):
            self.requests += 1
            if is_handout:
                self.handouts += 1
                self.handout_latencies.append(finished - started)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


class Handouts:
    """The hand-out workload: claim tasks one after another."""

    def __init__(self, spec: LoadSpec, worker_uuid: str) -> None:
        self.claim = http_request('POST', f'/api/runs/{spec.run_uuid}/task', spec.port,
                                  spec.auth, {'worker_uuid': worker_uuid})
        self.quota = spec.handouts_per_connection

    def wants_more(self) -> bool:
        return self.quota is None or self.quota > 0

    def request(self) -> bytes:
        return self.claim

    def answer(self, status: int, body: bytes, started: float, recorder: Recorder) -> None:
        if status != 201:
            recorder.error(f'hand-out answered {status}: {body[:200]!r}')
            if self.quota is not None:
                self.quota = 0  # a fill must not retry forever; the caller sees the error
            return
        recorder.answered(started, time.monotonic(), is_handout=True)
        if self.quota is not None:
            self.quota -= 1


PROGRESS_BODIES = [{'percentCompleted': percent} for percent in PROGRESS_STEPS]


class Cycles:
    """The worker workload: claim a task, report progress 10 times, mark it done."""

    def __init__(self, spec: LoadSpec, worker_uuid: str) -> None:
        self.spec = spec
        self.claim = http_request('POST', f'/api/runs/{spec.run_uuid}/task', spec.port,
                                  spec.auth, {'worker_uuid': worker_uuid})
        self.updates: list[bytes] = []  # the PUTs still to send for the current task

    def wants_more(self) -> bool:
        return True

    def request(self) -> bytes:
        return self.updates[0] if self.updates else self.claim

    def answer(self, status: int, body: bytes, started: float, recorder: Recorder) -> None:
        if not self.updates:
            self.claimed(status, body, started, recorder)
        elif status != 204:
            recorder.error(f'task update answered {status}: {body[:200]!r}')
            self.updates = []  # give the task up and claim another, as a worker would
        else:
            recorder.answered(started, time.monotonic(), is_handout=False)
            self.updates.pop(0)

    def claimed(self, status: int, body: bytes, started: float, recorder: Recorder) -> None:
        if status != 201:
            recorder.error(f'hand-out answered {status}: {body[:200]!r}')
            return
        recorder.answered(started, time.monotonic(), is_handout=True)
        try:
            path = f'/api/runs/{self.spec.run_uuid}/tasks/{json.loads(body)["task"]}'
        except (ValueError, KeyError, TypeError):
            recorder.error(f'hand-out answered {body[:200]!r}')
            return
        port, auth = self.spec.port, self.spec.auth
        self.updates = [http_request('PUT', path, port, auth, update)
                        for update in [*PROGRESS_BODIES, {'status': 'done'}]]


WORKLOADS = {'handout': Handouts, 'cycle': Cycles}


class Link(asyncio.Protocol):
    """One TCP connection of a simulated worker; hands complete responses to it."""

    def __init__(self, worker: SimulatedWorker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.deliver(eof=False)

    def eof_received(self) -> None:
        self.deliver(eof=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.lost(self)

    def deliver(self, eof: bool) -> None:
        try:
            response = parse_response(self.buffer, eof)
        except (LoadError, ValueError) as error:
            self.worker.failed(self, f'bad response: {error}')
            return
        if response is not None:
            self.worker.answered(self, *response)


class SimulatedWorker:
    """Sends its workload's requests one after another, as soon as each is
    answered, over a keep-alive connection that it reopens when the server
    closes it. Callbacks instead of a coroutine per request keep the load
    generator cheap enough not to be the bottleneck."""

    def __init__(self, workload: Handouts | Cycles, recorder: Recorder, port: int) -> None:
        self.workload = workload
        self.recorder = recorder
        self.port = port
        self.link: Link | None = None
        self.started = 0.0  # when the request in flight was sent; 0: none in flight
        self.sending = False
        self.connect_failures = 0
        self.finished = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.link = await loop.create_connection(lambda: Link(self), HOST, self.port)
        except OSError as error:
            self.recorder.error(f'cannot connect: {error}')
            self.connect_failures += 1
            if self.connect_failures < MAX_CONNECT_FAILURES and self.recorder.running():
                loop.create_task(self.connect())
            else:
                self.finish()
            return
        if self.sending:
            self.send()

    def start(self) -> None:
        self.sending = True
        if self.link is not None:
            self.send()

    def send(self) -> None:
        if not self.recorder.running() or not self.workload.wants_more():
            self.finish()
            return
        assert self.link is not None and self.link.transport is not None
        self.started = time.monotonic()
        self.link.transport.write(self.workload.request())

    def answered(self, link: Link, status: int, body: bytes, keep_alive: bool) -> None:
        started, self.started = self.started, 0.0
        self.workload.answer(status, body, started, self.recorder)
        if keep_alive:
            self.send()
        else:
            self.reconnect(link)

    def failed(self, link: Link, what: str) -> None:
        self.started = 0.0
        self.recorder.error(what)
        self.reconnect(link)

    def lost(self, link: Link) -> None:
        if link is self.link and self.started:
            self.failed(link, 'the server closed the connection during a request')

    def reconnect(self, link: Link) -> None:
        self.link = None
        if link.transport is not None:
            link.transport.close()
        if self.recorder.running() and self.workload.wants_more():
            asyncio.get_running_loop().create_task(self.connect())
        else:
            self.finish()

    def finish(self) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


def cpu_seconds_of_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(spec: LoadSpec, worker_uuids: Sequence[str], ready: Any, go: Any,
                start_at: Any) -> dict:
    recorder = Recorder()
    workers = [SimulatedWorker(WORKLOADS[spec.workload](spec, worker_uuid), recorder, spec.port)
               for worker_uuid in worker_uuids]
    # Connect before the window, so that the handshakes are not measured.
    await asyncio.gather(*(worker.connect() for worker in workers))
    ready.put(os.getpid())
    # Blocking the loop here is fine: nothing is in flight yet.
    if not go.wait(READY_TIMEOUT_SECONDS):
        return {'errors': 1, 'error_samples': ['no start signal']}
    recorder.window_start = start_at.value
    recorder.window_end = recorder.window_start + spec.duration
    cpu_at_start = cpu_seconds_of_self()
    for worker in workers:
        worker.start()
    deadline = recorder.window_end + LOAD_GRACE_SECONDS - time.monotonic()
    await asyncio.wait([worker.finished for worker in workers], timeout=deadline)
    for worker in workers:
        if not worker.finished.done():
            recorder.error('no answer before the deadline')
        worker.finish()
    return {
        'handouts': recorder.handouts, 'requests': recorder.requests, 'errors': recorder.errors,
        'error_samples': recorder.error_samples,
        'handout_latencies': recorder.handout_latencies,
        'cpu_seconds': cpu_seconds_of_self() - cpu_at_start,
    }


def load_process(spec: LoadSpec, worker_uuids: Sequence[str], ready: Any, go: Any,
                 start_at: Any, results: Any) -> None:
    try:
        result = asyncio.run(drive(spec, worker_uuids, ready, go, start_at))
    except Exception as error:  # noqa: BLE001 - the parent reports it; a silent death would hang it
        ready.put(os.getpid())
        result = {'errors': 1, 'error_samples': [f'load process failed: {error!r}']}
    results.put(result)


@dataclass
class LoadResult:
    duration: float
    handouts: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    handout_latencies: list[float] = field(default_factory=list)
    # Percentiles (ms) as wrk reports them, where wrk drove the load.
    reported_latency_ms: dict[float, float] = field(default_factory=dict)
    loadgen_cores: float = 0.0
    server_cores: float = 0.0
    postgres_cores: float = 0.0

    @property
    def handouts_per_s(self) -> float:
        return self.handouts / self.duration

    @property
    def cycles_per_s(self) -> float:
        """Answered cycle requests / 12: a cycle under way when the window
        closes counts in part, so that a slow server's figure does not hinge
        on whether its first cycles end inside a few seconds."""
        return self.requests / (len(PROGRESS_STEPS) + 2) / self.duration

    def latency_ms(self, quantile: float) -> float:
        if quantile in self.reported_latency_ms:
            return self.reported_latency_ms[quantile]
        if not self.handout_latencies:
            return float('nan')
        ordered = sorted(self.handout_latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    def add(self, part: dict) -> None:
        self.handouts += part.get('handouts', 0)
        self.requests += part.get('requests', 0)
        self.errors += part.get('errors', 0)
        self.error_samples += part.get('error_samples', [])
        self.handout_latencies += part.get('handout_latencies', [])
        self.loadgen_cores += part.get('cpu_seconds', 0.0) / self.duration


def run_load(spec: LoadSpec, worker_uuids: Sequence[str], server_pid: int) -> LoadResult:
    """Run the workload on one connection per worker, spread over processes."""
    context = multiprocessing.get_context('fork')
    ready, results = context.Queue(), context.Queue()
    go = context.Event()
    start_at = context.Value('d', 0.0)
    process_count = min(len(worker_uuids), LOADGEN_PROCESSES)
    shares = [worker_uuids[i::process_count] for i in range(process_count)]
    processes = [context.Process(target=load_process,
                                 args=(spec, share, ready, go, start_at, results))
                 for share in shares]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=READY_TIMEOUT_SECONDS)
    meter = CpuMeter(server_pid)
    start_at.value = time.monotonic() + spec.warmup
    go.set()
    result = LoadResult(duration=spec.duration)
    wait = spec.warmup + spec.duration + LOAD_GRACE_SECONDS + READY_TIMEOUT_SECONDS
    for _ in processes:
        result.add(results.get(timeout=wait))
    result.server_cores, result.postgres_cores = meter.cores()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    return result


# --- wrk: the hand-out load, where Debian's wrk is at hand --------------------
#
# The hand-out is stateless, so wrk can send it. wrk costs the machine less CPU
# per request than any Python client, which matters for the ceiling: the
# Python generator measures the bare Falcon app about a third lower (it does
# not limit ours or the original, where both tools agree).

WRK_SCRIPT = """-- Written by bench.py: each wrk thread hands out tasks to a worker of its own.
local path, auth = "{path}", "{auth}"
local threads = 0

function setup(thread)
    thread:set("worker", string.format("bench-worker-%03d", threads))
    threads = threads + 1
end

function init(args)
    local headers = {{["Content-Type"] = "application/json"}}
    if auth ~= "" then headers["Authorization"] = auth end
    claim = wrk.format("POST", path, headers, '{{"worker_uuid": "' .. worker .. '"}}')
end

function request()
    return claim
end
"""
WRK_TOTAL = re.compile(r'(\d+) requests in ([\d.]+)(us|ms|s|m)\b')
WRK_PERCENTILE = re.compile(r'^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$', re.MULTILINE)
WRK_NON_2XX = re.compile(r'Non-2xx or 3xx responses: (\d+)')
WRK_SOCKET_ERRORS = re.compile(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)')
SECONDS_PER_UNIT = {'us': 1e-6, 'ms': 1e-3, 's': 1.0, 'm': 60.0}


def ensure_wrk() -> bool:
    """wrk on PATH, installed from Debian if need be and possible."""
    if shutil.which('wrk'):
        return True
    if os.geteuid() != 0 or not shutil.which('apt-get'):
        return False
    print('Installing wrk from Debian...', flush=True)
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    install = ['apt-get', 'install', '-y', '-q', 'wrk']
    for attempt in ([install], [['apt-get', 'update', '-q'], install]):
        if all(subprocess.run(command, env=env, capture_output=True, timeout=600,
                              check=False).returncode == 0 for command in attempt):
            break
    return shutil.which('wrk') is not None


def run_handouts_with_wrk(server: Server, run_uuid: str, connections: int,
                          duration: float) -> LoadResult:
    script = BENCH_DIR / 'handout.lua'
    script.write_text(WRK_SCRIPT.format(path=f'/api/runs/{run_uuid}/task', auth=server.auth))
    command = ['wrk', '-t', str(min(connections, LOADGEN_PROCESSES)), '-c', str(connections),
               '-d', f'{duration:g}s', '--timeout', '30s', '--latency', '-s', str(script),
               f'http://{HOST}:{server.port}/']
    meter = CpuMeter(server.pid)
    children_before = cpu_seconds_of_children()
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f'wrk failed ({done.returncode}): {done.stderr[-2000:]}')
    result = parse_wrk(done.stdout)
    result.server_cores, result.postgres_cores = meter.cores()
    result.loadgen_cores = (cpu_seconds_of_children() - children_before) / result.duration
    return result


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_wrk(output: str) -> LoadResult:
    total = WRK_TOTAL.search(output)
    if total is None:
        raise RuntimeError(f'cannot read wrk\'s output:\n{output[-2000:]}')
    requests = int(total.group(1))
    result = LoadResult(duration=float(total.group(2)) * SECONDS_PER_UNIT[total.group(3)])
    failed = int(non_2xx.group(1)) if (non_2xx := WRK_NON_2XX.search(output)) else 0
    socket_errors = WRK_SOCKET_ERRORS.search(output)
    result.handouts = result.requests = requests - failed
    result.errors = failed + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    if result.errors:
        result.error_samples.append(f'wrk: {failed} non-2xx answers; '
                                    f'{socket_errors.group(0) if socket_errors else ""}')
    for percent, value, unit in WRK_PERCENTILE.findall(output):
        result.reported_latency_ms[int(percent) / 100] = \
            float(value) * SECONDS_PER_UNIT[unit] * 1000
    return result


# --- processes: CPU and memory from /proc ----------------------------------


CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    # The command name may contain spaces; fields after it are fixed.
    return [text[:text.index(' ')], text[text.index('(') + 1:text.rindex(')')]] + \
        text[text.rindex(')') + 2:].split()


def all_stats() -> Iterator[tuple[int, list[str]]]:
    for entry in os.listdir('/proc'):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            yield int(entry), stat


def process_tree(root: int) -> list[int]:
    parents = {pid: int(stat[3]) for pid, stat in all_stats()}
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return [pid for pid in tree if pid in parents]


def cpu_of(stat: list[str]) -> float:
    return (int(stat[13]) + int(stat[14])) / CLOCK_TICKS


def server_cpu(root: int) -> dict[int, float]:
    return {pid: cpu_of(stat) for pid in process_tree(root) if (stat := proc_stat(pid))}


def postgres_cpu() -> dict[int, float]:
    return {pid: cpu_of(stat) for pid, stat in all_stats() if stat[1] == 'postgres'}


class CpuMeter:
    """How many cores the server's processes and PostgreSQL's used from now
    on: tells whether a server ran out of CPU or waited on something else."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.started = time.monotonic()
        self.server_before = server_cpu(server_pid)
        self.postgres_before = postgres_cpu()

    def cores(self) -> tuple[float, float]:
        elapsed = time.monotonic() - self.started
        return (used_since(self.server_before, server_cpu(self.server_pid)) / elapsed,
                used_since(self.postgres_before, postgres_cpu()) / elapsed)


def used_since(before: dict[int, float], after: dict[int, float]) -> float:
    # Per process, so that a backend that exited does not count as negative.
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def peak_rss_kib(root: int) -> tuple[int, int]:
    """Sum of VmHWM over the process tree, and how many processes it has."""
    total, pids = 0, process_tree(root)
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f'/proc/{pid}/status').read_text().splitlines():
                if line.startswith('VmHWM:'):
                    total += int(line.split()[1])
    return total, len(pids)


# --- deployments ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def run_checked(command: Sequence[str], env: dict | None = None, what: str = '',
                cwd: Path = REPO_ROOT) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'{what or command[0]} failed ({done.returncode}):\n'
                           f'{done.stdout[-2000:]}{done.stderr[-2000:]}')


def basic_auth(user: str, password: str) -> str:
    return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


@dataclass
class Server:
    """One deployment under test."""

    name: str  # short key, e.g. 'ours-pg'
    label: str  # what the table shows
    kind: str  # 'ours', 'original' or 'ceiling'
    backend: str  # 'pg', 'sqlite' or '' for the ceiling
    command: list[str]
    env: dict[str, str]
    settings: str
    database_url: str = ''
    port: int = field(default_factory=free_port)
    cwd: Path = REPO_ROOT
    process: subprocess.Popen | None = None
    auth: str = ''
    fill: Callable[[Server, dict, int, int], None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class Api:
    """A keep-alive JSON client for setting things up and timing single requests."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.connection = http.client.HTTPConnection(HOST, server.port, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None,
             auth: str | None = None) -> tuple[int, Any]:
        headers = {'Authorization': self.server.auth if auth is None else auth}
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers['Content-Type'] = 'application/json'
        self.connection.request(method, path, payload, headers)
        response = self.connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b'{') else data

    def expect(self, status: int, method: str, path: str, body: dict | None = None,
               auth: str | None = None) -> Any:
        got, answer = self.call(method, path, body, auth)
        if got != status:
            raise RuntimeError(f'{self.server.label}: {method} {path} answered {got}, '
                               f'not {status}: {answer!r}')
        return answer

    def timed(self, method: str, path: str, body: dict | None, status: int) -> float:
        started = time.perf_counter()
        self.expect(status, method, path, body)
        return time.perf_counter() - started

    def close(self) -> None:
        self.connection.close()


def start_server(server: Server) -> None:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f'{server.name}.log', 'w') as log:
        # A session of its own, so that stopping it reaches its worker processes.
        server.process = subprocess.Popen(server.command, env=server.env, cwd=server.cwd,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
    wait_until_serving(server)


def wait_until_serving(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            break
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection(HOST, server.port, timeout=2)
            connection.request('GET', '/')
            if connection.getresponse().status == 200:
                return
        with contextlib.suppress(subprocess.TimeoutExpired):
            # Waiting on the process doubles as the poll interval.
            server.process.wait(timeout=0.1)
    tail = (LOG_DIR / f'{server.name}.log').read_text()[-3000:]
    raise RuntimeError(f'{server.label} did not start on port {server.port}:\n{tail}')


def stop_server(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=15)


def log_in(server: Server) -> None:
    """Use a token, as the taskfarm-worker client does."""
    if server.kind == 'ceiling':
        return
    api = Api(server)
    answer = api.expect(200, 'GET', '/api/token', auth=basic_auth(BENCH_USER, BENCH_PASSWORD))
    server.auth = basic_auth(answer['token'], '')
    api.close()


def worker_uuids(count: int) -> list[str]:
    return [f'bench-worker-{i:03d}' for i in range(count)]


def register_workers(server: Server, count: int) -> None:
    if server.kind == 'ceiling':
        return
    api = Api(server)
    for worker_uuid in worker_uuids(count):
        api.expect(201, 'POST', '/api/worker',
                   {'uuid': worker_uuid, 'hostname': 'bench', 'pid': 1})
    api.close()


# --- databases ------------------------------------------------------------


def postgres_admin() -> Any:
    import psycopg

    try:
        return psycopg.connect(f'{PG_SERVER_URL}/postgres', autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        start_postgres()
        return psycopg.connect(f'{PG_SERVER_URL}/postgres', autocommit=True, connect_timeout=30)


def start_postgres() -> None:
    versions = os.listdir('/etc/postgresql') if os.path.isdir('/etc/postgresql') else []
    if not versions or not shutil.which('pg_ctlcluster'):
        raise RuntimeError(f'PostgreSQL is not answering at {PG_SERVER_URL}')
    run_checked(['pg_ctlcluster', '--skip-systemctl-redirect', versions[0], 'main', 'start'],
                what='starting PostgreSQL')


def recreate_database(name: str) -> str:
    with postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
        admin.execute(f'CREATE DATABASE {name}')
    return f'{PG_SERVER_URL}/{name}'


def drop_database(name: str) -> None:
    with postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def fresh_sqlite_path(name: str) -> Path:
    path = BENCH_DIR / f'{name}.sqlite'
    for leftover in BENCH_DIR.glob(f'{name}.sqlite*'):
        leftover.unlink()
    return path


# --- the three kinds of server ---------------------------------------------


def server_environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != 'VIRTUAL_ENV'}
    env.update(extra)
    return env


def help_text(command: Sequence[str]) -> str:
    done = subprocess.run([*command, '--help'], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout


OURS_SCRIPT = REPO_ROOT / 'taskfarm.py'


def ours_workers(wanted: int) -> int:
    """How many processes ours will run: `--workers` is passed only if
    taskfarm.py offers it, so the bench runs against every version of it."""
    if not OURS_SCRIPT.exists() or '--workers' in help_text([sys.executable, str(OURS_SCRIPT)]):
        return wanted
    return 1


def ours_command(port: int, threads: int, workers: int) -> list[str]:
    command = [sys.executable, str(OURS_SCRIPT), '--host', HOST, '--port', str(port),
               '--threads', str(threads)]
    return command + ['--workers', str(workers)] if workers > 1 else command


def prepare_ours(backend: str, threads: int, workers: int, fill_mode: str) -> Server:
    if backend == 'pg':
        database_url = recreate_database(OURS_DATABASE)
    else:
        database_url = f'sqlite:///{fresh_sqlite_path("ours")}'
    env = server_environment(DATABASE_URL=database_url, TASKFARM_SECRET=BENCH_SECRET)
    run_checked([sys.executable, str(REPO_ROOT / 'admin.py'), 'init-db'], env, 'admin.py init-db')
    run_checked([sys.executable, str(REPO_ROOT / 'admin.py'), 'adduser', BENCH_USER,
                 '--password', BENCH_PASSWORD],
                env, 'admin.py adduser')
    port = free_port()
    command = ours_command(port, threads, workers)
    settings = f'taskfarm.py, waitress, {workers} process(es) × {threads} threads'
    backend_name = 'PostgreSQL' if backend == 'pg' else 'sqlite'
    fill = fill_via_api if fill_mode == 'api' else fill_ours_via_sql
    return Server(f'ours-{backend}', f'ours ({backend_name})', 'ours', backend, command, env,
                  settings, database_url, port, fill=fill)


def original_venv() -> Path:
    """The original server's own venv, built once and reused while its pins hold."""
    venv = BENCH_DIR / 'original'
    marker = venv / 'bench-requirements.txt'
    wanted = '\n'.join(ORIGINAL_REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    run_checked([sys.executable, '-m', 'venv', str(venv)], what='creating the original venv')
    run_checked([str(venv / 'bin' / 'pip'), 'install', '--quiet', *ORIGINAL_REQUIREMENTS],
                what='installing taskfarm 0.4.0')
    marker.write_text(wanted)
    return venv


def prepare_original(backend: str) -> Server:
    venv_bin = original_venv() / 'bin'
    if backend == 'pg':
        database_url = recreate_database(ORIGINAL_DATABASE)
    else:
        # SQLAlchemy spells an absolute path with four slashes.
        database_url = f'sqlite:///{fresh_sqlite_path("original")}'
    env = server_environment(DATABASE_URL=database_url, SECRET_KEY=BENCH_SECRET,
                             PYTHONWARNINGS='ignore')
    # Run it away from this folder: here `import taskfarm` would find ours.
    elsewhere = BENCH_DIR
    run_checked([str(venv_bin / 'adminTF'), '--init-db'], env, 'adminTF --init-db', elsewhere)
    run_checked([str(venv_bin / 'adminTF'), '-u', BENCH_USER, '-p', BENCH_PASSWORD],
                env, 'adminTF -u', elsewhere)
    port = free_port()
    command = [str(venv_bin / 'gunicorn'), '-w', str(ORIGINAL_GUNICORN_WORKERS),
               '-b', f'{HOST}:{port}', 'taskfarm:app']
    if '--no-control-socket' in help_text([str(venv_bin / 'gunicorn')]):
        # Newer gunicorns open a control socket at one fixed path in $HOME,
        # which two of them running side by side would fight over.
        command.append('--no-control-socket')
    backend_name = 'PostgreSQL' if backend == 'pg' else 'sqlite'
    fill = fill_original_via_sql if backend == 'pg' else fill_via_api
    return Server(f'original-{backend}', f'original ({backend_name})', 'original', backend,
                  command, env, f'taskfarm 0.4.0, gunicorn, {ORIGINAL_GUNICORN_WORKERS} sync workers',
                  database_url, port, cwd=elsewhere, fill=fill)


def prepare_ceiling(threads: int, workers: int) -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), 'serve-ceiling',
               '--port', str(port), '--threads', str(threads), '--workers', str(workers)]
    return Server('ceiling', 'ceiling (bare Falcon)', 'ceiling', '', command,
                  server_environment(), f'bare Falcon, waitress, {workers} process(es) × {threads} threads',
                  port=port)


# --- filling a run: N tasks handed out ---------------------------------------


def fill_via_api(server: Server, run: dict, handed_out: int, target: int) -> None:
    """Hand out tasks through the server itself until at least `target` are
    handed out (each connection does its share, rounded up)."""
    connections = CONNECTIONS[-1]
    per_connection = -(-(target - handed_out) // connections)
    spec = LoadSpec(server.port, server.auth, run['uuid'], 'handout', duration=3600.0,
                    warmup=0.0, handouts_per_connection=per_connection)
    result = run_load(spec, worker_uuids(connections), server.pid)
    if result.errors:
        raise RuntimeError(f'filling {server.label} failed: {result.error_samples[:3]}')


ORIGINAL_FILL = """
    INSERT INTO tasks (task, status, started, "percentCompleted", run_id, worker_id)
    SELECT n, 'computing', now(), 0, %(run_id)s, %(worker_id)s
    FROM generate_series(%(first)s, %(stop)s - 1) AS n
"""
ORIGINAL_ADVANCE = 'UPDATE runs SET "nextTask" = %(stop)s WHERE id = %(run_id)s'
ORIGINAL_WORKER_ID = 'SELECT id FROM workers WHERE uuid = %(uuid)s'


def fill_original_via_sql(server: Server, run: dict, handed_out: int, target: int) -> None:
    """Write the rows the original's own hand-out would write (its schema is fixed)."""
    import psycopg

    with psycopg.connect(server.database_url) as db:
        worker_id = db.execute(ORIGINAL_WORKER_ID, {'uuid': worker_uuids(1)[0]}).fetchone()[0]
        values = {'run_id': run['id'], 'worker_id': worker_id, 'first': handed_out, 'stop': target}
        db.execute(ORIGINAL_FILL, values)
        db.execute(ORIGINAL_ADVANCE, values)
        # Autovacuum would have analysed a table that grew this much by now.
        db.execute('ANALYZE tasks')


# Ours: the task rows that hand-outs of tasks `first` to `stop` - 1 of a run
# without timeout leave behind, written by one statement. The run's counts
# then come from the schema's own triggers, and its frontier from the
# server's own ADVANCE_FRONTIER, so the fill follows schema.sql as it
# changes; fill_check() then asks the server whether it sees that state.
OURS_FILL = {
    'postgresql': """
        INSERT INTO tasks (run_id, task, status, worker_id, attempts, started, updated)
        SELECT :run_id, n, 'computing', :worker_id, 1, :now, :now
        FROM generate_series(CAST(:first AS integer), :stop - 1) AS n
    """,
    'sqlite': """
        WITH RECURSIVE numbers(n) AS (
            SELECT :first UNION ALL SELECT n + 1 FROM numbers WHERE n + 1 < :stop
        )
        INSERT INTO tasks (run_id, task, status, worker_id, attempts, started, updated)
        SELECT :run_id, n, 'computing', :worker_id, 1, :now, :now FROM numbers
    """,
}
WORKER_ID = 'SELECT id FROM workers WHERE uuid = :uuid'


def fill_ours_via_sql(server: Server, run: dict, handed_out: int, target: int) -> None:
    # Through the server's own database layer, which speaks both dialects.
    import taskfarm

    db = taskfarm.open_database(taskfarm.Config(database_url=server.database_url))
    try:
        with db.transaction() as tx:
            worker = tx.one(WORKER_ID, {'uuid': worker_uuids(1)[0]})
            values = {'run_id': run['id'], 'worker_id': worker['id'], 'first': handed_out,
                      'stop': target, 'count': target, 'now': time.time()}
            tx.execute(OURS_FILL[db.dialect], values)
            tx.execute(taskfarm.ADVANCE_FRONTIER, values)
        if db.dialect == 'postgresql':
            # As autovacuum would after such growth. Not on sqlite: nothing
            # runs ANALYZE on a deployed one, and it changes sqlite's plans.
            db.execute('ANALYZE tasks')
    finally:
        db.close()
    fill_check(server, run, target)


def fill_check(server: Server, run: dict, handed_out: int) -> None:
    """The server must report exactly the state that the fill wrote."""
    api = Api(server)
    status = api.expect(200, 'GET', f'/api/runs/{run["uuid"]}')
    api.close()
    expected = {'numComputing': handed_out, 'numDone': 0,
                'numWaiting': run['numTasks'] - handed_out}
    seen = {key: status.get(key) for key in expected}
    if seen != expected:
        raise RuntimeError(f'{server.label}: after filling, the run shows {seen}, '
                           f'not {expected}: the fill no longer matches the schema')


# --- measurements -----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration: float
    repeats: int
    connections: tuple[int, ...]
    threads: int
    workers: int
    fill: str  # 'sql' or 'api': how the scale measurement hands out 10^6 tasks
    loadgen: str  # what drives the hand-out load: 'wrk' or 'python'


def create_run(server: Server, num_tasks: int = HUGE_RUN) -> dict:
    if server.kind == 'ceiling':
        return {'id': 0, 'uuid': '0' * 32, 'numTasks': num_tasks}
    api = Api(server)
    run = api.expect(201, 'POST', '/api/run', {'numTasks': num_tasks})
    api.close()
    return run


def delete_run(server: Server, run: dict) -> None:
    """Best effort: the original fails a delete that races with a hand-out the
    load left in its queue, and a leftover run only costs some table rows."""
    if server.kind == 'ceiling':
        return
    api = Api(server)
    status, _ = api.call('DELETE', f'/api/runs/{run["uuid"]}')
    api.close()
    if status != 204:
        print(f'  note: {server.label} answered {status} to deleting run {run["uuid"]}; '
              'it stays', flush=True)


def measure_point(server: Server, workload: str, connections: int,
                  settings: Settings) -> LoadResult:
    """One timed load on a fresh run, deleted afterwards so that every point
    starts from the same, small tables."""
    run = create_run(server)
    if workload == 'handout' and settings.loadgen == 'wrk':
        result = run_handouts_with_wrk(server, run['uuid'], connections, settings.duration)
    else:
        warmup = CYCLE_WARMUP_SECONDS if workload == 'cycle' else WARMUP_SECONDS
        spec = LoadSpec(server.port, server.auth, run['uuid'], workload, settings.duration, warmup)
        result = run_load(spec, worker_uuids(connections), server.pid)
    delete_run(server, run)
    return result


def measure_throughput(servers: Sequence[Server], settings: Settings
                       ) -> dict[tuple[str, str, int], list[LoadResult]]:
    """Every point of every server, repeats interleaved so that a noisy
    minute on the machine hurts all servers alike."""
    results: dict[tuple[str, str, int], list[LoadResult]] = {}
    for repeat in range(settings.repeats):
        for connections in settings.connections:
            for server in servers:
                for workload in WORKLOADS:
                    result = measure_point(server, workload, connections, settings)
                    results.setdefault((server.name, workload, connections), []).append(result)
                    log_point(repeat, server, workload, connections, result)
    return results


def log_point(repeat: int, server: Server, workload: str, connections: int,
              result: LoadResult) -> None:
    rate = result.handouts_per_s if workload == 'handout' else result.cycles_per_s
    print(f'  [{repeat + 1}] {server.name:13} {workload:7} c={connections:<3} '
          f'{rate:8.1f}/s  p99 {result.latency_ms(0.99):7.1f} ms  errors {result.errors}  '
          f'cores: server {result.server_cores:.2f} postgres {result.postgres_cores:.2f} '
          f'loadgen {result.loadgen_cores:.2f}', flush=True)
    for sample in result.error_samples[:2]:
        print(f'      error: {sample}', flush=True)


def median_of(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float('nan')


def time_requests(server: Server, method: str, path: str, body: dict | None,
                  status: int, repeats: int) -> float:
    """Median over repeats of the median latency (ms) of one request, sent in sequence."""
    api = Api(server)
    for _ in range(3):  # untimed: the connection and the statements warm up
        api.timed(method, path, body, status)
    medians = [median_of([api.timed(method, path, body, status) for _ in range(SCALE_SAMPLES)])
               for _ in range(repeats)]
    api.close()
    return 1000 * median_of(medians)


def measure_run_creation(server: Server, repeats: int) -> dict[str, float]:
    figures = {}
    for num_tasks in (10, HUGE_RUN):
        figures[f'create {num_tasks}'] = time_requests(
            server, 'POST', '/api/run', {'numTasks': num_tasks}, 201, repeats)
    return figures


def measure_scale_or_say_why(server: Server, repeats: int) -> dict[str, float]:
    """A failed scale measurement (say, a fill that no longer matches the
    schema) must not throw away the throughput figures measured before it."""
    try:
        return measure_scale(server, repeats)
    except Exception as error:  # noqa: BLE001 - reported, and the table says "–"
        print(f'  scale of {server.label} failed: {error}', flush=True)
        return {}


def handed_out_so_far(server: Server, run: dict) -> int:
    """Every task of the scale run that was handed out is still computing."""
    api = Api(server)
    count = api.expect(200, 'GET', f'/api/runs/{run["uuid"]}?info=numComputing')
    api.close()
    return count['numComputing']


def settle_database(server: Server) -> None:
    """Vacuum what the throughput phase deleted, as autovacuum would in time,
    so that the scale figures do not hinge on when autovacuum happens to run."""
    if server.backend != 'pg':
        return
    import psycopg

    with psycopg.connect(server.database_url, autocommit=True) as db:
        db.execute('VACUUM ANALYZE')


def measure_scale(server: Server, repeats: int) -> dict[str, float]:
    """Run status and hand-out latency after 10^4, 10^5 and 10^6 tasks handed out."""
    assert server.fill is not None
    settle_database(server)
    figures = measure_run_creation(server, repeats)
    run = create_run(server)
    for level in SCALE_LEVELS:
        started = time.monotonic()
        server.fill(server, run, handed_out_so_far(server, run), level)
        print(f'  {server.name}: {level} handed out in {time.monotonic() - started:.1f} s',
              flush=True)
        figures[f'status {level}'] = time_requests(
            server, 'GET', f'/api/runs/{run["uuid"]}', None, 200, repeats)
        figures[f'handout {level}'] = time_requests(
            server, 'POST', f'/api/runs/{run["uuid"]}/task',
            {'worker_uuid': worker_uuids(1)[0]}, 201, repeats)
    return figures


# --- the report ---------------------------------------------------------------


@dataclass
class Figures:
    """The medians of one server at one connection count."""

    handouts: float
    cycles: float
    p50: float
    p99: float
    errors: int


def summarise(results: dict[tuple[str, str, int], list[LoadResult]]
              ) -> dict[tuple[str, int], Figures]:
    figures = {}
    for name, connections in {(name, c) for name, _, c in results}:
        handout = results.get((name, 'handout', connections), [])
        cycle = results.get((name, 'cycle', connections), [])
        figures[name, connections] = Figures(
            handouts=median_of([r.handouts_per_s for r in handout]),
            cycles=median_of([r.cycles_per_s for r in cycle]),
            p50=median_of([r.latency_ms(0.50) for r in handout]),
            p99=median_of([r.latency_ms(0.99) for r in handout]),
            errors=sum(r.errors for r in handout + cycle),
        )
    return figures


def measured(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def ratio(value: float, reference: float | None) -> str:
    if not measured(reference) or not reference or not measured(value):
        return '–'
    return f'{value / reference:.2f}×' if value / reference < 10 else f'{value / reference:.0f}×'


def original_of(server: Server) -> str:
    return 'original-sqlite' if server.backend == 'sqlite' else 'original-pg'


THROUGHPUT_HEADER = ('| server | conns | hand-outs/s | ×orig | ×ceil | p50 ms | p99 ms '
                     '| p99 ×orig | cycles/s | ×orig | ×ceil | errors |')


def throughput_table(servers: Sequence[Server], figures: dict[tuple[str, int], Figures],
                     connections: Sequence[int]) -> list[str]:
    lines = [THROUGHPUT_HEADER, '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|']
    for server in servers:
        for c in connections:
            f = figures.get((server.name, c))
            if f is None:
                continue
            orig = figures.get((original_of(server), c))
            if orig is not None and orig.errors:
                orig = None  # a ratio to a point where the original failed means nothing
            ceil = figures.get(('ceiling', c))
            lines.append(
                f'| {server.label} | {c} | {f.handouts:.0f} | {ratio(f.handouts, orig and orig.handouts)} '
                f'| {ratio(f.handouts, ceil and ceil.handouts)} | {f.p50:.1f} | {f.p99:.1f} '
                f'| {ratio(f.p99, orig and orig.p99)} | {f.cycles:.1f} '
                f'| {ratio(f.cycles, orig and orig.cycles)} | {ratio(f.cycles, ceil and ceil.cycles)} '
                f'| {f.errors} |')
    return lines


SCALE_INTRO = ('Latency in ms, median of sequential requests on one connection. '
               'Columns 10^k: after 10^k tasks of one run have been handed out.')


def scale_table(scale: dict[str, dict[str, float]], servers: Sequence[Server]) -> list[str]:
    levels = ' | '.join(f'10^{len(str(n)) - 1}' for n in SCALE_LEVELS)
    header = (f'| server | create run of 10 | create run of 10^9 | status {levels} '
              f'| hand-out {levels} |')
    lines = [SCALE_INTRO, '', header, '|---|--:|--:|' + '--:|' * (2 * len(SCALE_LEVELS))]
    for server in servers:
        if server.name not in scale:
            continue
        s = scale[server.name]
        cells = [s.get('create 10'), s.get(f'create {HUGE_RUN}')]
        cells += [s.get(f'status {n}') for n in SCALE_LEVELS]
        cells += [s.get(f'handout {n}') for n in SCALE_LEVELS]
        lines.append(f'| {server.label} | ' + ' | '.join(
            '–' if v is None else f'{v:.1f}' for v in cells) + ' |')
    return lines


def memory_table(memory: dict[str, tuple[int, int]], servers: Sequence[Server]) -> list[str]:
    lines = ['| server | processes | peak RSS (sum of VmHWM) MiB |', '|---|--:|--:|']
    for server in servers:
        if server.name in memory:
            kib, count = memory[server.name]
            lines.append(f'| {server.label} | {count} | {kib / 1024:.0f} |')
    return lines


@dataclass
class Target:
    text: str
    value: float | None
    limit: float
    at_most: bool = False

    def verdict(self) -> str:
        if not measured(self.value):
            return 'not measured'
        met = self.value <= self.limit if self.at_most else self.value >= self.limit
        return 'met' if met else 'NOT MET'

    def line(self) -> str:
        shown = f'{self.value:.2f}' if measured(self.value) else '–'
        sign = '≤' if self.at_most else '≥'
        return f'- **{self.verdict()}**: {self.text}: {shown} ({sign} {self.limit:g})'


def divide(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def figure(figures: dict[tuple[str, int], Figures], name: str, connections: int,
           attribute: str) -> float | None:
    f = figures.get((name, connections))
    return getattr(f, attribute) if f is not None else None


def best_handouts(figures: dict[tuple[str, int], Figures], name: str) -> float | None:
    rates = [f.handouts for (n, _), f in figures.items() if n == name]
    return max(rates) if rates else None


def targets(figures: dict[tuple[str, int], Figures], scale: dict[str, dict[str, float]]
            ) -> list[Target]:
    def get(name: str, c: int, attribute: str) -> float | None:
        return figure(figures, name, c, attribute)

    ours_scale, low, high = scale.get('ours-pg', {}), SCALE_LEVELS[0], SCALE_LEVELS[-1]
    sqlite_errors = get('ours-sqlite', 64, 'errors')
    return [
        Target('PostgreSQL hand-outs/s at 32 connections vs the original',
               divide(get('ours-pg', 32, 'handouts'), get('original-pg', 32, 'handouts')), 10),
        Target('PostgreSQL hand-outs/s at 32 connections vs the ceiling',
               divide(get('ours-pg', 32, 'handouts'), get('ceiling', 32, 'handouts')), 0.5),
        Target('PostgreSQL worker cycles/s at 64 clients vs the original',
               divide(get('ours-pg', 64, 'cycles'), get('original-pg', 64, 'cycles')), 10),
        Target('PostgreSQL hand-out p99 at 64 connections vs the original',
               divide(get('ours-pg', 64, 'p99'), get('original-pg', 64, 'p99')), 1 / 8,
               at_most=True),
        Target('PostgreSQL run status latency at 10^6 handed out vs at 10^4',
               divide(ours_scale.get(f'status {high}'), ours_scale.get(f'status {low}')), 1.5,
               at_most=True),
        Target('PostgreSQL hand-out latency at 10^6 handed out vs at 10^4',
               divide(ours_scale.get(f'handout {high}'), ours_scale.get(f'handout {low}')), 1.5,
               at_most=True),
        Target('sqlite errors at 64 connections', sqlite_errors, 0, at_most=True),
        Target("sqlite best hand-outs/s vs the original's best sqlite figure",
               divide(best_handouts(figures, 'ours-sqlite'),
                      best_handouts(figures, 'original-sqlite')), 10),
    ]


LOADGENS = {
    'wrk': f'hand-outs sent by wrk ({LOADGEN_PROCESSES} threads), worker cycles by the Python '
           f'load generator ({LOADGEN_PROCESSES} processes)',
    'python': f'the Python load generator ({LOADGEN_PROCESSES} processes)',
}
RATIO_NOTE = ('×orig compares with the original on the same database (the ceiling with the '
              'original on PostgreSQL), and shows – where the original answered errors; '
              'for p99 lower is better. Errors: non-2xx answers and failed connections, '
              'summed over the repeats.')


def report(servers: Sequence[Server], settings: Settings,
           figures: dict[tuple[str, int], Figures], scale: dict[str, dict[str, float]],
           memory: dict[str, tuple[int, int]]) -> str:
    method = (f'Machine: {os.cpu_count()} cores, Python {platform.python_version()}, '
              f'{platform.system()} {platform.release()}. Load: {LOADGENS[settings.loadgen]}, '
              f'one keep-alive connection per simulated worker; each point runs '
              f'{settings.duration:g} s (the Python generator after a {WARMUP_SECONDS:g} s '
              f'warm-up, {CYCLE_WARMUP_SECONDS:g} s for cycles) on a fresh run of 10^9 tasks; '
              f'figures are the median of {settings.repeats} repeats. A worker cycle is a '
              f'hand-out, {len(PROGRESS_STEPS)} progress PUTs and a PUT of status done; '
              f'cycles/s counts answered cycle requests / {len(PROGRESS_STEPS) + 2}.')
    lines = [f'# Taskfarm benchmark, {time.strftime("%Y-%m-%d %H:%M %Z")}', '', method, '']
    lines += [f'- {server.label}: {server.settings}' for server in servers]
    lines += ['', '## Hand-outs and worker cycles', '', RATIO_NOTE, '']
    lines += throughput_table(servers, figures, settings.connections)
    if scale:
        lines += ['', '## Scale', ''] + scale_table(scale, servers)
    lines += ['', '## Peak memory', ''] + memory_table(memory, servers)
    lines += ['', '## Targets (issue 5)', '']
    lines += [target.line() for target in targets(figures, scale)]
    return '\n'.join(lines) + '\n'


# --- main ---------------------------------------------------------------------


def prepare_servers(names: Sequence[str], settings: Settings) -> list[Server]:
    # The ceiling runs exactly as many processes and threads as ours does.
    workers = ours_workers(settings.workers)
    preparers = {
        'ours-pg': lambda: prepare_ours('pg', settings.threads, workers, settings.fill),
        # sqlite has one writer: one process, as the README deploys it.
        'ours-sqlite': lambda: prepare_ours('sqlite', settings.threads, 1, settings.fill),
        'original-pg': lambda: prepare_original('pg'),
        'original-sqlite': lambda: prepare_original('sqlite'),
        'ceiling': lambda: prepare_ceiling(settings.threads, workers),
    }
    return [preparers[name]() for name in names]


def bench(names: Sequence[str], settings: Settings, scale_names: Sequence[str]) -> str:
    servers: list[Server] = []
    try:
        print('Preparing servers...', flush=True)
        servers = prepare_servers(names, settings)
        for server in servers:
            start_server(server)
            log_in(server)
            register_workers(server, max(settings.connections + (CONNECTIONS[-1],)))
            print(f'  {server.label}: pid {server.pid}, port {server.port}, {server.settings}',
                  flush=True)
        print('Measuring hand-outs and worker cycles...', flush=True)
        figures = summarise(measure_throughput(servers, settings))
        scale = {}
        for server in servers:
            if server.name in scale_names:
                print(f'Measuring scale of {server.label}...', flush=True)
                scale[server.name] = measure_scale_or_say_why(server, settings.repeats)
        memory = {server.name: peak_rss_kib(server.pid) for server in servers}
    finally:
        for server in servers:
            stop_server(server)
        for database in (OURS_DATABASE, ORIGINAL_DATABASE):
            with contextlib.suppress(Exception):
                drop_database(database)
    return report(servers, settings, figures, scale, memory)


ALL_SERVERS = ('ours-pg', 'ours-sqlite', 'original-pg', 'original-sqlite', 'ceiling')
SCALE_SERVERS = ('ours-pg', 'ours-sqlite', 'original-pg')


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command')
    ceiling = commands.add_parser('serve-ceiling', help='serve the bare Falcon app (internal)')
    ceiling.add_argument('--port', type=int, required=True)
    ceiling.add_argument('--threads', type=int, default=8)
    ceiling.add_argument('--workers', type=int, default=2)
    parser.add_argument('--duration', type=float, default=4.0, help='seconds per point')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--connections', default=','.join(map(str, CONNECTIONS)))
    parser.add_argument('--threads', type=int, default=8, help="our server's threads per process")
    parser.add_argument('--workers', type=int, default=2, help="our server's processes")
    parser.add_argument('--servers', default=','.join(ALL_SERVERS))
    parser.add_argument('--loadgen', choices=('auto', 'wrk', 'python'), default='auto',
                        help='what sends the hand-out load; auto: wrk if it is or can be '
                             'installed, else Python (cycles always use Python)')
    parser.add_argument('--fill', choices=('sql', 'api'), default='sql',
                        help='hand out the scale run\'s tasks with SQL (fast) or through the API')
    parser.add_argument('--scale', default=','.join(SCALE_SERVERS),
                        help='servers whose scale to measure (empty: none)')
    return parser.parse_args(argv)


def choose_loadgen(option: str) -> str:
    if option == 'python':
        return 'python'
    if ensure_wrk():
        return 'wrk'
    if option == 'wrk':
        sys.exit('wrk is not installed and could not be installed')
    print('wrk is not at hand: the Python load generator sends the hand-outs too.', flush=True)
    return 'python'


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    if args.command == 'serve-ceiling':
        import taskfarm
        taskfarm.serve_with_waitress(create_ceiling_app, HOST, args.port, args.threads,
                                     args.workers, 'bare Falcon ceiling')
        return
    settings = Settings(args.duration, args.repeats,
                        tuple(int(c) for c in args.connections.split(',')),
                        args.threads, args.workers, args.fill, choose_loadgen(args.loadgen))
    names = [name for name in args.servers.split(',') if name]
    unknown = set(names) - set(ALL_SERVERS)
    if unknown:
        sys.exit(f'unknown servers {sorted(unknown)}; choose from {ALL_SERVERS}')
    BENCH_DIR.mkdir(exist_ok=True)
    text = bench(names, settings, [n for n in args.scale.split(',') if n in names])
    REPORT_PATH.write_text(text)
    print()
    print(text)
    print(f'(written to {REPORT_PATH.relative_to(REPO_ROOT)})')


if __name__ == '__main__':
    main()
