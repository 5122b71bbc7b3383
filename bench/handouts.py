"""The original protocol: hand-outs and worker cycles of ours, the original
taskfarm 0.4.0 and a bare Falcon ceiling, and how run status and hand-out
latency scale with the tasks handed out (issue 5; issue 11 part 5 asks for
the hand-out ratio with the default server settings).

Ours runs with `taskfarm-server`'s defaults unless --threads or --workers
say otherwise; the ceiling runs as many processes and threads as ours does
on PostgreSQL. wrk sends the single hand-outs (it is stateless); the Python
generator the worker cycles (a hand-out, 10 progress PUTs and a PUT of done).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ceiling
from common import (
    BENCH_DIR,
    BENCH_PASSWORD,
    BENCH_SECRET,
    BENCH_USER,
    HOST,
    HUGE_RUN,
    REPO_ROOT,
    Api,
    Options,
    Section,
    Server,
    Target,
    advance_frontier_sql,
    create_run,
    delete_run,
    divide,
    free_port,
    fresh_sqlite_path,
    log_in,
    median_of,
    open_server_database,
    peak_rss_kib,
    prepare_ours,
    ratio,
    recreate_database,
    register_workers,
    run_checked,
    server_environment,
    settle_database,
    start_server,
    stop_and_drop,
    time_requests,
    worker_uuids,
)
from loadgen import (
    LOADGEN_PROCESSES,
    PROGRESS_STEPS,
    WARMUP_SECONDS,
    LoadResult,
    LoadSpec,
    run_handouts_with_wrk,
    run_load,
)

ORIGINAL_DATABASE = 'bench_taskfarm_original'
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
SCALE_LEVELS = (10**4, 10**5, 10**6)
WORKLOADS = ('handout', 'cycle')
# Worker cycles take longer to settle: at 64 clients the original needs more
# than a second to hand out the first task to every client.
CYCLE_WARMUP_SECONDS = 1.5
CEILING_SCRIPT = Path(__file__).with_name('ceiling.py')

ALL_SERVERS = ('ours-pg', 'ours-sqlite', 'original-pg', 'original-sqlite', 'ceiling')
SCALE_SERVERS = ('ours-pg', 'ours-sqlite', 'original-pg')
# The issue-11 target: the original protocol with the default server settings.
DEFAULT_SETTINGS_CONNECTIONS = 32
DEFAULT_SETTINGS_RATIO = 10

# --- the original and the ceiling ----------------------------------------------


def help_text(command: Sequence[str]) -> str:
    done = subprocess.run([*command, '--help'], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout


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
    settings = f'taskfarm 0.4.0, gunicorn, {ORIGINAL_GUNICORN_WORKERS} sync workers'
    return Server(f'original-{backend}', f'original ({backend_name})', 'original', backend,
                  command, env, settings, database_url, port, cwd=elsewhere)


def prepare_ceiling(threads: int, workers: int) -> Server:
    port = free_port()
    command = [sys.executable, str(CEILING_SCRIPT),
               '--port', str(port), '--threads', str(threads), '--workers', str(workers)]
    return Server('ceiling', 'ceiling (bare Falcon)', 'ceiling', '', command,
                  server_environment(), f'bare Falcon, waitress, {threads} threads per process',
                  port=port)



# --- filling a run: N tasks handed out ---------------------------------------


def fill_via_api(server: Server, run: dict, handed_out: int, target: int) -> None:
    """Hand out tasks through the server itself until at least `target` are
    handed out (each connection does its share, rounded up)."""
    connections = max(CONNECTIONS)
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
    db = open_server_database(server.database_url)
    try:
        with db.transaction() as tx:
            worker = tx.one(WORKER_ID, {'uuid': worker_uuids(1)[0]})
            values = {'run_id': run['id'], 'worker_id': worker['id'], 'first': handed_out,
                      'stop': target, 'count': target, 'now': time.time()}
            tx.execute(OURS_FILL[db.dialect], values)
            tx.execute(advance_frontier_sql(), values)
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




def fill_for(server: Server, fill_mode: str) -> Callable[[Server, dict, int, int], None]:
    """How the scale measurement hands out a server's tasks quickly."""
    if server.kind == 'ours':
        return fill_via_api if fill_mode == 'api' else fill_ours_via_sql
    return fill_original_via_sql if server.backend == 'pg' else fill_via_api


# --- measurements -----------------------------------------------------------


