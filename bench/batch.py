"""The API with batches (API.md Part 3), two sections:

- batch: tasks/s handed out by batch claims of 100
  (`POST /api/runs/{uuid}/tasks/claim`) at 8 and 32 connections, on
  PostgreSQL and sqlite, each point on a fresh run of 10^9 tasks;
- scale: one run of 10^6 tasks claimed and reported done in batches of 100
  by 8 workers on PostgreSQL, each claim carrying the previous batch's done
  reports as `updates`: the time, the server's memory (RSS) before and
  after, run status latency before and after.

The Python load generator drives both: at 100 tasks a request it sends a
few hundred requests a second, far below its own limit, and it counts the
tasks in every answer; the server's own count must then agree. A server
without the batch route (404 or 405) skips both with a note.
"""

from __future__ import annotations

from typing import Any

from common import (
    Api,
    Options,
    Section,
    Server,
    Target,
    create_run,
    delete_run,
    divide,
    median_of,
    rss_kib,
    run_status,
    settle_database,
    start_ours,
    stop_and_drop,
    time_requests,
    worker_uuids,
)
from loadgen import BATCH_SIZE, MAX_CLAIM_RETRIES, LoadResult, LoadSpec, run_load

BACKENDS = ('pg', 'sqlite')
BATCH_CONNECTIONS = (8, 32)
BATCH_TARGET_CONNECTIONS = 8
BATCH_TARGET_TASKS_PER_S = 20_000
MISSING_ROUTE_STATUSES = (404, 405)

SCALE_WORKERS = 8
SCALE_TASKS = 10**6
# A first, small run through the same workers, so that "memory at start" is
# that of a server that has warmed up (pool connections, caches).
SCALE_WARMUP_TASKS = 10**4
SCALE_TIME_LIMIT_SECONDS = 180.0  # 3× the target: past it the target is plainly not met
SCALE_TARGET_SECONDS = 60
MEMORY_FLAT_RATIO = 1.25  # RSS after 10^6 tasks / RSS before, at most


def claim_path(run: dict) -> str:
    return f'/api/runs/{run["uuid"]}/tasks/claim'


def batch_route_missing(server: Server) -> str | None:
    """Why the server cannot take batch claims, or None when it can."""
    run = create_run(server, 1)
    api = Api(server)
    try:
        status, answer = api.call('POST', claim_path(run),
                                  {'worker_uuid': worker_uuids(1)[0], 'count': 1})
    finally:
        api.close()
        delete_run(server, run)
    if status == 200:
        return None
    if status in MISSING_ROUTE_STATUSES:
        return (f'{server.label} has no batch hand-out yet: '
                f'POST /api/runs/{{uuid}}/tasks/claim answered {status}')
    return f'{server.label} refused a batch claim: {status} {str(answer)[:200]}'


def handed_out(server: Server, run: dict) -> int:
    status = run_status(server, run)
    return status['numComputing'] + status['numDone']


def check_counts(server: Server, run: dict, result: LoadResult) -> None:
    """The server must count exactly the tasks that the workers received."""
    counted = handed_out(server, run)
    if counted != result.received:
        result.errors += 1
        result.error_samples.append(f'{server.label} counts {counted} tasks handed out; '
                                    f'the workers received {result.received}')


def log_result(what: str, result: LoadResult, rate: float) -> None:
    print(f'  {what}: {rate:9.0f} tasks/s  p99 {result.latency_ms(0.99):7.1f} ms  '
          f'errors {result.errors}  cores: server {result.server_cores:.2f} '
          f'postgres {result.postgres_cores:.2f} loadgen {result.loadgen_cores:.2f}', flush=True)
    for sample in result.error_samples[:2]:
        print(f'      error: {sample}', flush=True)


# --- batch claims: throughput ----------------------------------------------------


def measure_batch_point(server: Server, connections: int, duration: float) -> LoadResult:
    run = create_run(server)
    spec = LoadSpec(server.port, server.auth, run['uuid'], 'batch', duration)
    result = run_load(spec, worker_uuids(connections), server.pid)
    check_counts(server, run, result)
    delete_run(server, run)
    return result


