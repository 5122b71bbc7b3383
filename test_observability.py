"""Seeing inside the server: GET /metrics (Prometheus) and GET /api/openapi.json.

Metrics are checked through webtest for what each request adds, and on
live servers of two processes for figures that add up across processes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import falcon.inspect
import pytest
import requests
import schemathesis
import webtest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import taskfarm

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not (yet) shown, as Prometheus reads a missing counter."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (sample, sample_labels), v in samples.items()
               if sample == name and wanted <= set(sample_labels))


def scrape(client: webtest.TestApp, **kwargs: Any) -> Samples:
    reply = client.get('/metrics', **kwargs)
    assert reply.content_type == 'text/plain', reply.headers
    return parse_metrics(reply.text)


@pytest.fixture
def local(app) -> webtest.TestApp:
    """An anonymous client on the loopback, where metrics are allowed by default."""
    return webtest.TestApp(app, extra_environ={'REMOTE_ADDR': '127.0.0.1'})


# ---------------------------------------------------------------------------
# What each request adds.


def test_metrics_count_requests_by_route_template_method_and_status(alice, local):
    run = alice.create_run(3)['uuid']
    alice.get(f'/api/runs/{run}')
    alice.get(f'/api/runs/{run}')
    alice.get(f'/api/runs/{"0" * 32}', status=404)
    alice.get('/api/no/such/route', status=404)
    samples = scrape(local)

    route = '/api/runs/{uuid}'
    assert value(samples, 'taskfarm_http_requests_total', route=route, method='GET',
                 status='200') == 2
    assert value(samples, 'taskfarm_http_requests_total', route=route, method='GET',
                 status='404') == 1
    assert value(samples, 'taskfarm_http_requests_total', route='/api/run', method='POST',
                 status='201') == 1
    # A path that matches no route is one label, whatever the path: labels stay few.
    assert value(samples, 'taskfarm_http_requests_total', route='unmatched', method='GET',
                 status='404') == 1
    assert not any(run in dict(labels).get('route', '') for _, labels in samples)
    assert value(samples, 'taskfarm_http_request_duration_seconds_count', route=route,
                 method='GET') == 3
    assert value(samples, 'taskfarm_http_request_duration_seconds_bucket', route=route,
                 method='GET', le='+Inf') == 3
    assert value(samples, 'taskfarm_http_request_duration_seconds_sum', route=route,
                 method='GET') > 0


def test_metrics_count_handouts_and_reports_single_and_batch(alice, local):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    assert alice.claim(run, worker).json['task'] == 0
    claimed = alice.claim_tasks(run, worker, count=3,
                                updates=[{'task': 0, 'status': 'done'}]).json
    assert [task['task'] for task in claimed['data']] == [1, 2, 3]
    alice.put_task(run, 1, {'status': 'done', 'worker_uuid': worker})
    alice.put_task(run, 5, {'status': 'done', 'worker_uuid': worker}, status=409)
    alice.patch_json(f'/api/runs/{run}/tasks', {'worker_uuid': worker, 'updates': [
        {'task': 2, 'status': 'done'}, {'task': 3, 'percentCompleted': 50},
        {'task': 6, 'status': 'done'}, {'task': 99, 'status': 'done'}]}, status=200)
    alice.claim_tasks(run, worker, count=1000)      # the 6 tasks left
    alice.claim(run, worker, status=204)            # nothing left
    alice.claim_tasks(run, worker, count=1, updates={'bad': 1}, status=400)
    samples = scrape(local)

    assert value(samples, 'taskfarm_handout_requests_total', kind='single') == 2
    assert value(samples, 'taskfarm_handout_requests_total', kind='batch') == 2
    assert value(samples, 'taskfarm_tasks_handed_out_total', kind='single') == 1
    assert value(samples, 'taskfarm_tasks_handed_out_total', kind='batch') == 3 + 6
    assert value(samples, 'taskfarm_report_requests_total', kind='single') == 2
    assert value(samples, 'taskfarm_report_requests_total', kind='batch') == 1
    assert value(samples, 'taskfarm_report_requests_total', kind='claim') == 1
    reported = {(kind, result): value(samples, 'taskfarm_tasks_reported_total', kind=kind,
                                      result=result)
                for kind in ('single', 'batch', 'claim')
                for result in ('ok', 'not held', 'unknown task')}
    assert {key: n for key, n in reported.items() if n} == {
        ('single', 'ok'): 1, ('single', 'not held'): 1, ('batch', 'ok'): 2,
        ('batch', 'not held'): 1, ('batch', 'unknown task'): 1, ('claim', 'ok'): 1}


def test_metrics_show_the_counts_of_unfinished_runs_only(alice, bob, local):
    finished = alice.create_run(2)['uuid']
    for task in range(2):
        alice.put_task(finished, task, {'status': 'done' if task else 'failed'})
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=4)
    alice.put_task(run, 0, {'status': 'done'})
    alice.put_task(run, 1, {'status': 'failed'})
    others = bob.create_run(7)['uuid']      # every user's runs: metrics are the admin's view
    samples = scrape(local)

    def counts(uuid: str) -> dict[str, float]:
        return {status: value(samples, 'taskfarm_run_tasks', run=uuid, status=status)
                for status in ('waiting', 'computing', 'done', 'failed')}

    assert counts(run) == {'waiting': 6, 'computing': 2, 'done': 1, 'failed': 1}
    assert counts(others) == {'waiting': 7, 'computing': 0, 'done': 0, 'failed': 0}
    assert total(samples, 'taskfarm_run_tasks', run=finished) == 0
    assert {dict(labels)['run'] for name, labels in samples if name == 'taskfarm_run_tasks'
            } == {run, others}
    assert value(samples, 'taskfarm_database_up') == 1
    info = alice.run_info(run)
    assert (info['numWaiting'], info['numComputing']) == (6, 2)


def test_metrics_count_503s_and_database_errors_of_a_locked_sqlite_database(
        sqlite_database_url, passwords):
    config = taskfarm.Config(database_url=sqlite_database_url, secret='s', db_timeout=0.3)
    store = taskfarm.open_store(config)
    app = taskfarm.create_app(store, config)
    client = webtest.TestApp(app, extra_environ={'REMOTE_ADDR': '127.0.0.1'})
    client.authorization = ('Basic', ('alice', passwords['alice']))
    client.get('/api/runs')             # signed in before the lock: users are cached
    locker = sqlite3.connect(sqlite_database_url[len('sqlite:///'):], isolation_level=None)
    try:
        locker.execute('BEGIN EXCLUSIVE')
        reply = client.post_json('/api/run', {'numTasks': 3}, status=503)
        assert reply.json['title'] == 'Database unavailable'
        samples = scrape(client)        # readers do not wait for the writer (WAL)
    finally:
        locker.close()
        store.close()
    assert value(samples, 'taskfarm_database_errors_total') == 1
    assert value(samples, 'taskfarm_http_unavailable_total') == 1
    assert value(samples, 'taskfarm_http_requests_total', route='/api/run', method='POST',
                 status='503') == 1
    assert value(samples, 'taskfarm_database_up') == 1


# ---------------------------------------------------------------------------
# Who may scrape.


def metrics_app(tf_store, database_url: str, **settings: Any) -> Any:
    config = taskfarm.Config(database_url=database_url, secret='s', **settings)
    return taskfarm.create_app(tf_store, config)


def from_address(app: Any, address: str, **headers: str) -> webtest.TestApp:
    environ = {'REMOTE_ADDR': address}
    environ.update({'HTTP_' + name.upper().replace('-', '_'): v for name, v in headers.items()})
    return webtest.TestApp(app, extra_environ=environ)


def test_metrics_are_served_to_the_loopback_only_by_default(app, passwords):
    assert from_address(app, '127.0.0.1').get('/metrics').status_int == 200
    assert from_address(app, '::1').get('/metrics').status_int == 200
    refused = from_address(app, '192.0.2.7').get('/metrics', status=403)
    assert refused.content_type == 'application/json'
    assert 'TASKFARM_METRICS_ALLOW' in refused.json['description']
    # A proxy on this host that the server does not trust: its clients are not local.
    from_address(app, '127.0.0.1', x_forwarded_for='203.0.113.5').get('/metrics', status=403)
    # Signing in as an API user, even an admin, is not a way in.
    admin = from_address(app, '192.0.2.7')
    admin.authorization = ('Basic', ('root', passwords['root']))
    admin.get('/metrics', status=403)


def test_metrics_are_served_to_the_allowed_networks_and_behind_trusted_proxies(
        tf_store, database_url):
    app = metrics_app(tf_store, database_url,
                      metrics_allow=taskfarm.trusted_networks('10.1.0.0/16, 192.0.2.7'),
                      trusted_proxies=taskfarm.trusted_networks('198.51.100.1'))
    assert from_address(app, '10.1.2.3').get('/metrics').status_int == 200
    assert from_address(app, '192.0.2.7').get('/metrics').status_int == 200
    from_address(app, '127.0.0.1').get('/metrics', status=403)
    proxy = '198.51.100.1'
    assert from_address(app, proxy, x_forwarded_for='10.1.9.9').get('/metrics').status_int == 200
    from_address(app, proxy, x_forwarded_for='203.0.113.5').get('/metrics', status=403)


def test_metrics_token_lets_any_address_scrape(tf_store, database_url):
    app = metrics_app(tf_store, database_url, metrics_token='scrape-me', metrics_allow=())
    outside = from_address(app, '203.0.113.5')
    missing = outside.get('/metrics', status=401)
    assert missing.headers['WWW-Authenticate'] == 'Bearer realm="taskfarm-metrics"'
    assert missing.json['title'] == 'Metrics token required'
    outside.get('/metrics', headers={'Authorization': 'Bearer wrong'}, status=401)
    outside.get('/metrics', headers={'Authorization': 'Bearer scrape-mf'}, status=401)
    scraped = outside.get('/metrics', headers={'Authorization': 'Bearer scrape-me'})
    assert 'taskfarm_database_up 1.0' in scraped.text
    # With no address allowed, the loopback needs the token too.
    from_address(app, '127.0.0.1').get('/metrics', status=401)


def test_metrics_settings_come_from_the_environment():
    config = taskfarm.Config.from_env({'TASKFARM_METRICS_ALLOW': '10.0.0.0/8,::1',
                                       'TASKFARM_METRICS_TOKEN': 'tok'})
    assert [str(net) for net in config.metrics_allow] == ['10.0.0.0/8', '::1/128']
    assert config.metrics_token == 'tok'
    default = taskfarm.Config.from_env({})
    assert [str(net) for net in default.metrics_allow] == ['127.0.0.0/8', '::1/128']
    assert default.metrics_token is None
    assert taskfarm.Config.from_env({'TASKFARM_METRICS_ALLOW': ''}).metrics_allow == ()


# ---------------------------------------------------------------------------
# Several server processes.


def http(server: Any, method: str, path: str, body: Any = None,
         signed_in: bool = True) -> tuple[int, Any]:
    """One request to a live server, on a new connection, as its user or as nobody:
    (status, JSON body or text)."""
    headers = {'Content-Type': 'application/json'}
    if signed_in:
        credentials = f'{server.user}:{server.password}'.encode()
        headers['Authorization'] = 'Basic ' + base64.b64encode(credentials).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, raw, kind = reply.status, reply.read(), reply.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get_content_type()
    if kind == 'application/json' and raw:
        return status, json.loads(raw)
    return status, raw.decode()


def metrics_files(server_pid: int) -> list[Path]:
    """The counter files of the server's processes, found through their open files."""
    files = set()
    for pid in [server_pid, *children_of(server_pid)]:
        for fd in Path(f'/proc/{pid}/fd').iterdir():
            try:
                target = Path(os.readlink(fd))
            except FileNotFoundError:
                continue    # closed meanwhile: a connection, not a metrics file
            if target.name.startswith('counter_') and target.parent.name.startswith(
                    'taskfarm-metrics-'):
                files.add(target)
    return sorted(files)