def measure_point(server: Server, workload: str, connections: int,
                  options: Options) -> LoadResult:
    """One timed load on a fresh run, deleted afterwards so that every point
    starts from the same, small tables."""
    run = create_run(server)
    if workload == 'handout' and options.loadgen == 'wrk':
        result = run_handouts_with_wrk(server, run['uuid'], connections, options.duration)
    else:
        warmup = CYCLE_WARMUP_SECONDS if workload == 'cycle' else WARMUP_SECONDS
        spec = LoadSpec(server.port, server.auth, run['uuid'], workload, options.duration, warmup)
        result = run_load(spec, worker_uuids(connections), server.pid)
    delete_run(server, run)
    return result


def measure_throughput(servers: Sequence[Server], options: Options
                       ) -> dict[tuple[str, str, int], list[LoadResult]]:
    """Every point of every server, repeats interleaved so that a noisy
    minute on the machine hurts all servers alike."""
    results: dict[tuple[str, str, int], list[LoadResult]] = {}
    for repeat in range(options.repeats):
        for connections in options.connections:
            for server in servers:
                for workload in WORKLOADS:
                    result = measure_point(server, workload, connections, options)
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


def measure_run_creation(server: Server, repeats: int) -> dict[str, float]:
    figures = {}
    for num_tasks in (10, HUGE_RUN):
        figures[f'create {num_tasks}'] = time_requests(
            server, 'POST', '/api/run', {'numTasks': num_tasks}, 201, repeats)
    return figures


def measure_scale_or_say_why(server: Server, repeats: int, fill_mode: str) -> dict[str, float]:
    """A failed scale measurement (say, a fill that no longer matches the
    schema) must not throw away the throughput figures measured before it."""
    try:
        return measure_scale(server, repeats, fill_mode)
    except Exception as error:  # noqa: BLE001 - reported, and the table says "–"
        print(f'  scale of {server.label} failed: {error}', flush=True)
        return {}


def handed_out_so_far(server: Server, run: dict) -> int:
    """Every task of the scale run that was handed out is still computing."""
    api = Api(server)
    count = api.expect(200, 'GET', f'/api/runs/{run["uuid"]}?info=numComputing')
    api.close()
    return count['numComputing']


def measure_scale(server: Server, repeats: int, fill_mode: str) -> dict[str, float]:
    """Run status and hand-out latency after 10^4, 10^5 and 10^6 tasks handed out."""
    settle_database(server)
    figures = measure_run_creation(server, repeats)
    run = create_run(server)
    for level in SCALE_LEVELS:
        started = time.monotonic()
        fill_for(server, fill_mode)(server, run, handed_out_so_far(server, run), level)
        print(f'  {server.name}: {level} handed out in {time.monotonic() - started:.1f} s',
              flush=True)
        figures[f'status {level}'] = time_requests(
            server, 'GET', f'/api/runs/{run["uuid"]}', None, 200, repeats)
        figures[f'handout {level}'] = time_requests(
            server, 'POST', f'/api/runs/{run["uuid"]}/task',
            {'worker_uuid': worker_uuids(1)[0]}, 201, repeats)
    return figures



# --- the report -----------------------------------------------------------------


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
                f'| {server.label} | {c} | {f.handouts:.0f} '
                f'| {ratio(f.handouts, orig and orig.handouts)} '
                f'| {ratio(f.handouts, ceil and ceil.handouts)} | {f.p50:.1f} | {f.p99:.1f} '
                f'| {ratio(f.p99, orig and orig.p99)} | {f.cycles:.1f} '
                f'| {ratio(f.cycles, orig and orig.cycles)} '
                f'| {ratio(f.cycles, ceil and ceil.cycles)} | {f.errors} |')
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


def figure(figures: dict[tuple[str, int], Figures], name: str, connections: int,
           attribute: str) -> float | None:
    f = figures.get((name, connections))
    return getattr(f, attribute) if f is not None else None


def best_handouts(figures: dict[tuple[str, int], Figures], name: str) -> float | None:
    rates = [f.handouts for (n, _), f in figures.items() if n == name]
    return max(rates) if rates else None


