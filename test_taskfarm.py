"""The API contract (shared/API.md) through webtest, on sqlite and PostgreSQL,
and the original client `taskfarm-worker` 0.4.0 against a live server."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import store
import taskfarm

UNKNOWN_RUN = '0' * 32


def assert_counts_add_up(info: dict) -> None:
    parts = info['numWaiting'] + info['numComputing'] + info['numDone'] + info['numFailed']
    assert parts == info['numTasks']


# ---------------------------------------------------------------------------
# Index, auth and tokens.


def test_index_is_public_html_with_version(app):
    import webtest

    page = webtest.TestApp(app).get('/', status=200)
    assert page.content_type == 'text/html'
    assert 'Taskfarm Server' in page.text and taskfarm.__version__ in page.text


@pytest.mark.parametrize('header', [
    None, 'Basic ' + base64.b64encode(b'alice:wrong').decode(),
    'Basic ' + base64.b64encode(b'nobody:x').decode(), 'Basic !!!notbase64',
    'Bearer abc', 'Basic ' + base64.b64encode(b'no-colon').decode(),
    'Basic ' + base64.b64encode(b'\xff\xfe:x').decode(),
])
def test_bad_credentials_get_401_with_basic_challenge(app, header):
    import webtest

    client = webtest.TestApp(app)
    headers = {'Authorization': header} if header else {}
    resp = client.get('/api/runs', headers=headers, status=401)
    assert resp.headers['WWW-Authenticate'] == 'Basic realm="taskfarm"'
    assert resp.json['title']


def test_token_works_as_user_name_with_any_password(app, alice):
    import webtest

    token = alice.get('/api/token', status=200).json['token']
    client = webtest.TestApp(app)
    for password in ('', 'anything'):
        client.authorization = ('Basic', (token, password))
        assert client.get('/api/runs', status=200).json == {'data': []}


def test_tampered_token_gets_401(app, alice):
    import webtest

    token = alice.get('/api/token').json['token']
    forged = token.replace('tf1.1.', 'tf1.2.', 1)
    client = webtest.TestApp(app)
    client.authorization = ('Basic', (forged, ''))
    client.get('/api/runs', status=401)


# ---------------------------------------------------------------------------
# Runs.


def test_create_run_answers_201_with_id_uuid_and_numtasks(alice):
    run = alice.create_run(10)
    assert set(run) == {'id', 'uuid', 'numTasks'}
    assert run['numTasks'] == 10 and len(run['uuid']) == 32
    assert int(run['uuid'], 16) >= 0 and run['uuid'] == run['uuid'].lower()


def test_new_run_counts_every_task_as_waiting(alice):
    run = alice.create_run(10)
    info = alice.run_info(run['uuid'])
    assert info == {'id': run['id'], 'uuid': run['uuid'], 'numTasks': 10, 'name': None,
                    'timeout': None, 'maxAttempts': None, 'retries': None,
                    'maxFailures': None, 'stopped': False, 'percentDone': 0.0,
                    'numWaiting': 10, 'numComputing': 0, 'numDone': 0, 'numFailed': 0}


def test_run_of_a_billion_tasks_writes_no_task_rows(alice, db):
    run = alice.create_run(10**9)
    assert alice.run_info(run['uuid'])['numWaiting'] == 10**9
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


def test_runs_are_listed_oldest_first(alice):
    first, second = alice.create_run(3), alice.create_run(5, name='sweep')
    data = alice.get('/api/runs').json['data']
    assert [r['uuid'] for r in data] == [first['uuid'], second['uuid']]
    assert data[1] == {'id': second['id'], 'uuid': second['uuid'], 'numTasks': 5,
                       'name': 'sweep'}


@pytest.mark.parametrize('info', ['percentDone', 'numWaiting', 'numDone', 'numComputing',
                                  'numFailed'])
def test_run_info_query_answers_one_value(alice, info):
    run = alice.create_run(4)
    assert alice.get(f"/api/runs/{run['uuid']}", {'info': info}).json == {
        info: alice.run_info(run['uuid'])[info]}


def test_unknown_run_or_info_is_404(alice):
    run = alice.create_run(4)
    alice.get(f'/api/runs/{UNKNOWN_RUN}', status=404)
    alice.get('/api/runs/not-a-uuid', status=404)
    assert alice.get(f"/api/runs/{run['uuid']}", {'info': 'bogus'}, status=404).json['title']


def test_delete_run_removes_it_and_its_tasks(alice, db):
    run = alice.create_run(4)
    worker = alice.register_worker()
    alice.claim(run['uuid'], worker)
    alice.delete(f"/api/runs/{run['uuid']}", status=204)
    alice.get(f"/api/runs/{run['uuid']}", status=404)
    alice.delete(f"/api/runs/{run['uuid']}", status=404)
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


# ---------------------------------------------------------------------------
# Hand-out.


def test_handout_goes_in_order_then_answers_204(alice):
    run = alice.create_run(3)
    worker = alice.register_worker()
    handed = [alice.claim(run['uuid'], worker).json for _ in range(3)]
    assert [t['task'] for t in handed] == [0, 1, 2]
    assert handed[0] == {'id': handed[0]['id'], 'task': 0, 'percentCompleted': 0.0,
                         'status': 'computing', 'attempts': 1, 'failures': 0,
                         'message': None, 'exitCode': None}
    resp = alice.claim(run['uuid'], worker, status=204)
    assert resp.body == b''
    info = alice.run_info(run['uuid'])
    assert (info['numComputing'], info['numWaiting']) == (3, 0)


def test_handout_prefers_waiting_rows_lowest_first(alice):
    run = alice.create_run(10)
    worker = alice.register_worker()
    for _ in range(4):
        alice.claim(run['uuid'], worker)
    alice.put_task(run['uuid'], 3, {'status': 'waiting'})
    alice.put_task(run['uuid'], 1, {'status': 'waiting'})
    alice.put_task(run['uuid'], 7, {'percentCompleted': 5})    # a never-handed task
    order = [alice.claim(run['uuid'], worker).json['task'] for _ in range(4)]
    assert order == [1, 3, 7, 4]


def test_handout_steps_over_tasks_a_put_finished(alice):
    run = alice.create_run(4)
    worker = alice.register_worker()
    alice.put_task(run['uuid'], 0, {'status': 'done'})
    alice.put_task(run['uuid'], 1, {'status': 'failed'})
    assert [alice.claim(run['uuid'], worker).json['task'] for _ in range(2)] == [2, 3]
    alice.claim(run['uuid'], worker, status=204)


def test_single_handout_and_puts_send_one_statement_each_with_no_transaction(
        alice, db, monkeypatch):
    """The hot paths: a hand-out and each PUT, with a worker or without, are one
    statement on its own (no BEGIN and COMMIT around it: two more round trips).
    sqlite's hand-out is its steps in one transaction (one writer anyway)."""
    run = alice.create_run(4)['uuid']
    worker = alice.register_worker()
    alice.claim(run, worker)
    sent = []
    real_run, real_run_on = db.run, db.run_on

    def run_spied(work, atomic=True):
        sent.append({'atomic': atomic, 'statements': 0})
        return real_run(work, atomic)

    def run_on_spied(conn, sql, params):
        sent[-1]['statements'] += 1
        return real_run_on(conn, sql, params)

    monkeypatch.setattr(db, 'run', run_spied)
    monkeypatch.setattr(db, 'run_on', run_on_spied)
    one_statement = [{'atomic': False, 'statements': 1}]
    requests = {
        'progress': lambda: alice.put_task(run, 0, {'percentCompleted': 50}),
        'progress of the worker': lambda: alice.put_task(
            run, 0, {'percentCompleted': 60, 'worker_uuid': worker}),
        'done': lambda: alice.put_task(run, 0, {'status': 'done'}),
        'hand-out': lambda: alice.claim(run, worker),
    }
    for name, request in requests.items():
        sent.clear()
        request()
        if name == 'hand-out' and db.dialect == 'sqlite':
            assert [call['atomic'] for call in sent] == [True], name
        else:
            assert sent == one_statement, name