def children_of(pid: int) -> list[int]:
    text = Path(f'/proc/{pid}/task/{pid}/children').read_text()
    return [int(child) for child in text.split()]


def handed_out_in(path: Path) -> float:
    """The tasks handed out by the one process that writes this file."""
    return sum(sample.value for metric in MultiProcessCollector.merge([str(path)])
               for sample in metric.samples if sample.name == 'taskfarm_tasks_handed_out_total')


@pytest.mark.skipif(not Path('/proc/self/task').exists(), reason='needs Linux /proc')
def test_two_processes_add_up_their_handouts_in_every_scrape(servers):
    server = servers(workers=2)
    num_tasks = 240
    status, run = http(server, 'POST', '/api/run', {'numTasks': num_tasks})
    assert status == 201
    uuid = run['uuid']
    handed = {'single': 0, 'batch': 0, 'unavailable': 0}
    lock = threading.Lock()

    def call(path: str, method: str, body: Any) -> tuple[int, Any]:
        """As a worker does: a 503 (a deadlock lost three times) is tried again."""
        for _ in range(50):
            status, reply = http(server, method, f'/api/{path}', body)
            if status != 503:
                return status, reply
            with lock:
                handed['unavailable'] += 1
            time.sleep(0.05)    # pacing the retries, as a worker would
        raise AssertionError(f'{method} {path}: 503 fifty times')

    def worker(index: int) -> None:
        me = uuid4().hex
        assert call('worker', 'POST', {'uuid': me, 'hostname': 'h', 'pid': index})[0] == 201
        held: list[int] = []
        for _ in range(num_tasks):          # bounded: each round takes a task or ends
            if index % 2:
                status, body = call(f'runs/{uuid}/task', 'POST', {'worker_uuid': me})
                tasks, kind = ([body['task']] if status == 201 else []), 'single'
                for task in held:
                    assert call(f'runs/{uuid}/tasks/{task}', 'PUT',
                                {'status': 'done', 'worker_uuid': me})[0] == 204
            else:
                status, body = call(f'runs/{uuid}/tasks/claim', 'POST', {
                    'worker_uuid': me, 'count': 5,
                    'updates': [{'task': task, 'status': 'done'} for task in held]})
                assert status == 200, body
                tasks, kind = [task['task'] for task in body['data']], 'batch'
            assert status in (200, 201, 204), body
            with lock:
                handed[kind] += len(tasks)
            held = tasks
            if not tasks:
                return

    samples_during: list[Samples] = []

    def scraper() -> None:
        for _ in range(20):
            status, text = http(server, 'GET', '/metrics', signed_in=False)
            assert status == 200
            samples_during.append(parse_metrics(text))

    with ThreadPoolExecutor(max_workers=9) as pool:
        done = [pool.submit(worker, index) for index in range(8)] + [pool.submit(scraper)]
        for future in done:
            future.result(timeout=120)

    assert handed['single'] + handed['batch'] == num_tasks
    # Counters only grow, whichever process answered each scrape.
    seen = [total(s, 'taskfarm_tasks_handed_out_total') for s in samples_during]
    assert seen == sorted(seen) and seen[-1] <= num_tasks, seen
    for _ in range(4):      # whichever process answers, the figures are everyone's
        status, text = http(server, 'GET', '/metrics', signed_in=False)
        samples = parse_metrics(text)
        for kind in ('single', 'batch'):
            assert value(samples, 'taskfarm_tasks_handed_out_total', kind=kind) == handed[kind]
        assert total(samples, 'taskfarm_tasks_reported_total', result='ok') == num_tasks
        assert total(samples, 'taskfarm_run_tasks', run=uuid) == 0     # finished
        assert value(samples, 'taskfarm_http_unavailable_total') == handed['unavailable']
        assert value(samples, 'taskfarm_database_errors_total') == handed['unavailable']
    # Each process wrote its own share, and both had one.
    files = metrics_files(server.process.pid)
    assert len(files) == 2, files
    per_process = [handed_out_in(path) for path in files]
    assert sum(per_process) == num_tasks and all(per_process), per_process


