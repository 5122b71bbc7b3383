"""End to end: the same N tasks of `true` through `taskfarm work RUN -j 2`
against ours on sqlite and on PostgreSQL (both with `taskfarm-server`'s
defaults), through HyperQueue (a LocalCluster with one worker of 2 cores),
GNU parallel -j 2 and xargs -P 2 (the cost of starting a process at all).

Each is timed from the moment the work starts (ours: `taskfarm work` is
launched, the run already created; HyperQueue: the job is submitted, its
server and worker already running; parallel and xargs: launched) until
every task is done, and checked: ours by the run's numDone, HyperQueue by
the job's outcome, parallel and xargs by their exit status. Repeats are
interleaved, so that a noisy minute hurts every tool alike.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import (
    BENCH_DIR,
    BENCH_PASSWORD,
    BENCH_USER,
    HOST,
    LOG_DIR,
    TASKFARM_CLIENT,
    Options,
    Section,
    Server,
    Target,
    create_run,
    delete_run,
    divide,
    ensure_debian_command,
    median_of,
    ratio,
    run_checked,
    run_status,
    server_environment,
    start_ours,
    stop_and_drop,
)

JOBS = 2  # tasks at a time, for every tool
PROGRAM = ('true',)
TOOL_TIME_LIMIT_SECONDS = 600  # one tool, one repeat
HYPERQUEUE_REQUIREMENTS = ('hyperqueue==0.27.0',)
HYPERQUEUE_VENV = BENCH_DIR / 'hq-venv'
HYPERQUEUE_SCRIPT = Path(__file__).with_name('hq_run.py')
HYPERQUEUE_SERVER_DIR = BENCH_DIR / 'hq-server'

OURS = ('ours-sqlite', 'ours-pg')
REFERENCES = ('hyperqueue', 'parallel', 'xargs')
TOOLS = OURS + REFERENCES
LABELS = {
    'ours-sqlite': 'taskfarm work, default server (sqlite)',
    'ours-pg': 'taskfarm work, PostgreSQL',
    'hyperqueue': 'HyperQueue 0.27',
    'parallel': 'GNU parallel',
    'xargs': 'xargs',
}
HOW = {
    'ours-sqlite': f'`taskfarm work RUN -j {JOBS} -- true`',
    'ours-pg': f'`taskfarm work RUN -j {JOBS} -- true`',
    'hyperqueue': f'LocalCluster, 1 worker of {JOBS} cores, no output files',
    'parallel': f'`parallel -j {JOBS} true`',
    'xargs': f'`xargs -P {JOBS} -n 1 true`',
}
# Issue 11 part 5: ours must be at least this many times as fast as each.
TARGET_RATIOS = {'hyperqueue': 3.0, 'parallel': 3.0, 'xargs': 0.5}


class Unavailable(Exception):
    """A tool that cannot run on this machine; the message says why."""


# --- running and timing one command ------------------------------------------------


def timed_command(command: Sequence[str], log_name: str, env: dict[str, str] | None = None,
                  stdin: str | None = None) -> tuple[float, Path]:
    """Seconds from launching command to its successful exit, and its log."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f'e2e-{log_name}.log'
    with open(log, 'w') as out:
        started = time.monotonic()
        # A session of its own, so that a timeout stops everything it started.
        process = subprocess.Popen(command, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=BENCH_DIR,
                                   start_new_session=True)
        try:
            process.communicate(stdin.encode() if stdin else None,
                                timeout=TOOL_TIME_LIMIT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise RuntimeError(f'{command[0]} did not finish in {TOOL_TIME_LIMIT_SECONDS} s; '
                               f'see {log}') from None
        seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f'{command[0]} exited with {process.returncode}; see {log}')
    return seconds, log


def task_numbers(tasks: int) -> str:
    return ''.join(f'{n}\n' for n in range(tasks))


# --- the tools ------------------------------------------------------------------------


