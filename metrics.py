"""Prometheus metrics: the middleware that counts, and `GET /metrics`.

prometheus_client keeps the counters and histograms. With several server
processes on one socket (`taskfarm-server --workers N`) each process writes
its figures to files in a private directory (prometheus_client's
multiprocess mode), and a scrape, whichever process answers it, adds up the
files of all of them. The gauges of unfinished runs are read from the
database at each scrape: any process sees the same numbers.

Hand-outs and reports are counted from the answers of their routes (route
template, status and JSON body, as API.md defines them), so the resources
need not know about metrics. This module imports nothing of taskfarm.py.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import shutil
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import falcon
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from store import STATUSES, DatabaseUnavailable, Store

MULTIPROCESS_DIR = 'PROMETHEUS_MULTIPROC_DIR'
MAX_RUN_GAUGES = 1000       # unfinished runs shown, newest first
UNMATCHED = 'unmatched'     # the route label of a request that matched no route
METHODS = frozenset(falcon.COMBINED_METHODS)

# The routes whose answers count as hand-outs or reports, and their kind.
HANDOUTS = {('POST', '/api/runs/{uuid}/task'): 'single',
            ('POST', '/api/runs/{uuid}/tasks/claim'): 'batch'}
REPORTS = {('PUT', '/api/runs/{uuid}/tasks/{task_id:int}'): 'single',
           ('PATCH', '/api/runs/{uuid}/tasks'): 'batch'}

REPORT_RESULTS = ('ok', 'not held', 'unknown task')

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------------------
# Several processes.


@contextmanager
def shared_by(processes: int) -> Iterator[None]:
    """Around the fork of `processes` server processes: with more than one,
    each process's figures go to files in a private directory that every
    scrape adds up; the process that made the directory removes it."""
    if processes <= 1:
        yield
        return
    path = tempfile.mkdtemp(prefix='taskfarm-metrics-')
    os.environ[MULTIPROCESS_DIR] = path
    # prometheus_client chooses where values live when it is imported; now
    # that the directory is set, choose again (before any metric exists).
    values.ValueClass = values.get_value_class()
    maker = os.getpid()
    try:
        yield
    finally:
        if os.getpid() == maker:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# The figures.


class Metrics:
    """The counters of one server process, and what a scrape shows."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Counters' _created series would double each scrape and tell nothing
        # here (multiprocess mode has none anyway).
        disable_created_metrics()
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        # In multiprocess mode a scrape reads the files of every process, not a registry.
        self.registry = None if self.multiprocess else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            'taskfarm_http_requests', 'HTTP requests answered, by route template, method '
            'and status.', ('route', 'method', 'status'), registry=r)
        self.latency = Histogram(
            'taskfarm_http_request_duration_seconds', 'Time the app took to answer, by '
            'route template and method.', ('route', 'method'), registry=r)
        self.unavailable = Counter(
            'taskfarm_http_unavailable', 'Answers 503 Service Unavailable.', registry=r)
        self.database_errors = Counter(
            'taskfarm_database_errors', 'Requests and scrapes that found the database '
            'unavailable (after the reconnects of TASKFARM_DB_TIMEOUT).', registry=r)
        self.handout_requests = Counter(
            'taskfarm_handout_requests', 'Hand-out requests answered 2xx: single '
            '(POST .../task) or batch (POST .../tasks/claim).', ('kind',), registry=r)
        self.handed_out = Counter(
            'taskfarm_tasks_handed_out', 'Tasks in the answers of hand-outs (a repeated '
            'claim answers its tasks again).', ('kind',), registry=r)
        self.report_requests = Counter(
            'taskfarm_report_requests', 'Report requests answered: single (PUT a task), '
            'batch (PATCH .../tasks) or claim (the updates of a claim).', ('kind',),
            registry=r)
        self.reported = Counter(
            'taskfarm_tasks_reported', 'Task updates reported, by kind and result '
            '(ok, not held, unknown task).', ('kind', 'result'), registry=r)
        self.reports = {kind: Reports(self, kind) for kind in ('single', 'batch', 'claim')}
        self.routes: dict[tuple[str, str, int], RouteFigures] = {}
        self.runs = RunGauges(self)
        if self.registry is not None:
            self.registry.register(self.runs)

    def figures(self, route: str, method: str, status: int) -> RouteFigures:
        """The counters of one route, method and status, made once."""
        figures = self.routes.get((route, method, status))
        if figures is None:
            figures = RouteFigures(self, route, method, status)
            self.routes[route, method, status] = figures
        return figures

    def counting(self, handler: Callable) -> Callable:
        """An error handler for DatabaseUnavailable that counts, then answers as `handler`."""
        def count_then_handle(req: falcon.Request, resp: falcon.Response, ex: Exception,
                              params: dict) -> None:
            self.database_errors.inc()
            handler(req, resp, ex, params)
        return count_then_handle

    def scrape(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.runs)
        return generate_latest(registry)


class RouteFigures:
    """What one answer of a route with a method and status adds to the counters."""

    def __init__(self, metrics: Metrics, route: str, method: str, status: int) -> None:
        self.request = metrics.requests.labels(route, method, str(status))
        self.latency = metrics.latency.labels(route, method)
        self.unavailable = metrics.unavailable if status == 503 else None
        self.count_tasks = tasks_counter(metrics, (method, route), status)

    def add(self, resp: falcon.Response, seconds: float) -> None:
        self.request.inc()
        self.latency.observe(seconds)
        if self.unavailable is not None:
            self.unavailable.inc()
        if self.count_tasks is not None:
            self.count_tasks(resp.media)


