"""What every section of the benchmark shares: paths, the deployments of our
server, the databases, the processes' CPU and memory, a small JSON client,
and the targets.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
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
HOST = '127.0.0.1'

PG_SERVER_URL = os.environ.get('BENCH_PG_URL', 'postgresql://root@127.0.0.1:5432')
OURS_DATABASE = 'bench_taskfarm'

BENCH_USER = 'bench'
BENCH_PASSWORD = 'bench-password'
BENCH_SECRET = 'bench-secret-not-for-production'

HUGE_RUN = 10**9
READY_TIMEOUT_SECONDS = 60.0
LATENCY_SAMPLES = 20
DEBIAN_INSTALL_TIMEOUT_SECONDS = 600

# The commands of the checkout under test, from the venv that runs the bench.
VENV_BIN = Path(sys.executable).parent
TASKFARM_SERVER = VENV_BIN / 'taskfarm-server'
TASKFARM_CLIENT = VENV_BIN / 'taskfarm'
ADMIN_SCRIPT = REPO_ROOT / 'admin.py'

BACKEND_NAMES = {'pg': 'PostgreSQL', 'sqlite': 'sqlite'}


# --- the server's internals that the bench uses ------------------------------
#
# Only these functions import the server's modules, so that a refactor of
# the server changes the bench here and nowhere else.


def server_module(name: str) -> Any:
    """A module of the checkout under test (not some other installed copy)."""
    import importlib

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(name)


def open_server_database(database_url: str) -> Any:
    """The server's own database object: `transaction()`, `tx.execute(sql, params)`."""
    return server_module('store').open_database(database_url)


def advance_frontier_sql() -> str:
    """The server's statement that moves a run's frontier past handed-out tasks."""
    return server_module('store').ADVANCE_FRONTIER


def serve_with_waitress(make_app: Callable[[], Any], port: int, threads: int, workers: int,
                        label: str) -> None:
    """Serve an app exactly as taskfarm-server serves ours."""
    server_module('taskfarm').serve_with_waitress(make_app, HOST, port, threads, workers, label)


# --- what a section hands back -------------------------------------------------


@dataclass
class Target:
    """One target of the issue: a measured value against its limit."""

    text: str
    value: float | None
    limit: float
    at_most: bool = False
    shown: str = ''  # the figures behind the value, e.g. '1,525 vs 217/s'
    why_missing: str = ''  # why it could not be measured
    broken: str = ''  # why the measurement fails the target whatever its value

    def verdict(self) -> str:
        if self.broken:
            return 'NOT MET'
        if not measured(self.value):
            return 'NOT MEASURED'
        met = self.value <= self.limit if self.at_most else self.value >= self.limit
        return 'met' if met else 'NOT MET'

    def line(self) -> str:
        value = f'{self.value:.2f}' if measured(self.value) else '–'
        sign = '≤' if self.at_most else '≥'
        details = f'; {self.shown}' if self.shown and measured(self.value) else ''
        missing = f' ({self.why_missing})' if self.why_missing and not measured(self.value) else ''
        limit = f'{sign} {self.limit:,g}{details}'
        broken = f': {self.broken}' if self.broken else ''
        return f'- **{self.verdict()}**: {self.text}: {value} ({limit}){missing}{broken}'


@dataclass
class Section:
    """A section's part of the report: its Markdown lines and its targets."""

    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """The knobs of one bench run (see `bench.py --help`)."""

    duration: float
    repeats: int
    connections: tuple[int, ...]
    threads: int | None  # None: taskfarm-server's default
    workers: int | None  # None: taskfarm-server's default
    servers: tuple[str, ...]
    scale_servers: tuple[str, ...]
    fill: str
    loadgen: str
    e2e_tasks: int
    e2e_repeats: int
    e2e_tools: tuple[str, ...]
    batch_connections: tuple[int, ...]
    scale_tasks: int


# --- small helpers --------------------------------------------------------------