def run_ours(server: Server, tasks: int) -> float:
    run = create_run(server, tasks)
    env = server_environment(TASKFARM_URL=f'http://{HOST}:{server.port}',
                             TASKFARM_USER=BENCH_USER, TASKFARM_PASSWORD=BENCH_PASSWORD)
    command = [str(TASKFARM_CLIENT), 'work', run['uuid'], '-j', str(JOBS), '--', *PROGRAM]
    try:
        seconds, _ = timed_command(command, server.name, env)
        done = run_status(server, run)['numDone']
        if done != tasks:
            raise RuntimeError(f'{server.label}: {done} of {tasks} tasks done '
                               'after taskfarm work ended')
    finally:
        delete_run(server, run)
    return seconds


def hyperqueue_python() -> Path:
    """HyperQueue's own venv under .bench/, built once and kept while its pin holds.

    Its own venv, so that the product never depends on it."""
    marker = HYPERQUEUE_VENV / 'bench-requirements.txt'
    wanted = '\n'.join(HYPERQUEUE_REQUIREMENTS)
    if not (marker.exists() and marker.read_text() == wanted):
        shutil.rmtree(HYPERQUEUE_VENV, ignore_errors=True)
        try:
            run_checked([sys.executable, '-m', 'venv', str(HYPERQUEUE_VENV)],
                        what='creating the HyperQueue venv')
            run_checked([str(HYPERQUEUE_VENV / 'bin' / 'pip'), 'install', '--quiet',
                         *HYPERQUEUE_REQUIREMENTS],
                        what='installing hyperqueue')
        except RuntimeError as error:
            raise Unavailable(str(error).splitlines()[0]) from None
        marker.write_text(wanted)
    return HYPERQUEUE_VENV / 'bin' / 'python'


def check_hyperqueue_stays_local() -> None:
    """HyperQueue's worker reaches its server by this machine's host name:
    run it only where that name is a loopback address."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError as error:
        raise Unavailable(f'the host name {name!r} does not resolve: {error}') from None
    if not ipaddress.ip_address(address).is_loopback:
        raise Unavailable(f'the host name {name!r} is {address}, not a loopback address, and '
                          "HyperQueue's worker would connect to it")


def run_hyperqueue(python: Path, tasks: int) -> float:
    shutil.rmtree(HYPERQUEUE_SERVER_DIR, ignore_errors=True)
    HYPERQUEUE_SERVER_DIR.mkdir(parents=True)
    command = [str(python), str(HYPERQUEUE_SCRIPT), '--tasks', str(tasks), '--cores', str(JOBS),
               '--server-dir', str(HYPERQUEUE_SERVER_DIR), '--', *PROGRAM]
    _, log = timed_command(command, 'hyperqueue', server_environment(TQDM_DISABLE='1'))
    answers = [line for line in log.read_text().splitlines() if line.startswith('{')]
    if not answers:
        raise RuntimeError(f'hq_run.py printed no result; see {log}')
    answer = json.loads(answers[-1])
    if not answer['ok'] or answer['tasks'] != tasks:
        raise RuntimeError(f'HyperQueue did not finish all {tasks} tasks: {answer}; see {log}')
    return answer['seconds']


def run_parallel(tasks: int) -> float:
    seconds, _ = timed_command(['parallel', '-j', str(JOBS), *PROGRAM], 'parallel',
                               stdin=task_numbers(tasks))
    return seconds


def run_xargs(tasks: int) -> float:
    seconds, _ = timed_command(['xargs', '-P', str(JOBS), '-n', '1', *PROGRAM], 'xargs',
                               stdin=task_numbers(tasks))
    return seconds


def prepare_runner(name: str, servers: dict[str, Server]) -> Callable[[int], float]:
    """What runs `tasks` tasks through one tool; Unavailable if it cannot here."""
    if name in OURS:
        backend = name.removeprefix('ours-')
        servers[name] = start_ours(backend)
        return lambda tasks: run_ours(servers[name], tasks)
    if name == 'hyperqueue':
        check_hyperqueue_stays_local()
        python = hyperqueue_python()
        return lambda tasks: run_hyperqueue(python, tasks)
    if name == 'parallel':
        if not ensure_debian_command('parallel', 'parallel'):
            raise Unavailable('GNU parallel is not installed and could not be installed')
        return run_parallel
    if not shutil.which('xargs'):
        raise Unavailable('xargs is not installed')
    return run_xargs


# --- the section -------------------------------------------------------------------


def measure_rates(runners: dict[str, Callable[[int], float]], options: Options,
                  failures: dict[str, str]) -> dict[str, list[float]]:
    """tasks/s of every tool in every repeat; a tool that fails once is dropped."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(options.e2e_repeats):
        for name, runner in runners.items():
            if name in failures:
                continue
            try:
                seconds = runner(options.e2e_tasks)
            except RuntimeError as error:
                failures[name] = str(error)
                print(f'  [{repeat + 1}] {name:12} failed: {error}', flush=True)
                continue
            rates[name].append(options.e2e_tasks / seconds)
            print(f'  [{repeat + 1}] {name:12} {options.e2e_tasks} tasks in {seconds:6.2f} s: '
                  f'{options.e2e_tasks / seconds:7.0f} tasks/s', flush=True)
    return rates