def test_the_server_removes_its_metrics_directory_when_stopped(servers):
    server = servers(workers=2)
    assert http(server, 'GET', '/api/runs')[0] == 200
    directory = metrics_files(server.process.pid)[0].parent
    assert directory.is_dir()
    server.stop()
    assert not directory.exists()


# ---------------------------------------------------------------------------
# Errors of Falcon's own (found by schemathesis: they had no description).


def test_paths_without_a_route_and_methods_a_route_lacks_answer_a_described_json_error(alice):
    unknown = alice.get('/api/runs/abc/tasks/not-a-number', status=404)
    assert unknown.content_type == 'application/json'
    assert unknown.json == {
        'title': '404 Not Found',
        'description': "No route '/api/runs/abc/tasks/not-a-number'; the API is described at "
                       '/api/openapi.json.'}
    refused = alice.delete('/api/runs', status=405)
    assert refused.json == {'title': '405 Method Not Allowed',
                            'description': 'This route does not take DELETE; it takes GET, '
                                           'POST, OPTIONS.'}
    assert refused.headers['Allow'] == 'GET, POST, OPTIONS'
    # The API's own errors keep their words.
    assert alice.get(f'/api/runs/{"0" * 32}', status=404).json['title'] == 'Unknown run'


# ---------------------------------------------------------------------------
# The OpenAPI document.