def issue_5_targets(figures: dict[tuple[str, int], Figures], scale: dict[str, dict[str, float]]
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


def default_settings_target(servers: Sequence[Server],
                            figures: dict[tuple[str, int], Figures]) -> Target:
    """Issue 11: ours with the default settings vs the original, PostgreSQL."""
    c = DEFAULT_SETTINGS_CONNECTIONS
    ours = figure(figures, 'ours-pg', c, 'handouts')
    original = figure(figures, 'original-pg', c, 'handouts')
    ours_pg = next((server for server in servers if server.name == 'ours-pg'), None)
    if ours_pg is not None and ours_pg.settings != 'taskfarm-server defaults':
        ours, why = None, f'ours ran with {ours_pg.settings}, not the defaults'
    else:
        why = f'needs ours-pg and original-pg at {c} connections'
    processes = ours_pg.processes if ours_pg else 0
    return Target(f'original protocol, default server settings: PostgreSQL hand-outs/s at {c} '
                  'connections vs the original', divide(ours, original), DEFAULT_SETTINGS_RATIO,
                  shown=f'{ours or 0:,.0f} vs {original or 0:,.0f}/s, ours {processes} process(es)',
                  why_missing=why)


def method_text(options: Options) -> str:
    return (f'Load: {LOADGENS[options.loadgen]}, one keep-alive connection per simulated '
            f'worker; each point runs {options.duration:g} s (the Python generator after a '
            f'{WARMUP_SECONDS:g} s warm-up, {CYCLE_WARMUP_SECONDS:g} s for cycles) on a fresh '
            f'run of 10^9 tasks; figures are the median of {options.repeats} repeats. A worker '
            f'cycle is a hand-out, {len(PROGRESS_STEPS)} progress PUTs and a PUT of status done; '
            f'cycles/s counts answered cycle requests / {len(PROGRESS_STEPS) + 2}.')


def section_lines(servers: Sequence[Server], options: Options,
                  figures: dict[tuple[str, int], Figures], scale: dict[str, dict[str, float]],
                  memory: dict[str, tuple[int, int]]) -> list[str]:
    lines = [method_text(options), '']
    lines += [f'- {server.label}: {server.settings}, {server.processes} process(es)'
              for server in servers]
    lines += ['', '### Hand-outs and worker cycles', '', RATIO_NOTE, '']
    lines += throughput_table(servers, figures, options.connections)
    if scale:
        lines += ['', '### Scale', ''] + scale_table(scale, servers)
    lines += ['', '### Peak memory', ''] + memory_table(memory, servers)
    lines += ['', '### Targets of issue 5 (kept to compare with earlier runs)', '']
    lines += [target.line() for target in issue_5_targets(figures, scale)]
    return lines


# --- the section ------------------------------------------------------------------


def prepare_server(name: str, options: Options, started: Sequence[Server]) -> Server:
    if name == 'ours-pg':
        return prepare_ours('pg', options.threads, options.workers)
    if name == 'ours-sqlite':
        # sqlite has one writer: one process, as the README deploys it.
        return prepare_ours('sqlite', options.threads, None)
    if name.startswith('original-'):
        return prepare_original(name.removeprefix('original-'))
    # The ceiling runs exactly as many processes and threads as ours does.
    ours_pg = next((server for server in started if server.name == 'ours-pg'), None)
    workers = ours_pg.processes if ours_pg else ceiling.DEFAULT_WORKERS
    return prepare_ceiling(options.threads or ceiling.DEFAULT_THREADS, workers)


def start_servers(options: Options, servers: list[Server]) -> None:
    """Every server of the section, started, logged in, with its workers,
    added to servers before it starts, so that the caller stops whatever
    started, even if a later one fails."""
    for name in ALL_SERVERS:
        if name in options.servers:
            server = prepare_server(name, options, servers)
            servers.append(server)
            start_server(server)
            log_in(server)
            register_workers(server, max(options.connections + CONNECTIONS))
            print(f'  {server.label}: pid {server.pid}, port {server.port}, {server.settings}, '
                  f'{server.processes} process(es)', flush=True)


def measure(options: Options) -> Section:
    """The original-protocol section: throughput, scale, memory, targets."""
    section = Section('Original protocol: single hand-outs and worker cycles')
    servers: list[Server] = []
    try:
        start_servers(options, servers)
        print('Measuring hand-outs and worker cycles...', flush=True)
        figures = summarise(measure_throughput(servers, options))
        scale = {}
        for server in servers:
            if server.name in options.scale_servers:
                print(f'Measuring scale of {server.label}...', flush=True)
                scale[server.name] = measure_scale_or_say_why(server, options.repeats,
                                                              options.fill)
        memory = {server.name: peak_rss_kib(server.pid) for server in servers}
    finally:
        stop_and_drop(servers)
    section.lines = section_lines(servers, options, figures, scale, memory)
    section.targets = [default_settings_target(servers, figures)]
    return section