def with_frontier_locked(database_url: str, run: str, request: Callable[[], Any],
                         while_waiting: Callable[[], None]) -> Any:
    """request()'s answer, sent while another transaction holds every frontier
    row of the run; while_waiting() runs once the request waits for one."""
    import threading

    import psycopg
    answers = []
    with psycopg.connect(database_url) as locker, \
            psycopg.connect(database_url, autocommit=True) as watcher:
        locker.execute('SELECT f.shard FROM run_frontier f JOIN runs r ON r.id = f.run_id '
                       'WHERE r.uuid = %s FOR UPDATE OF f', [run])
        sending = threading.Thread(target=lambda: answers.append(request()))
        sending.start()
        deadline = time.monotonic() + 10
        while not watcher.execute(
                "SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                ).fetchone():
            assert time.monotonic() < deadline, 'the request never waited'
            time.sleep(0.01)
        while_waiting()
        locker.rollback()
        sending.join(10)
    return answers[0]


def test_a_single_handout_that_finds_every_frontier_row_busy_waits_within_its_statement(
        alice, db, database_url, monkeypatch):
    """With every next-number sequence locked by another transaction, a single
    hand-out waits for one of them inside its one statement (not a first
    statement that answers 'busy' and a second one that waits), and gets
    that sequence's next task once it is free."""
    if db.dialect != 'postgresql':
        pytest.skip('sqlite has one writer: its hand-out never finds a sequence busy')
    run = alice.create_run(100)['uuid']
    worker = alice.register_worker()
    statements = []
    real_run_on = db.run_on
    monkeypatch.setattr(db, 'run_on', lambda conn, sql, params: (
        statements.append(sql), real_run_on(conn, sql, params))[1])
    answer = with_frontier_locked(database_url, run, lambda: alice.claim(run, worker),
                                  lambda: assert_equal(len(statements), 1))
    assert len(statements) == 1
    assert answer.status_int == 201 and 0 <= answer.json['task'] < 8


def test_a_claim_with_updates_commits_them_before_it_waits_for_a_busy_frontier_row(
        alice, db, database_url):
    """A claim's first transaction holds the rows its updates changed: it must
    not wait for a frontier row (a delete takes those first, then the tasks:
    a deadlock). It commits, and the claim waits in a transaction of its own."""
    if db.dialect != 'postgresql':
        pytest.skip('sqlite has one writer: its hand-out never finds a sequence busy')
    run = alice.create_run(100)['uuid']
    worker = alice.register_worker()
    held = alice.claim(run, worker).json['task']
    answer = with_frontier_locked(
        database_url, run,
        lambda: alice.claim_tasks(run, worker, count=1, updates=[{'task': held, 'status': 'done'}]),
        lambda: assert_equal(db.one('SELECT status FROM tasks WHERE task = :n', {'n': held}),
                             {'status': 'done'}))
    assert answer.json['updates'] == [{'task': held, 'result': 'ok'}]
    assert len(answer.json['data']) == 1


def assert_equal(value: Any, expected: Any) -> None:
    assert value == expected


def test_two_connections_of_a_crowded_server_do_not_share_a_stats_row(alice, db, database_url):
    """Each connection adds its task counts to a stats row of its own (by its
    backend pid % 64): one whose transaction is still open does not make
    another wait, as with pid % 8, where a server's 16 connections shared
    8 rows and hand-outs waited for each other there."""
    if db.dialect != 'postgresql':
        pytest.skip('sqlite has one writer: its transactions never wait on each other')
    import psycopg
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    tasks = [alice.claim(run, worker).json['task'] for _ in range(2)]
    connections = [psycopg.connect(database_url) for _ in range(20)]
    try:
        pids = {conn.execute('SELECT pg_backend_pid()').fetchone()[0]: conn
                for conn in connections}
        pair = next(((a, b) for a in pids for b in pids
                     if a % 8 == b % 8 and a % 64 != b % 64), None)
        assert pair is not None, sorted(pids)
        first, second = pids[pair[0]], pids[pair[1]]
        progress = ('UPDATE tasks SET percent = 50 '
                    'WHERE run_id = (SELECT id FROM runs WHERE uuid = %s) AND task = %s')
        first.execute(progress, [run, tasks[0]])    # its transaction stays open
        second.execute("SET lock_timeout = '2s'")
        second.execute(progress, [run, tasks[1]])   # without a wait for the first's
        second.commit()
        first.commit()
    finally:
        for conn in connections:
            conn.close()
    assert alice.run_info(run)['percentDone'] == 10.0


def test_every_statement_fits_psycopgs_cache_of_parsed_statements():
    """psycopg parses a statement longer than its limit (4 KiB) anew on every
    call: squeezed, every statement of the store stays within it."""
    from psycopg import _queries
    statements = {name: getattr(value, 'postgresql', value)
                  for name, value in vars(store.Store).items()
                  if name.isupper() and isinstance(value, (str, store.Dialects))}
    hand_outs = {'CLAIM', 'CLAIM_ONE', 'CLAIM_WAITING'}
    assert hand_outs | {'REPORT'} <= statements.keys()
    sizes = {name: len(store.to_pyformat(sql).encode()) for name, sql in statements.items()}
    assert max(sizes.values()) <= _queries.MAX_CACHED_STATEMENT_LENGTH, sizes
    assert store.to_pyformat("SELECT 'a  --b' -- c\n  , 5 % 2") == "SELECT 'a  --b' , 5 %% 2"


def test_handout_keeps_progress_of_a_restarted_task(alice):
    run = alice.create_run(2)
    worker = alice.register_worker()
    alice.claim(run['uuid'], worker)
    alice.put_task(run['uuid'], 0, {'percentCompleted': 40.5})
    alice.post(f"/api/runs/{run['uuid']}/restart", status=204)
    again = alice.claim(run['uuid'], worker).json
    assert (again['task'], again['percentCompleted']) == (0, 40.5)


@pytest.mark.parametrize('body, status', [
    ({}, 400), ({'worker_uuid': 5}, 400), ({'worker_uuid': 'ghost'}, 404),
    ({'worker_uuid': 'w1', 'extra': 1}, 400),
])
def test_handout_refuses_bad_or_unknown_workers(alice, body, status):
    run = alice.create_run(2)
    alice.register_worker()
    resp = alice.post_json(f"/api/runs/{run['uuid']}/task", body, status=status)
    assert resp.json['description']


def test_handout_from_unknown_run_is_404(alice):
    worker = alice.register_worker()
    alice.claim(UNKNOWN_RUN, worker, status=404)


# ---------------------------------------------------------------------------
# Tasks.


def test_task_never_handed_out_reads_as_waiting_without_writing(alice, db):
    run = alice.create_run(5)
    task = alice.get(f"/api/runs/{run['uuid']}/tasks/3").json
    assert task == {'id': None, 'task': 3, 'percentCompleted': 0.0, 'status': 'waiting',
                    'attempts': 0, 'failures': 0, 'message': None, 'exitCode': None}
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


@pytest.mark.parametrize('info', ['status', 'percentCompleted', 'percentDone', 'attempts'])
def test_task_info_query_answers_one_value(alice, info):
    run = alice.create_run(5)
    alice.put_task(run['uuid'], 2, {'percentCompleted': 12.5})
    value = alice.get(f"/api/runs/{run['uuid']}/tasks/2", {'info': info}).json
    assert value == {info: {'status': 'waiting', 'percentCompleted': 12.5,
                            'percentDone': 12.5, 'attempts': 0}[info]}


@pytest.mark.parametrize('path', ['/tasks/5', '/tasks/-1', '/tasks/99999999999999999999',
                                  '/tasks/x'])
def test_task_outside_the_run_is_404(alice, path):
    run = alice.create_run(5)
    alice.get(f"/api/runs/{run['uuid']}{path}", status=404)
    alice.put_json(f"/api/runs/{run['uuid']}{path}", {'status': 'done'}, status=404)


def test_put_updates_progress_and_status_and_run_counts(alice):
    run = alice.create_run(4)
    worker = alice.register_worker()
    task = alice.claim(run['uuid'], worker).json['task']
    alice.put_task(run['uuid'], task, {'percentCompleted': 50})
    alice.put_task(run['uuid'], task, {'percentCompleted': 100, 'status': 'done'})
    alice.put_task(run['uuid'], 3, {'status': 'failed'})
    info = alice.run_info(run['uuid'])
    assert (info['numDone'], info['numFailed'], info['numWaiting']) == (1, 1, 2)
    assert info['percentDone'] == 25.0
    assert alice.get(f"/api/runs/{run['uuid']}/tasks/{task}").json['status'] == 'done'


@pytest.mark.parametrize('body', [
    {}, [], 'x', {'status': 'finished'}, {'status': None}, {'percentCompleted': 101},
    {'percentCompleted': -1}, {'percentCompleted': '50'}, {'percentCompleted': True},
    {'percentDone': 50}, {'status': 'done', 'worker': 'x'},
])
def test_put_refuses_bad_bodies(alice, body):
    run = alice.create_run(4)
    resp = alice.put_task(run['uuid'], 0, body, status=400)
    assert resp.json['description']
    assert alice.get(f"/api/runs/{run['uuid']}/tasks/0").json['id'] is None


# ---------------------------------------------------------------------------
# Restart.


def finish_some(client, run: str) -> None:
    """Tasks 0 done at 100%, 1 computing at 30%, 2 failed at 60%, 3 untouched."""
    worker = client.register_worker()
    for _ in range(3):
        client.claim(run, worker)
    client.put_task(run, 0, {'percentCompleted': 100, 'status': 'done'})
    client.put_task(run, 1, {'percentCompleted': 30})
    client.put_task(run, 2, {'percentCompleted': 60, 'status': 'failed'})


def task_states(client, run: str, count: int) -> list[tuple[str, float]]:
    tasks = [client.get(f'/api/runs/{run}/tasks/{n}').json for n in range(count)]
    return [(t['status'], t['percentCompleted']) for t in tasks]


def test_restart_keeps_progress_of_unfinished_tasks(alice):
    run = alice.create_run(4)['uuid']
    finish_some(alice, run)
    alice.post(f'/api/runs/{run}/restart', {'all': 'False'}, status=204)
    assert task_states(alice, run, 4) == [('done', 100), ('waiting', 30), ('waiting', 60),
                                          ('waiting', 0)]
    assert alice.run_info(run)['numWaiting'] == 3


@pytest.mark.parametrize('value', ['True', 'true', 'TRUE'])
def test_restart_all_resets_every_task(alice, value):
    run = alice.create_run(4)['uuid']
    finish_some(alice, run)
    alice.post(f'/api/runs/{run}?all={value}'.replace('?', '/restart?'), status=204)
    assert task_states(alice, run, 4) == [('waiting', 0)] * 4
    info = alice.run_info(run)
    assert (info['numWaiting'], info['percentDone']) == (4, 0.0)


def test_restart_refuses_other_values_and_unknown_runs(alice):
    run = alice.create_run(4)['uuid']
    alice.post(f'/api/runs/{run}/restart?all=yes', status=404)
    alice.post(f'/api/runs/{UNKNOWN_RUN}/restart', status=404)


# ---------------------------------------------------------------------------
# Workers.


def test_worker_registration_is_idempotent_but_refuses_clashes(alice, bob):
    first = alice.post_json('/api/worker', {'uuid': 'w', 'hostname': 'h', 'pid': 1},
                            status=201).json
    again = alice.post_json('/api/worker', {'uuid': 'w', 'hostname': 'h', 'pid': 1},
                            status=201).json
    assert first == again and set(first) == {'uuid', 'id'}
    alice.post_json('/api/worker', {'uuid': 'w', 'hostname': 'h', 'pid': 2}, status=409)
    bob.post_json('/api/worker', {'uuid': 'w', 'hostname': 'h', 'pid': 1}, status=409)


@pytest.mark.parametrize('body', [
    {}, {'uuid': 'w', 'hostname': 'h'}, {'uuid': '', 'hostname': 'h', 'pid': 1},
    {'uuid': 'w' * 65, 'hostname': 'h', 'pid': 1}, {'uuid': 'w', 'hostname': 'h' * 256, 'pid': 1},
    {'uuid': 'w', 'hostname': 'h', 'pid': -1}, {'uuid': 'w', 'hostname': 'h', 'pid': 2**31},
    {'uuid': 'w', 'hostname': 'h', 'pid': '1'}, {'uuid': 'w', 'hostname': 'h', 'pid': 1.0},
    {'uuid': 'w', 'hostname': 'h', 'pid': 1, 'port': 2},
    {'uuid': 'w\x00', 'hostname': 'h', 'pid': 1},
    {'uuid': 'w\ud800', 'hostname': 'h', 'pid': 1},
])
def test_worker_registration_refuses_bad_bodies(alice, body):
    assert alice.post_json('/api/worker', body, status=400).json['description']


# ---------------------------------------------------------------------------
# Part 2: owners, leases, failure, names, listings.


def test_other_users_runs_are_invisible_but_admins_see_all(alice, bob, root):
    run = alice.create_run(3)['uuid']
    assert bob.get('/api/runs').json['data'] == []
    bob.get(f'/api/runs/{run}', status=404)
    bob.get(f'/api/runs/{run}/tasks/0', status=404)
    bob.put_json(f'/api/runs/{run}/tasks/0', {'status': 'done'}, status=404)
    bob.post(f'/api/runs/{run}/restart', status=404)
    bob.claim(run, bob.register_worker('bw'), status=404)
    bob.delete(f'/api/runs/{run}', status=404)
    assert [r['uuid'] for r in root.get('/api/runs').json['data']] == [run]
    assert root.run_info(run)['numWaiting'] == 3


def test_expired_lease_is_handed_out_again(alice, db):
    run = alice.create_run(1, timeout=30)['uuid']
    first, second = alice.register_worker('a'), alice.register_worker('b')
    alice.claim(run, first)
    alice.claim(run, second, status=204)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    again = alice.claim(run, second).json
    assert (again['task'], again['attempts']) == (0, 2)
    listed = alice.get(f'/api/runs/{run}/tasks').json['data']
    assert listed[0]['worker']['uuid'] == 'b'


def test_put_and_heartbeat_renew_the_lease(alice, db):
    run = alice.create_run(2, timeout=30)['uuid']
    worker = alice.register_worker()
    alice.claim(run, worker)
    alice.claim(run, worker)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    alice.put_task(run, 0, {'percentCompleted': 10})
    alice.post(f'/api/workers/{worker}/heartbeat', status=204)
    alice.claim(run, alice.register_worker('other'), status=204)


def test_put_naming_a_worker_that_lost_the_task_is_409(alice, db):
    run = alice.create_run(1, timeout=30)['uuid']
    first, second = alice.register_worker('a'), alice.register_worker('b')
    alice.claim(run, first)
    alice.put_task(run, 0, {'percentCompleted': 10, 'worker_uuid': first})
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    alice.claim(run, second)
    late = alice.put_task(run, 0, {'status': 'waiting', 'worker_uuid': first}, status=409)
    assert 'does not hold' in late.json['description']
    alice.put_task(run, 0, {'status': 'done', 'percentCompleted': 100, 'worker_uuid': second})
    assert alice.run_info(run)['numDone'] == 1
    alice.put_task(run, 0, {'worker_uuid': second}, status=400)


def test_task_put_back_to_waiting_has_no_worker(alice):
    run = alice.create_run(1)['uuid']
    alice.claim(run, alice.register_worker())
    alice.put_task(run, 0, {'status': 'waiting'})
    assert alice.get(f'/api/runs/{run}/tasks').json['data'][0]['worker'] is None


def test_heartbeat_of_unknown_or_foreign_worker_is_404(alice, bob):
    alice.register_worker()
    alice.post('/api/workers/ghost/heartbeat', status=404)
    bob.post('/api/workers/w1/heartbeat', status=404)


def test_task_out_of_attempts_fails_when_its_lease_runs_out(alice, db):
    run = alice.create_run(1, timeout=30, maxAttempts=2)['uuid']
    worker = alice.register_worker()
    for attempt in (1, 2):
        assert alice.claim(run, worker).json['attempts'] == attempt
        db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    assert alice.run_info(run)['numComputing'] == 1   # expired still counts as computing
    alice.claim(run, worker, status=204)
    info = alice.run_info(run)
    assert (info['numFailed'], info['numComputing']) == (1, 0)
    alice.post(f'/api/runs/{run}/restart', status=204)
    assert alice.claim(run, worker).json['task'] == 0


def test_run_without_timeout_never_takes_a_task_back(alice, db):
    run = alice.create_run(1)['uuid']
    alice.claim(run, alice.register_worker())
    db.execute('UPDATE tasks SET updated = 0, started = 0')
    alice.claim(run, alice.register_worker('other'), status=204)


def test_failed_task_waits_for_a_restart(alice):
    run = alice.create_run(1)['uuid']
    worker = alice.register_worker()
    alice.claim(run, worker)
    alice.put_task(run, 0, {'status': 'failed'})
    alice.claim(run, worker, status=204)
    assert alice.get(f'/api/runs/{run}', {'info': 'numFailed'}).json == {'numFailed': 1}


def test_task_listing_filters_and_pages(alice):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker('w', 'node7', 99)
    for _ in range(5):
        alice.claim(run, worker)
    alice.put_task(run, 1, {'status': 'done', 'percentCompleted': 100})
    alice.put_task(run, 3, {'status': 'done', 'percentCompleted': 100})
    page = alice.get(f'/api/runs/{run}/tasks', {'limit': 2}).json['data']
    assert [t['task'] for t in page] == [0, 1]
    assert page[0]['worker'] == {'uuid': 'w', 'hostname': 'node7', 'pid': 99}
    assert page[0]['started'].endswith('Z') and page[0]['attempts'] == 1
    after = alice.get(f'/api/runs/{run}/tasks', {'after': 1, 'limit': 2}).json['data']
    assert [t['task'] for t in after] == [2, 3]
    done = alice.get(f'/api/runs/{run}/tasks', {'status': 'done'}).json['data']
    assert [t['task'] for t in done] == [1, 3]
    for bad in ({'limit': 1001}, {'limit': 0}, {'limit': 'x'}, {'status': 'nope'},
                {'after': '1.5'}):
        alice.get(f'/api/runs/{run}/tasks', bad, status=400)
    alice.get('/api/runs/%00/tasks', status=404)     # not a run id: no query at all


def test_worker_listing_shows_own_workers_and_what_they_hold(alice, bob, root):
    run = alice.create_run(5)['uuid']
    worker = alice.register_worker('w', 'node1', 7)
    bob.register_worker('bw')
    alice.claim(run, worker)
    alice.claim(run, worker)
    mine = alice.get('/api/workers').json['data']
    assert [(w['uuid'], w['hostname'], w['pid'], w['numComputing']) for w in mine] == [
        ('w', 'node1', 7, 2)]
    assert mine[0]['start'].endswith('Z') and mine[0]['lastSeen'] >= mine[0]['start']
    assert {w['uuid'] for w in root.get('/api/workers').json['data']} == {'w', 'bw'}


# ---------------------------------------------------------------------------
# Part 3: batch hand-outs and reports, retried claims, failures and retries.

FAILED = {'status': 'failed'}


def report(client, run: str, worker: str, updates: list, status: int = 200):
    return client.patch_json(f'/api/runs/{run}/tasks',
                             {'worker_uuid': worker, 'updates': updates}, status=status)


def tasks_of(response) -> list[int]:
    return [task['task'] for task in response.json['data']]


def test_batch_claim_hands_out_in_order_then_nothing(alice):
    run = alice.create_run(5)['uuid']
    worker = alice.register_worker()
    first = alice.claim_tasks(run, worker, count=3).json
    assert [t['task'] for t in first['data']] == [0, 1, 2] and 'updates' not in first
    assert first['data'][0] == {'id': first['data'][0]['id'], 'task': 0,
                                'percentCompleted': 0.0, 'status': 'computing',
                                'attempts': 1, 'failures': 0, 'message': None,
                                'exitCode': None}
    assert tasks_of(alice.claim_tasks(run, worker, count=10)) == [3, 4]
    assert alice.claim_tasks(run, worker, count=10).json == {'data': []}
    assert alice.claim_tasks(run, worker).json == {'data': []}     # count defaults to 1
    assert alice.run_info(run)['numComputing'] == 5


def test_batch_claim_takes_waiting_rows_first_then_fresh_numbers(alice):
    run = alice.create_run(20)['uuid']
    worker = alice.register_worker()
    assert tasks_of(alice.claim_tasks(run, worker, count=12)) == list(range(12))
    alice.put_task(run, 7, {'status': 'waiting'})
    alice.put_task(run, 3, {'status': 'waiting', 'percentCompleted': 40})
    alice.put_task(run, 13, {'status': 'done'})     # a fresh number a PUT finished
    handed = alice.claim_tasks(run, worker, count=5).json['data']
    assert [t['task'] for t in handed] == [3, 7, 12, 14, 15]
    assert handed[0]['percentCompleted'] == 40 and handed[0]['attempts'] == 2


def test_batch_claim_applies_its_updates_first(alice):
    run = alice.create_run(4)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=2)
    done = [{'task': 0, 'status': 'done', 'percentCompleted': 100},
            {'task': 1, 'status': 'done', 'percentCompleted': 100}]
    answer = alice.claim_tasks(run, worker, count=2, updates=done).json
    assert [t['task'] for t in answer['data']] == [2, 3]
    assert answer['updates'] == [{'task': 0, 'result': 'ok'}, {'task': 1, 'result': 'ok'}]
    assert alice.claim_tasks(run, worker, updates=[]).json == {'data': [], 'updates': []}
    info = alice.run_info(run)
    assert (info['numDone'], info['numComputing'], info['percentDone']) == (2, 2, 50)