def openapi_document() -> dict:
    return json.loads(taskfarm.openapi_path().read_text(encoding='utf-8'))


def test_openapi_document_is_valid_openapi_3_1():
    document = openapi_document()
    assert document['openapi'].startswith('3.1')
    validate(document, cls=OpenAPIV31SpecValidator)
    assert document['info']['version'] == taskfarm.__version__


def test_openapi_document_is_served_as_is_without_auth(app):
    reply = webtest.TestApp(app).get('/api/openapi.json')
    assert reply.content_type == 'application/json'
    assert reply.body == taskfarm.openapi_path().read_bytes()


def registered_routes(app: Any) -> set[tuple[str, str]]:
    """(method, route template) of every responder of the app's, but Falcon's
    own (OPTIONS, and the 405 of every method a route lacks)."""
    return {(method.method, route.path) for route in falcon.inspect.inspect_routes(app)
            for method in route.methods if not method.internal}


def documented_routes(document: dict) -> set[tuple[str, str]]:
    methods = {'get', 'put', 'post', 'delete', 'patch', 'head', 'options'}
    return {(method.upper(), path) for path, item in document['paths'].items()
            for method in item if method in methods}


def test_openapi_document_has_every_route_of_the_app_and_no_other(app):
    def plain(template: str) -> str:    # Falcon's converters are not OpenAPI's
        return re.sub(r'\{(\w+):[^}]*\}', r'{\1}', template)

    registered = {(method, plain(template)) for method, template in registered_routes(app)}
    assert ('PUT', '/api/runs/{uuid}/tasks/{task_id}') in registered
    assert registered == documented_routes(openapi_document())