def batch_table(servers: list[Server], results: dict[tuple[str, int], list[LoadResult]],
                connections: tuple[int, ...]) -> list[str]:
    lines = ['| server | conns | tasks/s | claims/s | p50 ms | p99 ms | errors |',
             '|---|--:|--:|--:|--:|--:|--:|']
    for server in servers:
        for c in connections:
            points = results.get((server.name, c), [])
            if points:
                tasks_per_s = median_of([r.handouts_per_s for r in points])
                lines.append(
                    f'| {server.label} | {c} | {tasks_per_s:,.0f} '
                    f'| {median_of([r.requests / r.duration for r in points]):,.0f} '
                    f'| {median_of([r.latency_ms(0.5) for r in points]):.1f} '
                    f'| {median_of([r.latency_ms(0.99) for r in points]):.1f} '
                    f'| {sum(r.errors for r in points)} |')
    return lines


def batch_target(results: dict[tuple[str, int], list[LoadResult]], why_missing: str) -> Target:
    c = BATCH_TARGET_CONNECTIONS
    points = results.get(('ours-pg', c), [])
    rate = median_of([r.handouts_per_s for r in points]) if points else None
    return Target(f'batch claims of {BATCH_SIZE}: PostgreSQL tasks/s at {c} connections', rate,
                  BATCH_TARGET_TASKS_PER_S, shown='tasks handed out per second',
                  why_missing=why_missing or 'not measured')


def measure_batch_points(servers: list[Server], options: Options
                         ) -> dict[tuple[str, int], list[LoadResult]]:
    """Every point of every server, repeats interleaved."""
    results: dict[tuple[str, int], list[LoadResult]] = {}
    for repeat in range(options.repeats):
        for c in options.batch_connections:
            for server in servers:
                result = measure_batch_point(server, c, options.duration)
                results.setdefault((server.name, c), []).append(result)
                log_result(f'[{repeat + 1}] {server.name:11} c={c:<3}', result,
                           result.handouts_per_s)
    return results


def batch_method(servers: list[Server], options: Options) -> str:
    settings = '; '.join(f'{s.label}: {s.settings}, {s.processes} process(es)' for s in servers)
    return (f'`POST /api/runs/{{uuid}}/tasks/claim` with `count` {BATCH_SIZE} and no updates, '
            'one keep-alive connection and worker per simulated worker, by the Python load '
            f'generator; each point {options.duration:g} s on a fresh run of 10^9 tasks, the '
            f'median of {options.repeats} repeats; the tasks received checked against the '
            f"run's count. Servers: {settings}.")


def measure_batch(options: Options) -> Section:
    section = Section(f'Batch hand-out: claims of {BATCH_SIZE} tasks')
    servers: list[Server] = []
    missing: dict[str, str] = {}
    try:
        for backend in BACKENDS:
            servers.append(start_ours(backend, options.threads, options.workers,
                                      max(options.batch_connections)))
        for server in servers:
            if why := batch_route_missing(server):
                missing[server.name] = why
                print(f'  skipped: {why}', flush=True)
        ready = [server for server in servers if server.name not in missing]
        results = measure_batch_points(ready, options)
    finally:
        stop_and_drop(servers)
    section.lines = [batch_method(servers, options), '']
    section.lines += [f'**Not measured**: {why}.' for why in missing.values()]
    if ready:
        section.lines += batch_table(ready, results, options.batch_connections)
    section.targets = [batch_target(results, missing.get('ours-pg', ''))]
    return section


# --- scale: 10^6 tasks through batches ---------------------------------------------


def work_through(server: Server, run: dict) -> tuple[LoadResult, int]:
    """SCALE_WORKERS workers claim and report every task of the run, within
    the time limit: the load's result and how many tasks the run has done."""
    spec = LoadSpec(server.port, server.auth, run['uuid'], 'batch', SCALE_TIME_LIMIT_SECONDS,
                    warmup=0.0, report_done=True)
    result = run_load(spec, worker_uuids(SCALE_WORKERS), server.pid)
    status = run_status(server, run)
    if status['numDone'] != run['numTasks'] or status['numComputing']:
        result.errors += 1
        result.error_samples.append(f'after the load {status["numDone"]:,} of '
                                    f'{run["numTasks"]:,} tasks are done and '
                                    f'{status["numComputing"]} computing')
    return result, status['numDone']


def status_latency_ms(server: Server, run: dict) -> float:
    return time_requests(server, 'GET', f'/api/runs/{run["uuid"]}', None, 200, 1)


