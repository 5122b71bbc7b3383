"""The load generators: simulated workers over keep-alive connections in
Python (asyncio, callbacks, a few processes), and wrk for the stateless
single hand-out.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common import BENCH_DIR, HOST, READY_TIMEOUT_SECONDS, CpuMeter, Server, ensure_debian_command

PROGRESS_STEPS = tuple(range(10, 101, 10))  # the 10 progress PUTs of a cycle
# The load generator runs in at most this many processes: the machine has 2
# cores, and a third client process would only take CPU from the server.
LOADGEN_PROCESSES = 2
WARMUP_SECONDS = 0.5
# How long after its window a load process may take to give up its in-flight
# requests; bounds every load point even if a server hangs.
LOAD_GRACE_SECONDS = 10.0
# A simulated worker whose connections are refused this often in a row gives up.
MAX_CONNECT_FAILURES = 100
BATCH_SIZE = 100
MAX_CLAIM_RETRIES = 20  # 503s in a row before a simulated worker gives up

# --- the Python load generator ----------------------------------------------


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
    workload: str  # a key of WORKLOADS
    duration: float
    warmup: float = WARMUP_SECONDS
    handouts_per_connection: int | None = None
    batch_size: int = BATCH_SIZE  # tasks per batch claim
    report_done: bool = False  # batch claims carry the previous batch's done reports


@dataclass
class Recorder:
    """Counts what one load process did inside the measurement window."""

    window_start: float = 0.0
    window_end: float = 0.0
    handouts: int = 0  # tasks handed out inside the window
    received: int = 0  # tasks handed out at any time: what the server should count
    retried: int = 0  # requests answered 503 and sent again
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    handout_latencies: list[float] = field(default_factory=list)

    def running(self) -> bool:
        return time.monotonic() < self.window_end

    def in_window(self, at: float) -> bool:
        return self.window_start <= at < self.window_end

    def answered(self, started: float, finished: float, is_handout: bool,
                 tasks: int = 1) -> None:
        if is_handout:
            self.received += tasks
        if self.in_window(finished):
            self.requests += 1
            if is_handout:
                self.handouts += tasks
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


class BatchClaims:
    """The batch workload: claim `batch_size` tasks per request until none is
    left. With `report_done` it works as a worker does: each claim reports the
    previous batch done and names itself with a requestId, so that a claim
    answered 503 (try again) is sent again as it was, and safely."""

    def __init__(self, spec: LoadSpec, worker_uuid: str) -> None:
        self.spec = spec
        self.worker_uuid = worker_uuid
        self.path = f'/api/runs/{spec.run_uuid}/tasks/claim'
        self.plain_claim = http_request('POST', self.path, spec.port, spec.auth,
                                        {'worker_uuid': worker_uuid, 'count': spec.batch_size})
        self.held: list[int] = []
        self.claims = 0
        self.pending: bytes | None = None  # the claim in flight, kept until it is answered
        self.retries = 0
        self.exhausted = False

    def wants_more(self) -> bool:
        return not self.exhausted

    def request(self) -> bytes:
        if not self.spec.report_done:
            return self.plain_claim
        if self.pending is None:
            self.claims += 1
            self.pending = http_request('POST', self.path, self.spec.port, self.spec.auth, {
                'worker_uuid': self.worker_uuid, 'count': self.spec.batch_size,
                'requestId': f'{self.worker_uuid}-{self.claims}',
                'updates': [{'task': task, 'status': 'done', 'percentCompleted': 100}
                            for task in self.held]})
        return self.pending

    def answer(self, status: int, body: bytes, started: float, recorder: Recorder) -> None:
        if status == 503 and self.spec.report_done and self.retries < MAX_CLAIM_RETRIES:
            self.retries += 1
            recorder.retried += 1
            return  # the same claim goes again
        if status != 200:
            recorder.error(f'batch claim answered {status}: {body[:200]!r}')
            self.exhausted = True  # a bounded load: an erring worker stops
            return
        try:
            answer = json.loads(body)
            tasks = [task['task'] for task in answer['data']]
            refused = [result for result in answer.get('updates', []) if result['result'] != 'ok']
        except (ValueError, KeyError, TypeError):
            recorder.error(f'batch claim answered {body[:200]!r}')
            self.exhausted = True
            return
        for result in refused[:1]:
            recorder.error(f'a done report was refused: {result!r}')
        recorder.errors += max(0, len(refused) - 1)
        recorder.answered(started, time.monotonic(), is_handout=True, tasks=len(tasks))
        self.pending, self.retries = None, 0
        self.held = tasks
        self.exhausted = not tasks


WORKLOADS = {'handout': Handouts, 'cycle': Cycles, 'batch': BatchClaims}


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

    def __init__(self, workload: Handouts | Cycles | BatchClaims, recorder: Recorder,
                 port: int) -> None:
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
    finished_at = time.monotonic()
    for worker in workers:
        if not worker.finished.done():
            recorder.error('no answer before the deadline')
        worker.finish()
    return {
        'handouts': recorder.handouts, 'received': recorder.received,
        'retried': recorder.retried,
        'requests': recorder.requests, 'errors': recorder.errors, 'finished_at': finished_at,
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
    received: int = 0
    retried: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    handout_latencies: list[float] = field(default_factory=list)
    # Percentiles (ms) as wrk reports them, where wrk drove the load.
    reported_latency_ms: dict[float, float] = field(default_factory=dict)
    loadgen_cores: float = 0.0
    server_cores: float = 0.0
    postgres_cores: float = 0.0
    started_at: float = 0.0  # time.monotonic() when the window opened
    finished_at: float = 0.0  # when the last load process had its last answer
    cpu_seconds: float = 0.0  # the load processes' CPU time

    @property
    def elapsed(self) -> float:
        """From the window's start until every simulated worker had finished."""
        return self.finished_at - self.started_at

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
        self.received += part.get('received', 0)
        self.retried += part.get('retried', 0)
        self.finished_at = max(self.finished_at, part.get('finished_at', 0.0))
        self.cpu_seconds += part.get('cpu_seconds', 0.0)
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
    result = LoadResult(duration=spec.duration, started_at=start_at.value)
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
WRK_SOCKET_ERRORS = re.compile(
    r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)')
SECONDS_PER_UNIT = {'us': 1e-6, 'ms': 1e-3, 's': 1.0, 'm': 60.0}


def ensure_wrk() -> bool:
    return ensure_debian_command('wrk', 'wrk')


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