def table(rates: dict[str, list[float]], failures: dict[str, str]) -> list[str]:
    medians = {name: median_of(values) for name, values in rates.items()}
    lines = ['| tool | how | tasks/s (median) | ×HyperQueue | ×GNU parallel | ×xargs | runs |',
             '|---|---|--:|--:|--:|--:|---|']
    for name in TOOLS:
        if name in failures and not rates.get(name):
            lines.append(f'| {LABELS[name]} | {HOW[name]} | – | – | – | – | '
                         f'not run: {failures[name]} |')
        elif name in rates:
            runs = ', '.join(f'{rate:.0f}' for rate in rates[name])
            cells = ' | '.join(ratio(medians[name], medians.get(reference))
                               for reference in REFERENCES)
            lines.append(f'| {LABELS[name]} | {HOW[name]} | {medians[name]:.0f} | {cells} '
                         f'| {runs} |')
    return lines


def targets(rates: dict[str, list[float]], failures: dict[str, str]) -> list[Target]:
    medians = {name: median_of(values) for name, values in rates.items()}
    found = []
    for ours in OURS:
        for reference, limit in TARGET_RATIOS.items():
            missing = failures.get(ours) or failures.get(reference) or 'not selected'
            found.append(Target(
                f'end to end, {LABELS[ours]}, vs {LABELS[reference]}',
                divide(medians.get(ours), medians.get(reference)), limit,
                shown=f'{medians.get(ours, 0):,.0f} vs {medians.get(reference, 0):,.0f} tasks/s',
                why_missing=missing))
    return found


def method_text(options: Options) -> str:
    return (f'Each tool ran the same {options.e2e_tasks:,} tasks {options.e2e_repeats} time(s), '
            'interleaved; tasks/s is the median, the ratios are of medians. Ours: '
            '`taskfarm-server` with its defaults, the run created beforehand, timed from '
            'launching `taskfarm work` until it exits, then numDone checked. HyperQueue: timed '
            'from submitting the job (its server and worker already up) until it ended.')


def measure(options: Options) -> Section:
    section = Section(f'End to end: {options.e2e_tasks:,} tasks of `true`, {JOBS} at a time')
    servers: dict[str, Server] = {}
    failures: dict[str, str] = {}
    try:
        runners = {}
        for name in TOOLS:
            if name in options.e2e_tools:
                try:
                    runners[name] = prepare_runner(name, servers)
                except Unavailable as error:
                    failures[name] = str(error)
                    print(f'  {name}: not run: {error}', flush=True)
        rates = measure_rates(runners, options, failures)
    finally:
        stop_and_drop(list(servers.values()))
    section.lines = [method_text(options), '', *table(rates, failures)]
    section.targets = targets(rates, failures)
    return section