def measured(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def divide(a: float | None, b: float | None) -> float | None:
    return a / b if measured(a) and measured(b) and b else None


def ratio(value: float | None, reference: float | None) -> str:
    quotient = divide(value, reference)
    if quotient is None:
        return '–'
    return f'{quotient:.2f}×' if quotient < 10 else f'{quotient:.0f}×'


def median_of(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float('nan')


def ensure_debian_command(command: str, package: str) -> bool:
    """`command` on PATH, installed from Debian's `package` if need be and possible."""
    if shutil.which(command):
        return True
    if os.geteuid() != 0 or not shutil.which('apt-get'):
        return False
    print(f'Installing {package} from Debian...', flush=True)
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    install = ['apt-get', 'install', '-y', '-q', package]
    for attempt in ([install], [['apt-get', 'update', '-q'], install]):
        if all(subprocess.run(step, env=env, capture_output=True, check=False,
                              timeout=DEBIAN_INSTALL_TIMEOUT_SECONDS).returncode == 0
               for step in attempt):
            break
    return shutil.which(command) is not None


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




def rss_kib(root: int) -> int:
    """Sum of VmRSS over the process tree: the memory it holds now."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f'/proc/{pid}/status').read_text().splitlines():
                if line.startswith('VmRSS:'):
                    total += int(line.split()[1])
    return total


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
    processes: int = 0  # how many processes it runs, counted once it serves
    auth: str = ''

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
    server.processes = len(process_tree(server.pid))


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



def server_environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != 'VIRTUAL_ENV'}
    env.update(extra)
    return env


def prepare_ours(backend: str, threads: int | None = None, workers: int | None = None) -> Server:
    """Ours on a fresh database, as `taskfarm-server` serves it: with its
    defaults unless threads or workers are given."""
    if backend == 'pg':
        database_url = recreate_database(OURS_DATABASE)
    else:
        database_url = f'sqlite:///{fresh_sqlite_path("ours")}'
    env = server_environment(DATABASE_URL=database_url, TASKFARM_SECRET=BENCH_SECRET)
    run_checked([sys.executable, str(ADMIN_SCRIPT), 'init-db'], env, 'admin.py init-db')
    run_checked([sys.executable, str(ADMIN_SCRIPT), 'adduser', BENCH_USER,
                 '--password', BENCH_PASSWORD], env, 'admin.py adduser')
    port = free_port()
    command = [str(TASKFARM_SERVER), '--host', HOST, '--port', str(port)]
    flags = []
    if threads is not None:
        flags += ['--threads', str(threads)]
    if workers is not None:
        flags += ['--workers', str(workers)]
    settings = f'taskfarm-server {" ".join(flags)}' if flags else 'taskfarm-server defaults'
    return Server(f'ours-{backend}', f'ours ({BACKEND_NAMES[backend]})', 'ours', backend,
                  command + flags, env, settings, database_url, port)


def start_ours(backend: str, threads: int | None = None, workers: int | None = None,
               worker_count: int = 0) -> Server:
    """prepare_ours, started, logged in, with `worker_count` workers registered."""
    server = prepare_ours(backend, threads, workers)
    try:
        start_server(server)
        log_in(server)
        register_workers(server, worker_count)
    except BaseException:
        stop_server(server)  # the caller never sees it, so it cannot stop it
        raise
    print(f'  {server.label}: pid {server.pid}, port {server.port}, {server.settings}, '
          f'{server.processes} process(es)', flush=True)
    return server


def stop_and_drop(servers: Sequence[Server]) -> None:
    """Stop the servers, then drop the PostgreSQL databases they used."""
    for server in servers:
        stop_server(server)
    for server in servers:
        if server.backend == 'pg':
            with contextlib.suppress(Exception):
                drop_database(server.database_url.rsplit('/', 1)[1])


def settle_database(server: Server) -> None:
    """VACUUM ANALYZE ours on PostgreSQL, as autovacuum would in time: the
    shared cluster here runs with autovacuum off, and a table never analysed
    gets poor plans that no deployed server would keep."""
    if server.backend != 'pg':
        return
    import psycopg

    with psycopg.connect(server.database_url, autocommit=True) as db:
        db.execute('VACUUM ANALYZE')


# --- runs -----------------------------------------------------------------------


def create_run(server: Server, num_tasks: int = HUGE_RUN) -> dict:
    if server.kind == 'ceiling':
        return {'id': 0, 'uuid': '0' * 32, 'numTasks': num_tasks}
    api = Api(server)
    run = api.expect(201, 'POST', '/api/run', {'numTasks': num_tasks})
    api.close()
    return run


def run_status(server: Server, run: dict) -> dict:
    api = Api(server)
    status = api.expect(200, 'GET', f'/api/runs/{run["uuid"]}')
    api.close()
    return status


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


def time_requests(server: Server, method: str, path: str, body: dict | None,
                  status: int, repeats: int) -> float:
    """Median over repeats of the median latency (ms) of one request, sent in sequence."""
    api = Api(server)
    for _ in range(3):  # untimed: the connection and the statements warm up
        api.timed(method, path, body, status)
    medians = [median_of([api.timed(method, path, body, status) for _ in range(LATENCY_SAMPLES)])
               for _ in range(repeats)]
    api.close()
    return 1000 * median_of(medians)