def test_batch_report_answers_ok_not_held_or_unknown_task_per_item(alice):
    run = alice.create_run(4)['uuid']
    mine, other = alice.register_worker('mine'), alice.register_worker('other')
    alice.claim_tasks(run, mine, count=2)
    alice.claim_tasks(run, other, count=1)
    answer = report(alice, run, mine, [
        {'task': 1, 'percentCompleted': 50}, {'task': 2, 'status': 'done'},
        {'task': 9, 'status': 'done'}, {'task': 0, 'status': 'done'},
        {'task': 3, 'status': 'done'}]).json
    assert [item['result'] for item in answer['updates']] == [
        'ok', 'not held', 'unknown task', 'ok', 'not held']
    assert [item['task'] for item in answer['updates']] == [1, 2, 9, 0, 3]
    info = alice.run_info(run)
    assert (info['numDone'], info['numComputing'], info['percentDone']) == (1, 2, 12.5)


def test_batch_report_of_tasks_far_apart_applies_each_in_order(alice):
    # Tasks more than REPORT_SPAN apart are reported by a statement per span.
    run = alice.create_run(5000)['uuid']
    worker = alice.register_worker()
    for _ in range(5):
        alice.claim_tasks(run, worker, count=1000)
    updates = [{'task': 4999, 'status': 'done'}, {'task': 0, 'status': 'done'},
               {'task': 4096, 'percentCompleted': 50}, {'task': 5000, 'status': 'done'}]
    answer = report(alice, run, worker, updates).json
    assert answer['updates'] == [{'task': 4999, 'result': 'ok'}, {'task': 0, 'result': 'ok'},
                                 {'task': 4096, 'result': 'ok'},
                                 {'task': 5000, 'result': 'unknown task'}]
    handed = alice.claim_tasks(run, worker, updates=[{'task': 1, 'status': 'done'},
                                                     {'task': 4998, 'status': 'done'}]).json
    assert handed == {'data': [], 'updates': [{'task': 1, 'result': 'ok'},
                                              {'task': 4998, 'result': 'ok'}]}
    info = alice.run_info(run)
    assert (info['numDone'], info['numComputing'], info['percentDone']) == (4, 4996, 0.01)