def measure_scale_run(server: Server, tasks: int) -> dict[str, Any]:
    warmup = create_run(server, SCALE_WARMUP_TASKS)
    work_through(server, warmup)  # its figures do not count
    delete_run(server, warmup)
    settle_database(server)
    figures: dict[str, Any] = {'rss before': rss_kib(server.pid) / 1024}
    run = create_run(server, tasks)
    figures['status before'] = status_latency_ms(server, run)
    result, done = work_through(server, run)
    log_result(f'{done} tasks done in {result.elapsed:.1f} s', result, done / result.elapsed)
    figures.update({
        'seconds': result.elapsed, 'done': done, 'errors': result.errors,
        'retried': result.retried,
        'error samples': result.error_samples[:2],
        'status after': status_latency_ms(server, run),
        'rss after': rss_kib(server.pid) / 1024,
        'server cores': result.server_cores, 'postgres cores': result.postgres_cores,
        'loadgen cores': result.cpu_seconds / result.elapsed,
    })
    delete_run(server, run)
    return figures


def scale_method(server: Server, tasks: int) -> str:
    return (f'One run of {tasks:,} tasks; {SCALE_WORKERS} workers (the Python load generator, '
            f'one connection each) claim {BATCH_SIZE} at a time, each claim reporting the '
            'previous batch done and carrying a requestId, so that a claim answered 503 is '
            f'sent again as a worker would (at most {MAX_CLAIM_RETRIES} times in a row); '
            f'{server.label}: {server.settings}, {server.processes} process(es). Memory: RSS '
            "summed over the server's processes, after a warm-up run of "
            f'{SCALE_WARMUP_TASKS:,} tasks and after the run. The database is vacuumed and '
            'analysed after the warm-up, as autovacuum would have (it is off on this shared '
            'cluster). Run status: median ms of sequential requests.')


def scale_lines(server: Server, tasks: int, f: dict[str, Any]) -> list[str]:
    cores = f'{f["server cores"]:.2f} / {f["postgres cores"]:.2f} / {f["loadgen cores"]:.2f}'
    cells = [f'{tasks:,}', f'{f["done"]:,}', f'{f["seconds"]:.1f}',
             f'{f["done"] / f["seconds"]:,.0f}',
             f'{f["rss before"]:.0f}', f'{f["rss after"]:.0f}', f'{f["status before"]:.1f}',
             f'{f["status after"]:.1f}', str(f['retried']), str(f['errors']), cores]
    return [
        scale_method(server, tasks), '',
        '| tasks | done | seconds | done/s | RSS before MiB | RSS after MiB | status before ms '
        '| status after ms | 503s retried | errors | cores: server / PostgreSQL / load |',
        '|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
        '| ' + ' | '.join(cells) + ' |',
        *(f'- error: {sample}' for sample in f['error samples']),
    ]


def scale_targets(tasks: int, f: dict[str, Any], why_missing: str) -> list[Target]:
    broken = f'{f["errors"]} error(s), not every task done' if f and f['errors'] else ''
    return [
        Target(f'{tasks:,} tasks claimed and reported in batches by {SCALE_WORKERS} workers, '
               'PostgreSQL: seconds', f.get('seconds'), SCALE_TARGET_SECONDS, at_most=True,
               why_missing=why_missing or 'not measured', broken=broken),
        Target("… the server's memory after the run / before it",
               divide(f.get('rss after'), f.get('rss before')), MEMORY_FLAT_RATIO, at_most=True,
               shown=f'{f.get("rss before", 0):.0f} → {f.get("rss after", 0):.0f} MiB',
               why_missing=why_missing or 'not measured', broken=broken),
    ]


def measure_scale(options: Options) -> Section:
    section = Section(f'Scale: {options.scale_tasks:,} tasks through batch claims')
    figures: dict[str, Any] = {}
    server = None
    why_missing = ''
    try:
        server = start_ours('pg', options.threads, options.workers, SCALE_WORKERS)
        why_missing = batch_route_missing(server) or ''
        if why_missing:
            print(f'  skipped: {why_missing}', flush=True)
        else:
            figures = measure_scale_run(server, options.scale_tasks)
    finally:
        stop_and_drop([server] if server else [])
    section.lines = ([f'**Not measured**: {why_missing}.'] if why_missing or not server else
                     scale_lines(server, options.scale_tasks, figures))
    section.targets = scale_targets(options.scale_tasks, figures, why_missing)
    return section
