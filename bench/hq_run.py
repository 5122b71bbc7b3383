"""Run N tasks of one program through HyperQueue and print how long it took.

Runs inside HyperQueue's own venv (.bench/hq-venv), not ours:
    hq-venv/bin/python bench/hq_run.py --tasks N --cores 2 --server-dir DIR -- true
It starts a LocalCluster (a server and one worker of --cores cores, all on
this machine), builds one job of N tasks, each the program with no output
files, and times it from the submit until the job has ended. It prints one
JSON line: {"tasks": N, "seconds": s, "ok": true|false}. (Run it with
TQDM_DISABLE=1: HyperQueue's progress bar has no place in a timing.)
"""

from __future__ import annotations

import argparse
import json
import time

from hyperqueue import Job, LocalCluster
from hyperqueue.cluster import WorkerConfig


def build_job(tasks: int, program: list[str], workdir: str) -> Job:
    job = Job(default_workdir=workdir, max_fails=1)
    for _ in range(tasks):
        job.program(program, stdout=None, stderr=None)
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', type=int, required=True)
    parser.add_argument('--cores', type=int, required=True)
    parser.add_argument('--server-dir', required=True)
    parser.add_argument('program', nargs='+')
    args = parser.parse_args()
    with LocalCluster(server_dir=args.server_dir,
                      worker_config=WorkerConfig(cores=args.cores)) as cluster:
        client = cluster.client()
        job = build_job(args.tasks, args.program, args.server_dir)
        started = time.monotonic()
        submitted = client.submit(job)
        ok = client.wait_for_jobs([submitted], raise_on_error=False)
        seconds = time.monotonic() - started
    print(json.dumps({'tasks': args.tasks, 'seconds': seconds, 'ok': ok}), flush=True)


if __name__ == '__main__':
    main()