@pytest.mark.parametrize('updates, where', [
    ([{'task': 0, 'status': 'done'}, {'task': 1, 'status': 'finished'}], 'updates[1]'),
    ([{'task': 0, 'status': 'done'}, {'task': -1, 'status': 'done'}], 'updates[1]'),
    ([{'task': 0, 'status': 'done'}, {'task': 1.0, 'status': 'done'}], 'updates[1]'),
    ([{'task': 0, 'status': 'done'}, {'task': 2**31, 'status': 'done'}], 'updates[1]'),
    ([{'task': 0}], 'updates[0]'),
    ([{'status': 'done'}], 'updates[0]'),
    ([{'task': 0, 'status': 'done', 'colour': 'red'}], 'updates[0]'),
    ([{'task': 0, 'status': 'done', 'final': True}], 'updates[0]'),
    ([{'task': 0, 'status': 'failed', 'final': 'yes'}], 'updates[0]'),
    ([{'task': 0, 'message': 'm' * 4097}], 'updates[0]'),
    ([{'task': 0, 'message': 'nul \0 here'}], 'updates[0]'),
    ([{'task': 0, 'exitCode': 2**31}], 'updates[0]'),
    ([{'task': 0, 'exitCode': '1'}], 'updates[0]'),
    ([{'task': 0, 'status': 'done'}, 7], 'updates[1]'),
    ([{'task': 0, 'status': 'done'}, {'task': 0, 'percentCompleted': 5}], 'updates[1]'),
])
def test_bad_update_is_a_400_naming_its_index_and_nothing_is_applied(alice, updates, where):
    run = alice.create_run(4)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=2)
    for refused in (report(alice, run, worker, updates, status=400),
                    alice.claim_tasks(run, worker, count=2, updates=updates, status=400)):
        assert where in refused.json['description'], refused.json
    info = alice.run_info(run)
    assert (info['numDone'], info['numComputing'], info['percentDone']) == (0, 2, 0)


