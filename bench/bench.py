"""Benchmark our taskfarm server: `make bench` (issues 5 and 11).

In one run on one machine, side by side, it measures four sections
(`--sections` picks some):

- e2e: end to end, 10^4 tasks of `true` through `taskfarm work RUN -j 2`
  against ours on sqlite and on PostgreSQL (`taskfarm-server` defaults), and
  the same tasks through HyperQueue (in its own venv under .bench/), GNU
  parallel -j 2 and xargs -P 2: tasks/s and ratios (e2e.py);
- batch: tasks/s handed out by batch claims of 100 at 8 and 32 connections,
  PostgreSQL and sqlite (batch.py);
- scale: 10^6 tasks claimed and reported done in batches of 100 by 8
  workers on PostgreSQL: the time, the server's memory and run status
  latency before and after (batch.py);
- handouts: the original protocol, ours (default settings) against the
  original taskfarm 0.4.0 under gunicorn and a bare Falcon ceiling:
  hand-outs/s, worker cycles/s, latency, scale with tasks handed out, peak
  memory (handouts.py).

It prints the report, ending in every target of issue 11 met or NOT MET,
and writes it to .bench/last.md. Everything stays on 127.0.0.1, every loop
is bounded in count and time, and what it needs it installs itself (wrk and
GNU parallel from Debian, the original and HyperQueue into venvs of their
own under .bench/).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import batch
import e2e
import handouts
from common import BENCH_DIR, REPO_ROOT, Options, Section
from loadgen import ensure_wrk

REPORT_PATH = BENCH_DIR / 'last.md'
SECTIONS: dict[str, Callable[[Options], Section]] = {
    'e2e': e2e.measure,
    'batch': batch.measure_batch,
    'scale': batch.measure_scale,
    'handouts': handouts.measure,
}


def numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(',') if part)


def names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(part for part in text.split(',') if part)
    unknown = set(chosen) - set(allowed)
    if unknown:
        sys.exit(f'unknown {what} {sorted(unknown)}; choose from {", ".join(allowed)}')
    return chosen


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        help=f'which sections to run, of {", ".join(SECTIONS)}')
    parser.add_argument('--duration', type=float, default=4.0,
                        help='seconds per load point (handouts, batch)')
    parser.add_argument('--repeats', type=int, default=3,
                        help='repeats of each load point (handouts, batch)')
    parser.add_argument('--threads', type=int,
                        help="our server's threads per process (default: taskfarm-server's)")
    parser.add_argument('--workers', type=int,
                        help="our server's processes on PostgreSQL (default: taskfarm-server's)")
    parser.add_argument('--e2e-tasks', type=int, default=10**4)
    parser.add_argument('--e2e-repeats', type=int, default=3)
    parser.add_argument('--e2e-tools', default=','.join(e2e.TOOLS))
    parser.add_argument('--batch-connections',
                        default=','.join(map(str, batch.BATCH_CONNECTIONS)))
    parser.add_argument('--scale-tasks', type=int, default=batch.SCALE_TASKS)
    parser.add_argument('--connections', default=','.join(map(str, handouts.CONNECTIONS)),
                        help='connection counts of the handouts section')
    parser.add_argument('--servers', default=','.join(handouts.ALL_SERVERS),
                        help='servers of the handouts section')
    parser.add_argument('--scale', default=','.join(handouts.SCALE_SERVERS),
                        help='servers whose latency the handouts section measures at '
                             '10^4..10^6 tasks handed out (empty: none)')
    parser.add_argument('--loadgen', choices=('auto', 'wrk', 'python'), default='auto',
                        help='what sends the single hand-outs; auto: wrk if it is or can be '
                             'installed, else Python (cycles and batches always use Python)')
    parser.add_argument('--fill', choices=('sql', 'api'), default='sql',
                        help="hand out the handouts section's scale run with SQL (fast) "
                             'or through the API')
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


def options_from(args: argparse.Namespace, sections: Sequence[str]) -> Options:
    servers = names(args.servers, handouts.ALL_SERVERS, 'servers')
    return Options(
        duration=args.duration, repeats=args.repeats, threads=args.threads,
        workers=args.workers, connections=numbers(args.connections), servers=servers,
        scale_servers=tuple(n for n in names(args.scale, handouts.SCALE_SERVERS, 'servers')
                            if n in servers),
        fill=args.fill,
        loadgen=choose_loadgen(args.loadgen) if 'handouts' in sections else 'python',
        e2e_tasks=args.e2e_tasks, e2e_repeats=args.e2e_repeats,
        e2e_tools=names(args.e2e_tools, e2e.TOOLS, 'tools'),
        batch_connections=numbers(args.batch_connections), scale_tasks=args.scale_tasks,
    )


def report(sections: Sequence[Section], skipped: Sequence[str], seconds: float) -> str:
    machine = (f'Machine: {os.cpu_count()} cores, Python {platform.python_version()}, '
               f'{platform.system()} {platform.release()}; the whole run took '
               f'{seconds / 60:.1f} minutes.')
    lines = [f'# Taskfarm benchmark, {time.strftime("%Y-%m-%d %H:%M %Z")}', '', machine, '']
    for section in sections:
        lines += [f'## {section.title}', '', *section.lines, '']
    lines += ['## Targets (issue 11)', '']
    lines += [target.line() for section in sections for target in section.targets]
    if skipped:
        lines.append(f'- the targets of the sections not run ({", ".join(skipped)}) '
                     'are not listed')
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    chosen = names(args.sections, tuple(SECTIONS), 'sections')
    options = options_from(args, chosen)
    BENCH_DIR.mkdir(exist_ok=True)
    started = time.monotonic()
    sections = []
    for name in chosen:
        print(f'Section {name}...', flush=True)
        sections.append(SECTIONS[name](options))
    skipped = [name for name in SECTIONS if name not in chosen]
    text = report(sections, skipped, time.monotonic() - started)
    REPORT_PATH.write_text(text)
    print()
    print(text)
    print(f'(written to {REPORT_PATH.relative_to(REPO_ROOT)})')


if __name__ == '__main__':
    main()