# ---------------------------------------------------------------------------
# schemathesis against a live server: every answer keeps to the document.

FUZZ_EXAMPLES = 60      # per operation and generation mode: a few minutes in all on CI


@dataclass
class Known:
    """Runs, tasks and a worker that exist, so that generated requests reach past 404."""
    runs: list[str]
    worker: str
    tasks: range


def seed_known(server: Any) -> Known:
    """Runs of the server's user in several states (tasks handed out, done and failed;
    inputs awaited, inputs complete) and a worker of theirs."""
    def call(method: str, path: str, body: Any) -> Any:
        status, reply = http(server, method, '/api/' + path, body)
        assert status in (200, 201), reply
        return reply

    worker = uuid4().hex
    call('POST', 'worker', {'uuid': worker, 'hostname': 'fuzz', 'pid': 1})
    busy = call('POST', 'run', {'numTasks': 6, 'timeout': 600, 'retries': 1, 'maxFailures': 3,
                                'name': 'fuzzed'})['uuid']
    call('POST', f'runs/{busy}/tasks/claim', {'worker_uuid': worker, 'count': 4})
    call('PATCH', f'runs/{busy}/tasks', {'worker_uuid': worker, 'updates': [
        {'task': 0, 'status': 'done', 'percentCompleted': 100},
        {'task': 1, 'status': 'failed', 'exitCode': 2, 'message': 'boom'}]})
    # Room for any chunk of inputs, and a run whose inputs are all stored (409).
    awaiting = call('POST', 'run', {'numTasks': 2**31 - 1, 'inputs': 'json'})['uuid']
    complete = call('POST', 'run', {'numTasks': 2, 'inputs': 'text'})['uuid']
    call('PUT', f'runs/{complete}/inputs', {'first': 0, 'inputs': ['a', 'b']})
    return Known(runs=[busy, awaiting, complete], worker=worker, tasks=range(6))