def tasks_counter(metrics: Metrics, route: tuple[str, str],
                  status: int) -> Callable[[Any], None] | None:
    """What to count of an answer's body on a hand-out or report route, if anything."""
    if route in HANDOUTS and 200 <= status < 300:
        kind = HANDOUTS[route]
        requests, handed = metrics.handout_requests.labels(kind), metrics.handed_out.labels(kind)
        claim_reports = metrics.reports['claim']

        def count_handout(body: Any) -> None:
            requests.inc()
            if kind == 'single':
                if body:    # 201 with a task; a 204 has none
                    handed.inc()
                return
            handed.inc(len(body['data']))
            if 'updates' in body:
                claim_reports.count(item['result'] for item in body['updates'])
        return count_handout
    if route in REPORTS and status in (200, 204, 409):
        reports = metrics.reports[REPORTS[route]]
        if status == 200:
            return lambda body: reports.count(item['result'] for item in body['updates'])
        result = 'not held' if status == 409 else 'ok'
        return lambda body: reports.one(result)
    return None


class Reports:
    """The counters of one kind of report, looked up once: labels() costs microseconds."""

    def __init__(self, metrics: Metrics, kind: str) -> None:
        self.kind = kind
        self.reported = metrics.reported
        self.requests = metrics.report_requests.labels(kind)
        self.results = {result: self.reported.labels(kind, result) for result in REPORT_RESULTS}

    def one(self, result: str) -> None:
        self.requests.inc()
        self.results[result].inc()

    def count(self, results: Iterable[str]) -> None:
        self.requests.inc()
        for result, count in Tally(results).items():
            counter = self.results.get(result) or self.reported.labels(self.kind, result)
            counter.inc(count)


class RunGauges:
    """The tasks of each unfinished run by status, read from the database at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily('taskfarm_database_up',
                               '1 if this scrape could read the runs from the database.')
        runs = GaugeMetricFamily(
            'taskfarm_run_tasks', 'Tasks of each unfinished run (done + failed < numTasks) '
            f'by status; the newest {MAX_RUN_GAUGES} such runs.', labels=('run', 'status'))
        try:
            rows = self.metrics.store.unfinished_runs(MAX_RUN_GAUGES)
        except DatabaseUnavailable:
            self.metrics.database_errors.inc()
            up.add_metric([], 0)
            yield up
            return
        for row in rows:
            waiting = row['num_tasks'] - row['computing'] - row['done'] - row['failed']
            counts = dict(zip(STATUSES, (waiting, row['computing'], row['done'],
                                         row['failed']), strict=True))
            for status, count in counts.items():
                runs.add_metric([row['uuid'], status], count)
        up.add_metric([], 1)
        yield up
        yield runs


# ---------------------------------------------------------------------------
# Counting every request: first in, last out of the middleware.


class MetricsMiddleware:
    """Counts every answer by route template (not path: labels stay few), method
    and status, with its latency, and the hand-outs and reports in it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, req_succeeded: bool) -> None:
        started = req.context.get('metrics_started')
        if started is None:
            return
        method = req.method if req.method in METHODS else 'OTHER'
        figures = self.metrics.figures(req.uri_template or UNMATCHED, method, resp.status_code)
        figures.add(resp, time.perf_counter() - started)


# ---------------------------------------------------------------------------
# GET /metrics, for the addresses the admin allows or with the token.


class MetricsAccess:
    """Who may scrape: a client at an allowed address, or one with the bearer token.

    A request forwarded by a proxy that the server does not trust (it has
    X-Forwarded-For, yet its client's address is the peer's) never passes
    by address: behind a proxy on the same host, every request would seem
    to come from the loopback.
    """

    def __init__(self, allowed: tuple[IPNetwork, ...], token: str | None,
                 client_address: Callable[[falcon.Request], str]) -> None:
        self.allowed = allowed
        self.token = token
        self.client_address = client_address

    def check(self, req: falcon.Request) -> None:
        authorization = req.get_header('Authorization') or ''
        if authorization[:7].lower() == 'bearer ':
            if self.token and hmac.compare_digest(authorization[7:].strip().encode(),
                                                  self.token.encode()):
                return
            raise self.unauthorized('The bearer token is not the metrics token.')
        if self.allowed_address(req):
            return
        if self.token:
            raise self.unauthorized('Send the metrics token: Authorization: Bearer TOKEN.')
        raise falcon.HTTPForbidden(
            title='Metrics not allowed',
            description='Metrics are served only to the addresses in TASKFARM_METRICS_ALLOW '
                        '(default: loopback) or with TASKFARM_METRICS_TOKEN.')

    def allowed_address(self, req: falcon.Request) -> bool:
        address = self.client_address(req)
        if req.get_header('X-Forwarded-For') is not None and address == req.remote_addr:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allowed)

    @staticmethod
    def unauthorized(description: str) -> falcon.HTTPUnauthorized:
        return falcon.HTTPUnauthorized(title='Metrics token required', description=description,
                                       challenges=['Bearer realm="taskfarm-metrics"'])


class MetricsResource:
    """GET /metrics: Prometheus's text format."""

    auth_required = False       # MetricsAccess decides, not the API's users

    def __init__(self, metrics: Metrics, access: MetricsAccess) -> None:
        self.metrics = metrics
        self.access = access

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.access.check(req)
        resp.content_type = CONTENT_TYPE_LATEST
        resp.cache_control = ['no-store']
        resp.data = self.metrics.scrape()
