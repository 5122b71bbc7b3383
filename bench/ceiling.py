"""The ceiling: a bare Falcon app that answers like a task server and does
nothing, served exactly as ours is. `python bench/ceiling.py --port P`."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

from common import serve_with_waitress

DEFAULT_THREADS = 8  # taskfarm-server's default
DEFAULT_WORKERS = 2


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS)
    parser.add_argument('--workers', type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    serve_with_waitress(create_ceiling_app, args.port, args.threads, args.workers,
                        'bare Falcon ceiling')


if __name__ == '__main__':
    main()