def case_strategies(operation: Any, known: Known, mode: Any) -> Any:
    """The operation's cases as schemathesis makes them, and as many again on known runs,
    tasks and workers."""
    path = operation.path
    fixed: list[dict] = []
    if path.startswith('/api/workers/{uuid}'):
        fixed = [{'uuid': known.worker}]
    elif '{uuid}' in path:
        fixed = [{'uuid': run} for run in known.runs]
        for name in ('task_id', 'task'):    # the API's, the dashboard's
            if f'{{{name}}}' in path:
                fixed = [{**f, name: task} for f in fixed for task in known.tasks]
    strategies = [operation.as_strategy(generation_mode=mode)]
    if fixed:
        strategies.append(st.sampled_from(fixed).flatmap(
            lambda given: operation.as_strategy(generation_mode=mode, path_parameters=given)))
    return st.one_of(strategies)


def like_a_worker(case: Any, worker: str | None) -> None:
    """A positive case, still valid, made more like a worker's request: its whole
    numbers written as integers (schemathesis also writes the integer 2 as 2.0,
    which JSON Schema takes for an integer and this API refuses, as API.md says:
    those cases would only get 400s), and its worker_uuid `worker`, if given."""
    if isinstance(case.body, dict | list):
        case.body = whole_numbers_as_integers(case.body)
    if worker and isinstance(case.body, dict) and isinstance(case.body.get('worker_uuid'), str):
        case.body['worker_uuid'] = worker


def whole_numbers_as_integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers_as_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers_as_integers(item) for item in value]
    return value


def fuzz(operation: Any, known: Known, mode: Any, call: dict, statuses: Tally) -> None:
    """FUZZ_EXAMPLES cases of one operation in one mode, each sent and checked;
    derandomized, so CI sends the same requests every time. Counts the statuses."""
    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=case_strategies(operation, known, mode),
           worker=st.sampled_from([None, known.worker]))
    def keeps_to_the_document(case: Any, worker: str | None) -> None:
        if mode.is_positive:
            like_a_worker(case, worker)
        statuses[case.call_and_validate(**call).status_code] += 1

    keeps_to_the_document()


def test_schemathesis_finds_no_answer_off_the_document(live_server):
    """Every operation of the document, positive and negative cases: no 5xx, every
    status documented, every body of the documented type and schema."""
    session = requests.Session()
    session.auth = (live_server.user, live_server.password)
    call = {'base_url': live_server.url, 'session': session, 'allow_redirects': False,
            'timeout': 30, 'checks': [not_a_server_error, status_code_conformance,
                                      content_type_conformance, response_schema_conformance]}
    schema = schemathesis.openapi.from_url(live_server.url + '/api/openapi.json')
    failures: list[str] = []
    succeeded: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        known = seed_known(live_server)
        modes = [schemathesis.GenerationMode.POSITIVE]
        if any(operation.iter_parameters()) or operation.body:
            modes.append(schemathesis.GenerationMode.NEGATIVE)    # something to get wrong
        statuses = Tally()
        for mode in modes:
            try:
                fuzz(operation, known, mode, call, statuses)
            except (Exception, FailureGroup) as e:      # every operation gets its turn
                failures.append(f'{operation.label} ({mode.value}): {e}')
        succeeded[operation.label] = sum(n for status, n in statuses.items() if status < 300)
    assert not failures, '\n\n'.join(failures)
    # Real requests, not only refusals: every operation succeeded at times, but
    # the dashboard's forms, which need the token of a page seen in a browser.
    assert [label for label, n in succeeded.items() if not n] == [
        'POST /runs/{uuid}/restart', 'POST /runs/{uuid}/delete'], succeeded