@pytest.mark.parametrize('body', [
    {}, {'worker_uuid': 'w1', 'count': 0}, {'worker_uuid': 'w1', 'count': 1001},
    {'worker_uuid': 'w1', 'count': '2'}, {'worker_uuid': 'w1', 'count': True},
    {'worker_uuid': 'w1', 'count': 2.0}, {'worker_uuid': 'w1', 'updates': {}},
    {'worker_uuid': 'w1', 'updates': [{'task': 0, 'status': 'done'}] * 1001},
    {'worker_uuid': 'w1', 'requestId': ''}, {'worker_uuid': 'w1', 'requestId': 'r' * 65},
    {'worker_uuid': 'w1', 'requestId': 5}, {'worker_uuid': 'w1', 'cuont': 2},
])
def test_batch_claim_refuses_bad_bodies(alice, body):
    run = alice.create_run(4)['uuid']
    alice.register_worker()
    refused = alice.post_json(f'/api/runs/{run}/tasks/claim', body, status=400)
    assert refused.json['description']
    assert alice.run_info(run)['numWaiting'] == 4


@pytest.mark.parametrize('body', [
    {'worker_uuid': 'w1'}, {'worker_uuid': 'w1', 'updates': []},
    {'updates': [{'task': 0, 'status': 'done'}]},
    {'worker_uuid': 'w1', 'updates': [{'task': 0, 'status': 'done'}] * 1001},
])
def test_batch_report_refuses_bad_bodies(alice, body):
    run = alice.create_run(4)['uuid']
    alice.register_worker()
    alice.patch_json(f'/api/runs/{run}/tasks', body, status=400)


def test_batches_of_unknown_runs_or_workers_are_404(alice, bob):
    run = alice.create_run(4)['uuid']
    worker = alice.register_worker()
    bob.register_worker('bobs')
    done = [{'task': 0, 'status': 'done'}]
    alice.claim_tasks(UNKNOWN_RUN, worker, status=404)
    alice.claim_tasks(run, 'ghost', status=404)
    alice.claim_tasks(run, 'bobs', count=2, updates=done, status=404)
    report(alice, UNKNOWN_RUN, worker, done, status=404)
    report(alice, run, 'ghost', done, status=404)
    bob.claim_tasks(run, 'bobs', status=404)
    assert alice.run_info(run)['numWaiting'] == 4


def test_repeated_claim_gets_its_own_tasks_back_and_no_more(alice):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    first = alice.claim_tasks(run, worker, count=3, requestId='r1').json['data']
    again = alice.claim_tasks(run, worker, count=5, requestId='r1').json['data']
    assert again == first                         # no hand-out counted: attempts stay 1
    assert alice.run_info(run)['numComputing'] == 3
    report(alice, run, worker, [{'task': 1, 'status': 'done'}])
    assert tasks_of(alice.claim_tasks(run, worker, count=3, requestId='r1')) == [0, 2]
    assert tasks_of(alice.claim_tasks(run, worker, count=2, requestId='r2')) == [3, 4]


def test_repeated_claim_ignores_its_updates_and_answers_the_first_results(alice):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=2, requestId='r1')
    updates = [{'task': 0, 'status': 'done'}, {'task': 7, 'status': 'done'}]
    first = alice.claim_tasks(run, worker, count=2, requestId='r2', updates=updates).json
    assert [t['task'] for t in first['data']] == [2, 3]
    again = alice.claim_tasks(run, worker, count=9, requestId='r2',
                              updates=[{'task': 1, 'status': 'done'}]).json
    assert again == first
    assert alice.get(f'/api/runs/{run}/tasks/1').json['status'] == 'computing'


def test_repeated_single_claim_gets_the_same_task_then_204(alice):
    run = alice.create_run(3)['uuid']
    worker = alice.register_worker()
    body = {'worker_uuid': worker, 'requestId': 'once'}
    first = alice.post_json(f'/api/runs/{run}/task', body, status=201).json
    assert alice.post_json(f'/api/runs/{run}/task', body, status=201).json == first
    alice.put_task(run, first['task'], {'status': 'done', 'worker_uuid': worker})
    alice.post_json(f'/api/runs/{run}/task', body, status=204)
    assert alice.run_info(run)['numWaiting'] == 2


def test_request_ids_of_other_workers_or_runs_do_not_meet(alice):
    run, other_run = alice.create_run(4)['uuid'], alice.create_run(4)['uuid']
    a, b = alice.register_worker('a'), alice.register_worker('b')
    assert tasks_of(alice.claim_tasks(run, a, count=2, requestId='same')) == [0, 1]
    assert tasks_of(alice.claim_tasks(run, b, count=2, requestId='same')) == [2, 3]
    assert tasks_of(alice.claim_tasks(other_run, a, count=2, requestId='same')) == [0, 1]


def test_repeated_claim_of_an_empty_answer_stays_empty(alice):
    run = alice.create_run(1)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, alice.register_worker('other'))
    assert alice.claim_tasks(run, worker, requestId='r').json == {'data': []}
    alice.post(f'/api/runs/{run}/restart', status=204)
    assert alice.claim_tasks(run, worker, requestId='r').json == {'data': []}
    assert tasks_of(alice.claim_tasks(run, worker, requestId='r2')) == [0]


def test_failure_report_keeps_message_and_exit_code(alice):
    run = alice.create_run(3)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=2)
    alice.put_task(run, 0, {**FAILED, 'exitCode': 3, 'message': 'disk full\nno space',
                            'worker_uuid': worker})
    report(alice, run, worker, [{'task': 1, **FAILED, 'exitCode': -9, 'message': ''}])
    task = alice.get(f'/api/runs/{run}/tasks/0').json
    assert (task['status'], task['failures'], task['exitCode'], task['message']) == (
        'failed', 1, 3, 'disk full\nno space')
    listed = alice.get(f'/api/runs/{run}/tasks', {'status': 'failed'}).json['data']
    assert [(t['task'], t['exitCode'], t['message']) for t in listed] == [
        (0, 3, 'disk full\nno space'), (1, -9, '')]
    alice.put_task(run, 0, {**FAILED, 'worker_uuid': worker})     # a repeated report
    assert alice.get(f'/api/runs/{run}/tasks/0').json['failures'] == 1
    assert alice.run_info(run)['numFailed'] == 2


def test_retries_put_a_failed_task_back_until_they_run_out(alice):
    run = alice.create_run(2, retries=2)['uuid']
    worker = alice.register_worker()
    for failures in (1, 2):
        task = alice.claim_tasks(run, worker).json['data'][0]
        assert task['task'] == 0 and task['failures'] == failures - 1
        alice.put_task(run, 0, {**FAILED, 'percentCompleted': 30, 'exitCode': failures,
                                'message': f'try {failures}', 'worker_uuid': worker})
        waiting = alice.get(f'/api/runs/{run}/tasks/0').json
        assert (waiting['status'], waiting['failures'], waiting['percentCompleted'],
                waiting['exitCode'], waiting['message']) == (
            'waiting', failures, 30, failures, f'try {failures}')
    assert alice.claim_tasks(run, worker).json['data'][0]['attempts'] == 3
    alice.put_task(run, 0, {**FAILED, 'worker_uuid': worker})
    assert alice.get(f'/api/runs/{run}/tasks/0').json['status'] == 'failed'
    assert tasks_of(alice.claim_tasks(run, worker, count=5)) == [1]
    assert alice.get(f'/api/runs/{run}').json['retries'] == 2


def test_final_failure_is_not_retried(alice):
    run = alice.create_run(1, retries=5)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker)
    answer = report(alice, run, worker, [{'task': 0, **FAILED, 'final': True}]).json
    assert answer['updates'] == [{'task': 0, 'result': 'ok'}]
    assert alice.run_info(run)['numFailed'] == 1
    assert alice.claim_tasks(run, worker).json == {'data': []}


def test_retried_task_is_no_longer_held_by_its_worker(alice):
    run = alice.create_run(1, retries=1)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker)
    alice.put_task(run, 0, {**FAILED, 'worker_uuid': worker})
    alice.put_task(run, 0, {**FAILED, 'worker_uuid': worker}, status=409)


def test_max_failures_stops_the_run_until_a_restart(alice):
    run = alice.create_run(10, maxFailures=2)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=3)
    report(alice, run, worker, [{'task': 0, **FAILED}])
    assert alice.run_info(run)['stopped'] is False
    report(alice, run, worker, [{'task': 1, **FAILED}])
    info = alice.run_info(run)
    assert (info['stopped'], info['maxFailures'], info['numFailed']) == (True, 2, 2)
    assert alice.claim_tasks(run, worker, count=5).json == {'data': []}
    alice.claim(run, worker, status=204)
    alice.put_task(run, 2, {'status': 'done', 'worker_uuid': worker})  # running tasks finish
    alice.post(f'/api/runs/{run}/restart?tasks=5', status=204)
    assert alice.run_info(run)['stopped'] is False
    assert tasks_of(alice.claim_tasks(run, worker, count=2)) == [3, 4]
    alice.put_task(run, 3, {**FAILED, 'worker_uuid': worker})
    assert alice.run_info(run)['stopped'] is True   # 3 failed: at or above 2 again


def test_lease_running_out_at_max_attempts_counts_toward_max_failures(alice, db):
    run = alice.create_run(2, timeout=30, maxAttempts=1, maxFailures=1)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    assert alice.claim_tasks(run, worker).json == {'data': []}
    info = alice.run_info(run)
    assert (info['numFailed'], info['stopped']) == (1, True)


def finish_ten(client, run: str, worker: str) -> None:
    """Tasks 0-3 done at 100%, 4-6 failed at 50%, 7-9 computing at 20%."""
    client.claim_tasks(run, worker, count=10)
    report(client, run, worker,
           [{'task': n, 'status': 'done', 'percentCompleted': 100} for n in range(4)]
           + [{'task': n, **FAILED, 'percentCompleted': 50, 'exitCode': 1}
              for n in range(4, 7)]
           + [{'task': n, 'percentCompleted': 20} for n in range(7, 10)])


def statuses(client, run: str) -> list[str]:
    return [client.get(f'/api/runs/{run}/tasks/{n}').json['status'] for n in range(10)]


def test_restart_by_status_restarts_exactly_those_tasks(alice):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    finish_ten(alice, run, worker)
    alice.post(f'/api/runs/{run}/restart?status=failed', status=204)
    assert statuses(alice, run) == ['done'] * 4 + ['waiting'] * 3 + ['computing'] * 3
    restarted = alice.get(f'/api/runs/{run}/tasks/5').json
    assert (restarted['percentCompleted'], restarted['failures'], restarted['attempts'],
            restarted['exitCode'], restarted['message']) == (50, 0, 0, None, None)
    alice.post(f'/api/runs/{run}/restart?status=done&all=True', status=204)
    assert statuses(alice, run) == ['waiting'] * 7 + ['computing'] * 3
    assert alice.get(f'/api/runs/{run}/tasks/0').json['percentCompleted'] == 0


def test_restart_by_ranges_restarts_exactly_those_tasks(alice):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    finish_ten(alice, run, worker)
    alice.post(f'/api/runs/{run}/restart?tasks=3-5,9,4', status=204)
    assert statuses(alice, run) == (['done'] * 3 + ['waiting'] * 3 + ['failed']
                                    + ['computing'] * 2 + ['waiting'])
    assert alice.get(f'/api/runs/{run}/tasks/3').json['percentCompleted'] == 100
    alice.post(f'/api/runs/{run}/restart?tasks=0-9&status=computing', status=204)
    assert statuses(alice, run).count('computing') == 0
    assert tasks_of(alice.claim_tasks(run, worker, count=10)) == [3, 4, 5, 7, 8, 9]


@pytest.mark.parametrize('query', [
    {'tasks': ''}, {'tasks': '3-'}, {'tasks': '5-3'}, {'tasks': '1, 2'}, {'tasks': 'a'},
    {'tasks': '10'}, {'tasks': '0-10'}, {'tasks': '-1'}, {'tasks': ','.join(['1'] * 1001)},
    {'tasks': '99999999999999'}, {'status': ''}, {'status': 'finished'},
    {'status': 'failed', 'task': '3'}, {'al': 'True'},
])
def test_restart_refuses_bad_status_or_ranges(alice, query):
    run = alice.create_run(10)['uuid']
    worker = alice.register_worker()
    finish_ten(alice, run, worker)
    refused = alice.post(f'/api/runs/{run}/restart?{urlencode(query)}', status=400)
    assert refused.json['description']
    assert statuses(alice, run) == ['done'] * 4 + ['failed'] * 3 + ['computing'] * 3


def test_attempts_keep_every_attempt_that_did_not_end_done(alice, db):
    run = alice.create_run(2, timeout=30, retries=1)['uuid']
    first, second = alice.register_worker('first'), alice.register_worker('second', 'n2', 7)
    alice.claim_tasks(run, first, count=2)
    report(alice, run, first, [{'task': 0, **FAILED, 'exitCode': 2, 'message': 'boom'},
                               {'task': 1, 'status': 'done', 'percentCompleted': 100}])
    alice.claim_tasks(run, second)
    db.execute('UPDATE tasks SET lease_expires = :past WHERE task = 0',
               {'past': time.time() - 1})
    alice.claim_tasks(run, first)                   # takes task 0 back from `second`
    alice.put_task(run, 0, {'status': 'waiting', 'worker_uuid': first})    # put back
    attempts = alice.get(f'/api/runs/{run}/tasks/0/attempts').json['data']
    assert [(a['attempt'], a['outcome'], a['exitCode'], a['message'], a['worker']['uuid'])
            for a in attempts] == [(1, 'failed', 2, 'boom', 'first'),
                                   (2, 'lease expired', None, None, 'second'),
                                   (3, 'put back', None, None, 'first')]
    assert attempts[1]['worker'] == {'uuid': 'second', 'hostname': 'n2', 'pid': 7}
    assert all(a['started'].endswith('Z') and a['ended'].endswith('Z') for a in attempts)
    assert alice.get(f'/api/runs/{run}/tasks/1/attempts').json == {'data': []}
    alice.get(f'/api/runs/{run}/tasks/2/attempts', status=404)
    alice.get(f'/api/runs/{UNKNOWN_RUN}/tasks/0/attempts', status=404)


def test_task_done_at_its_first_attempt_writes_no_attempt(alice, db):
    run = alice.create_run(50)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=50)
    report(alice, run, worker, [{'task': n, 'status': 'done'} for n in range(50)])
    assert db.one('SELECT count(*) AS n FROM attempts')['n'] == 0


def test_restart_keeps_the_attempts_and_records_interrupted_ones(alice):
    run = alice.create_run(2)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=2)
    alice.put_task(run, 0, {**FAILED, 'message': 'first', 'worker_uuid': worker})
    alice.post(f'/api/runs/{run}/restart', status=204)
    assert [a['outcome'] for a in
            alice.get(f'/api/runs/{run}/tasks/0/attempts').json['data']] == ['failed']
    assert [a['outcome'] for a in
            alice.get(f'/api/runs/{run}/tasks/1/attempts').json['data']] == ['restarted']


def test_heartbeat_naming_tasks_renews_only_those(alice, db):
    run = alice.create_run(3, timeout=30)['uuid']
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=3)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    alice.post_json(f'/api/workers/{worker}/heartbeat', {'run': run, 'tasks': [0, 2]},
                    status=204)
    taken = alice.claim_tasks(run, alice.register_worker('other'), count=3)
    assert tasks_of(taken) == [1]


@pytest.mark.parametrize('body', [
    {'tasks': [1]}, {'run': UNKNOWN_RUN}, {'run': 'x', 'tasks': 3},
    {'run': UNKNOWN_RUN, 'tasks': [-1]}, {'run': UNKNOWN_RUN, 'tasks': [True]},
    {'run': UNKNOWN_RUN, 'tasks': [0] * 1001}, {'runs': UNKNOWN_RUN, 'tasks': []},
])
def test_heartbeat_refuses_bad_bodies(alice, body):
    worker = alice.register_worker()
    alice.post_json(f'/api/workers/{worker}/heartbeat', body, status=400)


def test_heartbeat_naming_an_unknown_run_is_404(alice):
    worker = alice.register_worker()
    alice.post_json(f'/api/workers/{worker}/heartbeat', {'run': UNKNOWN_RUN, 'tasks': []},
                    status=404)


def test_percent_done_shows_one_task_of_a_billion(alice):
    run = alice.create_run(10**9)['uuid']
    alice.put_task(run, 5, {'status': 'done', 'percentCompleted': 100})
    assert alice.run_info(run)['percentDone'] == 1e-07
    alice.put_task(run, 6, {'percentCompleted': 1 / 3})
    alice.put_task(run, 6, {'percentCompleted': 0})
    assert alice.run_info(run)['percentDone'] == 1e-07    # no float dust left behind


def test_empty_path_segments_are_404(alice):
    for path in ('/api/runs//task', '/api/runs//tasks/0', '/api/workers//heartbeat',
                 '/runs//restart'):
        for method in ('GET', 'POST'):
            resp = alice.request(path, method=method, expect_errors=True)
            assert resp.status_int == 404 and resp.json['title'], (method, path, resp.status)


def test_claims_and_reports_read_only_their_tasks_however_the_table_grew(
        postgresql_database_url):
    # Generic plans are made once per connection. Made right after a VACUUM
    # of an emptied tasks table, they once walked every task of the run on
    # each claim and report, ever slower as the run went on.
    tf = store.Store(store.open_database(postgresql_database_url, pool_size=1))  # one plan each
    try:
        owner = store.Owner(tf.db.one("SELECT id FROM users WHERE username = 'alice'")['id'],
                            False)
        tf.register_worker(owner, 'w1', 'host', 1)

        def work_through(run: str, claims: int) -> None:
            held: list[dict] = []
            for _ in range(claims):
                held = tf.claim(owner, run, 'w1', 100, updates=[
                    store.Update(task['task'], 100.0, 'done') for task in held]).tasks

        def tasks_read() -> int:
            """Rows and index entries of tasks read so far."""
            tf.db.one('SELECT pg_stat_force_next_flush()')  # our own counts, flushed when idle
            tf.db.one('SELECT pg_stat_clear_snapshot()')
            return tf.db.one("""
                SELECT seq_tup_read + (SELECT sum(idx_tup_read) FROM pg_stat_user_indexes i
                                       WHERE i.relid = t.relid) AS n
                FROM pg_stat_user_tables t WHERE relname = 'tasks'""")['n']

        warm_up = tf.create_run(owner, 1000, timeout=3600)['uuid']
        work_through(warm_up, 10)           # the statements are prepared
        tf.delete_run(owner, warm_up)
        tf.db.execute('VACUUM ANALYZE tasks')   # as autovacuum would: now the table is empty
        run = tf.create_run(owner, 10**6, timeout=3600)['uuid']
        work_through(run, 200)              # 20,000 tasks done
        before = tasks_read()
        work_through(run, 10)               # 1,000 more, claimed and reported
        assert tasks_read() - before < 2 * 1000     # not 2*10^4 a claim, as it was
    finally:
        tf.close()


# ---------------------------------------------------------------------------
# Inputs stored with the run, and its pace.


def put_inputs(client, run: str, first: int, inputs: list, status: int = 200):
    return client.put_json(f'/api/runs/{run}/inputs', {'first': first, 'inputs': inputs},
                           status=status)


def test_run_with_inputs_hands_out_nothing_until_every_input_is_stored(alice):
    run = alice.create_run(5, inputs='text')['uuid']
    worker = alice.register_worker()
    assert alice.claim_tasks(run, worker, count=5).json == {'data': []}
    alice.claim(run, worker, status=204)
    assert put_inputs(alice, run, 0, ['a b', 'c']).json == {'stored': 2, 'missing': 3}
    assert put_inputs(alice, run, 0, ['a b', 'ignored']).json == {'stored': 0, 'missing': 3}
    alice.claim(run, worker, status=204)
    info = alice.run_info(run)
    assert (info['inputs'], info['inputsMissing']) == ('text', 3)
    assert put_inputs(alice, run, 2, ['', 'é', 'last']).json == {'stored': 3, 'missing': 0}
    first = alice.claim(run, worker).json
    assert (first['task'], first['input']) == (0, 'a b')
    rest = alice.claim_tasks(run, worker, count=5).json['data']
    assert [(t['task'], t['input']) for t in rest] == [(1, 'c'), (2, ''), (3, 'é'), (4, 'last')]
    assert alice.get(f'/api/runs/{run}/tasks/1').json['input'] == 'c'
    put_inputs(alice, run, 0, ['late'], status=409)


def test_json_inputs_come_back_as_the_values_sent(alice):
    values = [{'tile': [3, 4], 'band': 'red'}, 7, None, 'text', [1.5, True]]
    run = alice.create_run(5, inputs='json')['uuid']
    put_inputs(alice, run, 0, values)
    worker = alice.register_worker()
    handed = alice.claim_tasks(run, worker, count=5).json['data']
    assert [t['input'] for t in handed] == values


def test_run_without_inputs_answers_as_always(alice):
    run = alice.create_run(2)['uuid']
    assert 'inputs' not in alice.run_info(run)
    task = alice.claim(run, alice.register_worker()).json
    assert 'input' not in task and 'input' not in alice.get(f'/api/runs/{run}/tasks/0').json
    refused = put_inputs(alice, run, 0, ['x'], status=400)
    assert 'without inputs' in refused.json['description']


@pytest.mark.parametrize('kind, first, inputs, where', [
    ('text', 0, [7], 'inputs[0]'), ('text', 0, ['ok', 'x' * 4097], 'inputs[1]'),
    ('text', 0, ['nul\0'], 'inputs[0]'), ('json', 0, ['x' * 4095], 'inputs[0]'),
    ('text', 2, ['a', 'b', 'c'], 'tasks 2 to 4'), ('text', -1, ['a'], 'first'),
    ('text', 0, [], 'inputs'), ('text', 0, 'abc', 'inputs'),
])
def test_bad_inputs_are_a_400_and_nothing_is_stored(alice, kind, first, inputs, where):
    run = alice.create_run(4, inputs=kind)['uuid']
    refused = put_inputs(alice, run, first, inputs, status=400)
    assert where in refused.json['description'], refused.json
    assert alice.run_info(run)['inputsMissing'] == 4


def test_inputs_of_unknown_or_foreign_runs_are_404(alice, bob):
    run = alice.create_run(1, inputs='text')['uuid']
    put_inputs(bob, run, 0, ['x'], status=404)
    put_inputs(alice, UNKNOWN_RUN, 0, ['x'], status=404)
    alice.post_json('/api/run', {'numTasks': 1, 'inputs': 'csv'}, status=400)


def test_pace_counts_tasks_done_lately_and_estimates_the_rest(alice):
    run = alice.create_run(10)['uuid']
    assert alice.get(f'/api/runs/{run}/pace').json == {'donePerMinute': 0.0,
                                                        'etaSeconds': None}
    worker = alice.register_worker()
    alice.claim_tasks(run, worker, count=10)
    report(alice, run, worker, [{'task': n, 'status': 'done'} for n in range(6)])
    pace = alice.get(f'/api/runs/{run}/pace').json
    assert pace['donePerMinute'] == 6.0     # a new run is measured over its first minute
    assert pace['etaSeconds'] == pytest.approx(40.0)
    report(alice, run, worker, [{'task': n, **FAILED} for n in range(6, 10)])
    assert alice.get(f'/api/runs/{run}/pace').json['etaSeconds'] == 0
    alice.get(f'/api/runs/{UNKNOWN_RUN}/pace', status=404)


# ---------------------------------------------------------------------------
# Bad input: every route, never a 500.

BAD_BODIES = [b'', b'{', b'null', b'[]', b'"x"', b'1', b'{"a":1}', b'\xff\xfe',
              b'{"numTasks": NaN}', b'{"numTasks": 1e999}', b'[' * 100000,
              b'{"x": "' + b'y' * 70000 + b'"}']
ROUTES = [('POST', '/api/run'), ('POST', '/api/runs/{run}/task'),
          ('PUT', '/api/runs/{run}/tasks/0'), ('POST', '/api/worker'),
          ('POST', '/api/runs/{run}/tasks/claim'), ('PATCH', '/api/runs/{run}/tasks'),
          ('PUT', '/api/runs/{run}/inputs')]


@pytest.mark.parametrize('method, path', ROUTES)
def test_malformed_bodies_get_a_json_4xx_on_every_route(alice, method, path):
    run = alice.create_run(3)['uuid']
    for body in BAD_BODIES:
        resp = alice.request(path.format(run=run), method=method, body=body,
                             headers={'Content-Type': 'application/json'}, expect_errors=True)
        assert 400 <= resp.status_int < 500, (body[:20], resp.status)
        assert resp.json['title'], body[:20]
    assert alice.run_info(run)['numWaiting'] == 3


@pytest.mark.parametrize('body', [
    {}, {'numTasks': 0}, {'numTasks': -5}, {'numTasks': 2**31}, {'numTasks': 10**30},
    {'numTasks': 10.0}, {'numTasks': '10'}, {'numTasks': True}, {'numTasks': None},
    {'numTasks': 5, 'timout': 5}, {'numTasks': 5, 'timeout': 0},
    {'numTasks': 5, 'timeout': 31536001}, {'numTasks': 5, 'maxAttempts': 1001},
    {'numTasks': 5, 'name': 'n' * 201}, {'numTasks': 5, 'name': 7},
    {'numTasks': 5, 'retries': -1}, {'numTasks': 5, 'retries': 101},
    {'numTasks': 5, 'maxFailures': 0}, {'numTasks': 5, 'maxFailures': 2**31},
    {'numTasks': 5, 'maxFailures': '3'},
])
def test_create_run_refuses_bad_bodies_naming_the_problem(alice, body):
    resp = alice.post_json('/api/run', body, status=400)
    assert resp.json['description']


@pytest.mark.parametrize('path', [
    '/api/runs/' + 'a' * 5000, '/api/runs/%00', '/api/runs/%ff%fe/tasks/0',
    '/api/runs/' + UNKNOWN_RUN + '/tasks/0?info=' + 'x' * 5000,
    '/api/runs/' + UNKNOWN_RUN + '/tasks?limit=99999999999999999999',
    '/api/workers/%00/heartbeat', '/api/nope',
])
def test_odd_paths_get_a_json_4xx(alice, path):
    for method in ('GET', 'POST', 'PUT', 'DELETE'):
        resp = alice.request(path, method=method, expect_errors=True)
        assert 400 <= resp.status_int < 500, (method, resp.status)
        assert resp.json['title']


def test_error_bodies_are_json_whatever_the_client_accepts(alice):
    resp = alice.get(f'/api/runs/{UNKNOWN_RUN}', headers={'Accept': 'application/xml'},
                     status=404)
    assert resp.content_type == 'application/json' and resp.json['title'] == 'Unknown run'


# ---------------------------------------------------------------------------
# Admin command.


def test_admin_init_db_twice_and_user_commands(tmp_path, capsys, monkeypatch):
    import admin

    monkeypatch.setenv('DATABASE_URL', f'sqlite:///{tmp_path / "a.db"}')
    admin.main(['init-db'])
    admin.main(['init-db'])
    admin.main(['adduser', 'carol', '--password', 'pw', '--admin'])
    admin.main(['--init-db', '-u', 'dave', '-p', 'pw2'])
    admin.main(['passwd', 'carol', '--password', 'new'])
    admin.main(['users'])
    assert 'carol (admin): 0 run(s)\ndave: 0 run(s)' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        admin.main(['adduser', 'carol', '--password', 'again'])
    admin.main(['deluser', 'dave'])
    with pytest.raises(SystemExit):
        admin.main(['deluser', 'dave'])


# ---------------------------------------------------------------------------
# The original client, taskfarm-worker 0.4.0, against a live server.


def original_worker(url: str, password: str, run: str, out: multiprocessing.Queue) -> None:
    from taskfarm_worker import TaskFarmWorker

    tf = TaskFarmWorker('alice', password, run, url_base=url)
    for task in tf.tasks:
        for percent in (25, 50, 100):
            tf.update(percent)
        tf.done()
        out.put(task)


def test_original_client_example_completes_every_task_once(live_server):
    from taskfarm_worker import TaskFarm

    tf = TaskFarm('alice', live_server.password, numTasks=20, url_base=live_server.api)
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=original_worker,
                                       args=(live_server.api, live_server.password, tf.uuid,
                                             results))
               for _ in range(5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    done = sorted(results.get(timeout=5) for _ in range(20))
    assert done == list(range(20)) and results.empty()
    assert (tf.numDone, tf.numWaiting, tf.numComputing, tf.percentDone) == (20, 0, 0, 100)


def test_original_client_run_methods(live_server):
    from taskfarm_worker import TaskFarm, TaskFarmWorker, tfRuns

    user, password, url = live_server.user, live_server.password, live_server.api
    created = TaskFarm(user, password, numTasks=6, url_base=url)
    tf = TaskFarm(user, password, uuid=created.uuid, url_base=url)
    assert tf.numTasks == 6
    assert tf.info('')['numWaiting'] == 6
    assert [r['uuid'] for r in tfRuns(user, password, url_base=url)] == [tf.uuid]
    worker = TaskFarmWorker(user, password, tf.uuid, url_base=url)
    assert worker.task == 0
    worker.update(100)
    worker.done()
    tf.setTaskInfo(1, 'percentCompleted', 50)
    assert tf.getTaskInfo(1, 'percentCompleted') == 50
    assert tf.getTaskInfo(0, 'status') == 'done' and tf.getTaskInfo(1, '')['status'] == 'waiting'
    assert (tf.numDone, tf.numComputing, tf.numWaiting) == (1, 0, 5)
    assert tf.percentDone == pytest.approx(150 / 6)
    tf.restart()
    assert (tf.numDone, tf.getTaskInfo(1, 'percentCompleted')) == (1, 50)
    tf.restart(everything=True)
    assert (tf.numDone, tf.percentDone) == (0, 0)
    tf.delete()
    with pytest.raises(RuntimeError):
        TaskFarm(user, password, uuid=tf.uuid, url_base=url)


def test_live_server_keeps_the_connection_open_after_a_204(live_server):
    """A worker's progress PUTs answer 204: each must not cost a new connection."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(live_server.url).hostname,
                                       urlsplit(live_server.url).port, timeout=10)
    auth = 'Basic ' + base64.b64encode(f'alice:{live_server.password}'.encode()).decode()
    headers = {'Authorization': auth, 'Content-Type': 'application/json'}
    conn.request('POST', '/api/run', '{"numTasks": 2}', headers)
    run = json.loads(conn.getresponse().read())['uuid']
    sock = conn.sock
    for percent in (10, 20, 30):
        conn.request('PUT', f'/api/runs/{run}/tasks/0', f'{{"percentCompleted": {percent}}}',
                     headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 204 and resp.getheader('Connection') != 'close'
    conn.request('GET', f'/api/runs/{run}/tasks/0?info=percentCompleted', headers=headers)
    assert json.loads(conn.getresponse().read()) == {'percentCompleted': 30}
    assert conn.sock is sock        # the same connection all along
    conn.close()


def manage(server, *args: str) -> str:
    command = [str(Path(sys.executable).parent / 'manageTF'), '-b', server.api,
               '-u', server.user, '-p', server.password, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_original_manage_command(live_server):
    from taskfarm_worker import TaskFarm

    tf = TaskFarm('alice', live_server.password, numTasks=3, url_base=live_server.api)
    tf.setTaskInfo(0, 'status', 'done')
    tf.setTaskInfo(1, 'status', 'computing')
    run_id = tf.info('')['id']
    assert manage(live_server, '--list') == f'{run_id} {tf.uuid} 3\n'
    assert manage(live_server, '-i', tf.uuid) == f'{run_id} {tf.uuid} 3 (1,1,1) 0.0\n'
    manage(live_server, '-r', tf.uuid)
    assert (tf.numDone, tf.numWaiting) == (1, 2)
    manage(live_server, '-R', tf.uuid)
    assert tf.numWaiting == 3
    manage(live_server, '-d', tf.uuid)
    assert manage(live_server, '--list') == ''


# ---------------------------------------------------------------------------
# Serving: waitress as taskfarm_channel() changes it, and the default processes.


def raw_exchange(server, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes to a live server; its status, headers and body."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def basic(server) -> str:
    return 'Basic ' + base64.b64encode(f'{server.user}:{server.password}'.encode()).decode()


def test_errors_that_waitress_answers_itself_are_json(live_server):
    run = b'/api/runs/' + b'0' * 32 + b'/task'
    auth = basic(live_server).encode()
    cases = {
        'malformed request line': (b'NOT A REQUEST\r\n\r\n', 400),
        'headers too large': (b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 300_000
                              + b'\r\n\r\n', 431),
        'body over waitress limit': (b'POST ' + run + b' HTTP/1.1\r\nHost: x\r\n'
                                     b'Authorization: ' + auth + b'\r\n'
                                     b'Content-Length: 5000000\r\n\r\n', 413),
        'body over the app limit': (b'POST ' + run + b' HTTP/1.1\r\nHost: x\r\n'
                                    b'Authorization: ' + auth + b'\r\n'
                                    b'Content-Length: 70000\r\nConnection: close\r\n\r\n'
                                    + b'{' * 70000, 413),
    }
    for why, (request, expected) in cases.items():
        status, headers, body = raw_exchange(live_server, request)
        assert status == expected, why
        assert headers['Content-Type'].startswith('application/json'), why
        assert json.loads(body)['title'], why


def test_server_runs_one_process_per_core_on_postgresql_and_one_on_sqlite(servers,
                                                                         database_url):
    server = servers(workers=None)
    expected = os.cpu_count() if database_url.startswith('postgresql') else 1
    assert f'({expected} process(es)' in server.banner, server.banner
