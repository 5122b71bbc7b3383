"""The API contract (shared/API.md) through webtest, on sqlite and PostgreSQL,
and the original client `taskfarm-worker` 0.4.0 against a live server."""

from __future__ import annotations

import base64
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

import taskfarm
from conftest import PASSWORDS

UNKNOWN_RUN = '0' * 32


def create_run(client, num_tasks: int = 10, status: int = 201, **extra) -> dict:
    return client.post_json('/api/run', {'numTasks': num_tasks, **extra}, status=status).json


def register_worker(client, uuid: str = 'w1', hostname: str = 'node1', pid: int = 42) -> str:
    client.post_json('/api/worker', {'uuid': uuid, 'hostname': hostname, 'pid': pid},
                     status=201)
    return uuid


def claim(client, run: str, worker: str, status: int = 201):
    return client.post_json(f'/api/runs/{run}/task', {'worker_uuid': worker}, status=status)


def run_info(client, run: str) -> dict:
    return client.get(f'/api/runs/{run}').json


def put_task(client, run: str, task: int, body: dict, status: int = 204):
    return client.put_json(f'/api/runs/{run}/tasks/{task}', body, status=status)


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
    run = create_run(alice, 10)
    assert set(run) == {'id', 'uuid', 'numTasks'}
    assert run['numTasks'] == 10 and len(run['uuid']) == 32
    assert int(run['uuid'], 16) >= 0 and run['uuid'] == run['uuid'].lower()


def test_new_run_counts_every_task_as_waiting(alice):
    run = create_run(alice, 10)
    info = run_info(alice, run['uuid'])
    assert info == {'id': run['id'], 'uuid': run['uuid'], 'numTasks': 10, 'name': None,
                    'timeout': None, 'maxAttempts': None, 'percentDone': 0.0,
                    'numWaiting': 10, 'numComputing': 0, 'numDone': 0, 'numFailed': 0}


def test_run_of_a_billion_tasks_writes_no_task_rows(alice, db):
    run = create_run(alice, 10**9)
    assert run_info(alice, run['uuid'])['numWaiting'] == 10**9
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


def test_runs_are_listed_oldest_first(alice):
    first, second = create_run(alice, 3), create_run(alice, 5, name='sweep')
    data = alice.get('/api/runs').json['data']
    assert [r['uuid'] for r in data] == [first['uuid'], second['uuid']]
    assert data[1] == {'id': second['id'], 'uuid': second['uuid'], 'numTasks': 5,
                       'name': 'sweep'}


@pytest.mark.parametrize('info', ['percentDone', 'numWaiting', 'numDone', 'numComputing',
                                  'numFailed'])
def test_run_info_query_answers_one_value(alice, info):
    run = create_run(alice, 4)
    assert alice.get(f"/api/runs/{run['uuid']}", {'info': info}).json == {
        info: run_info(alice, run['uuid'])[info]}


def test_unknown_run_or_info_is_404(alice):
    run = create_run(alice, 4)
    alice.get(f'/api/runs/{UNKNOWN_RUN}', status=404)
    alice.get('/api/runs/not-a-uuid', status=404)
    assert alice.get(f"/api/runs/{run['uuid']}", {'info': 'bogus'}, status=404).json['title']


def test_delete_run_removes_it_and_its_tasks(alice, db):
    run = create_run(alice, 4)
    worker = register_worker(alice)
    claim(alice, run['uuid'], worker)
    alice.delete(f"/api/runs/{run['uuid']}", status=204)
    alice.get(f"/api/runs/{run['uuid']}", status=404)
    alice.delete(f"/api/runs/{run['uuid']}", status=404)
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


# ---------------------------------------------------------------------------
# Hand-out.


def test_handout_goes_in_order_then_answers_204(alice):
    run = create_run(alice, 3)
    worker = register_worker(alice)
    handed = [claim(alice, run['uuid'], worker).json for _ in range(3)]
    assert [t['task'] for t in handed] == [0, 1, 2]
    assert handed[0] == {'id': handed[0]['id'], 'task': 0, 'percentCompleted': 0.0,
                         'status': 'computing', 'attempts': 1}
    resp = claim(alice, run['uuid'], worker, status=204)
    assert resp.body == b''
    info = run_info(alice, run['uuid'])
    assert (info['numComputing'], info['numWaiting']) == (3, 0)


def test_handout_prefers_waiting_rows_lowest_first(alice):
    run = create_run(alice, 10)
    worker = register_worker(alice)
    for _ in range(4):
        claim(alice, run['uuid'], worker)
    put_task(alice, run['uuid'], 3, {'status': 'waiting'})
    put_task(alice, run['uuid'], 1, {'status': 'waiting'})
    put_task(alice, run['uuid'], 7, {'percentCompleted': 5})    # a never-handed task
    order = [claim(alice, run['uuid'], worker).json['task'] for _ in range(4)]
    assert order == [1, 3, 7, 4]


def test_handout_steps_over_tasks_a_put_finished(alice):
    run = create_run(alice, 4)
    worker = register_worker(alice)
    put_task(alice, run['uuid'], 0, {'status': 'done'})
    put_task(alice, run['uuid'], 1, {'status': 'failed'})
    assert [claim(alice, run['uuid'], worker).json['task'] for _ in range(2)] == [2, 3]
    claim(alice, run['uuid'], worker, status=204)


def test_handout_keeps_progress_of_a_restarted_task(alice):
    run = create_run(alice, 2)
    worker = register_worker(alice)
    claim(alice, run['uuid'], worker)
    put_task(alice, run['uuid'], 0, {'percentCompleted': 40.5})
    alice.post(f"/api/runs/{run['uuid']}/restart", status=204)
    again = claim(alice, run['uuid'], worker).json
    assert (again['task'], again['percentCompleted']) == (0, 40.5)


@pytest.mark.parametrize('body, status', [
    ({}, 400), ({'worker_uuid': 5}, 400), ({'worker_uuid': 'ghost'}, 404),
    ({'worker_uuid': 'w1', 'extra': 1}, 400),
])
def test_handout_refuses_bad_or_unknown_workers(alice, body, status):
    run = create_run(alice, 2)
    register_worker(alice)
    resp = alice.post_json(f"/api/runs/{run['uuid']}/task", body, status=status)
    assert resp.json['description']


def test_handout_from_unknown_run_is_404(alice):
    worker = register_worker(alice)
    claim(alice, UNKNOWN_RUN, worker, status=404)


# ---------------------------------------------------------------------------
# Tasks.


def test_task_never_handed_out_reads_as_waiting_without_writing(alice, db):
    run = create_run(alice, 5)
    task = alice.get(f"/api/runs/{run['uuid']}/tasks/3").json
    assert task == {'id': None, 'task': 3, 'percentCompleted': 0.0, 'status': 'waiting',
                    'attempts': 0}
    assert db.one('SELECT count(*) AS n FROM tasks')['n'] == 0


@pytest.mark.parametrize('info', ['status', 'percentCompleted', 'percentDone', 'attempts'])
def test_task_info_query_answers_one_value(alice, info):
    run = create_run(alice, 5)
    put_task(alice, run['uuid'], 2, {'percentCompleted': 12.5})
    value = alice.get(f"/api/runs/{run['uuid']}/tasks/2", {'info': info}).json
    assert value == {info: {'status': 'waiting', 'percentCompleted': 12.5,
                            'percentDone': 12.5, 'attempts': 0}[info]}


@pytest.mark.parametrize('path', ['/tasks/5', '/tasks/-1', '/tasks/99999999999999999999',
                                  '/tasks/x'])
def test_task_outside_the_run_is_404(alice, path):
    run = create_run(alice, 5)
    alice.get(f"/api/runs/{run['uuid']}{path}", status=404)
    alice.put_json(f"/api/runs/{run['uuid']}{path}", {'status': 'done'}, status=404)


def test_put_updates_progress_and_status_and_run_counts(alice):
    run = create_run(alice, 4)
    worker = register_worker(alice)
    task = claim(alice, run['uuid'], worker).json['task']
    put_task(alice, run['uuid'], task, {'percentCompleted': 50})
    put_task(alice, run['uuid'], task, {'percentCompleted': 100, 'status': 'done'})
    put_task(alice, run['uuid'], 3, {'status': 'failed'})
    info = run_info(alice, run['uuid'])
    assert (info['numDone'], info['numFailed'], info['numWaiting']) == (1, 1, 2)
    assert info['percentDone'] == 25.0
    assert alice.get(f"/api/runs/{run['uuid']}/tasks/{task}").json['status'] == 'done'


@pytest.mark.parametrize('body', [
    {}, [], 'x', {'status': 'finished'}, {'status': None}, {'percentCompleted': 101},
    {'percentCompleted': -1}, {'percentCompleted': '50'}, {'percentCompleted': True},
    {'percentDone': 50}, {'status': 'done', 'worker': 'x'},
])
def test_put_refuses_bad_bodies(alice, body):
    run = create_run(alice, 4)
    resp = put_task(alice, run['uuid'], 0, body, status=400)
    assert resp.json['description']
    assert alice.get(f"/api/runs/{run['uuid']}/tasks/0").json['id'] is None


# ---------------------------------------------------------------------------
# Restart.


def finish_some(client, run: str) -> None:
    """Tasks 0 done at 100%, 1 computing at 30%, 2 failed at 60%, 3 untouched."""
    worker = register_worker(client)
    for _ in range(3):
        claim(client, run, worker)
    put_task(client, run, 0, {'percentCompleted': 100, 'status': 'done'})
    put_task(client, run, 1, {'percentCompleted': 30})
    put_task(client, run, 2, {'percentCompleted': 60, 'status': 'failed'})


def task_states(client, run: str, count: int) -> list[tuple[str, float]]:
    tasks = [client.get(f'/api/runs/{run}/tasks/{n}').json for n in range(count)]
    return [(t['status'], t['percentCompleted']) for t in tasks]


def test_restart_keeps_progress_of_unfinished_tasks(alice):
    run = create_run(alice, 4)['uuid']
    finish_some(alice, run)
    alice.post(f'/api/runs/{run}/restart', {'all': 'False'}, status=204)
    assert task_states(alice, run, 4) == [('done', 100), ('waiting', 30), ('waiting', 60),
                                          ('waiting', 0)]
    assert run_info(alice, run)['numWaiting'] == 3


@pytest.mark.parametrize('value', ['True', 'true', 'TRUE'])
def test_restart_all_resets_every_task(alice, value):
    run = create_run(alice, 4)['uuid']
    finish_some(alice, run)
    alice.post(f'/api/runs/{run}?all={value}'.replace('?', '/restart?'), status=204)
    assert task_states(alice, run, 4) == [('waiting', 0)] * 4
    info = run_info(alice, run)
    assert (info['numWaiting'], info['percentDone']) == (4, 0.0)


def test_restart_refuses_other_values_and_unknown_runs(alice):
    run = create_run(alice, 4)['uuid']
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
    {'uuid': 'w', 'hostname': 'h', 'pid': 1, 'port': 2}, {'uuid': 'w\x00', 'hostname': 'h', 'pid': 1},
    {'uuid': 'w\ud800', 'hostname': 'h', 'pid': 1},
])
def test_worker_registration_refuses_bad_bodies(alice, body):
    assert alice.post_json('/api/worker', body, status=400).json['description']


# ---------------------------------------------------------------------------
# Part 2: owners, leases, failure, names, listings.


def test_other_users_runs_are_invisible_but_admins_see_all(alice, bob, root):
    run = create_run(alice, 3)['uuid']
    assert bob.get('/api/runs').json['data'] == []
    bob.get(f'/api/runs/{run}', status=404)
    bob.get(f'/api/runs/{run}/tasks/0', status=404)
    bob.put_json(f'/api/runs/{run}/tasks/0', {'status': 'done'}, status=404)
    bob.post(f'/api/runs/{run}/restart', status=404)
    claim(bob, run, register_worker(bob, 'bw'), status=404)
    bob.delete(f'/api/runs/{run}', status=404)
    assert [r['uuid'] for r in root.get('/api/runs').json['data']] == [run]
    assert run_info(root, run)['numWaiting'] == 3


def test_expired_lease_is_handed_out_again(alice, db):
    run = create_run(alice, 1, timeout=30)['uuid']
    first, second = register_worker(alice, 'a'), register_worker(alice, 'b')
    claim(alice, run, first)
    claim(alice, run, second, status=204)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    again = claim(alice, run, second).json
    assert (again['task'], again['attempts']) == (0, 2)
    listed = alice.get(f'/api/runs/{run}/tasks').json['data']
    assert listed[0]['worker']['uuid'] == 'b'


def test_put_and_heartbeat_renew_the_lease(alice, db):
    run = create_run(alice, 2, timeout=30)['uuid']
    worker = register_worker(alice)
    claim(alice, run, worker)
    claim(alice, run, worker)
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    put_task(alice, run, 0, {'percentCompleted': 10})
    alice.post(f'/api/workers/{worker}/heartbeat', status=204)
    claim(alice, run, register_worker(alice, 'other'), status=204)


def test_put_naming_a_worker_that_lost_the_task_is_409(alice, db):
    run = create_run(alice, 1, timeout=30)['uuid']
    first, second = register_worker(alice, 'a'), register_worker(alice, 'b')
    claim(alice, run, first)
    put_task(alice, run, 0, {'percentCompleted': 10, 'worker_uuid': first})
    db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    claim(alice, run, second)
    late = put_task(alice, run, 0, {'status': 'waiting', 'worker_uuid': first}, status=409)
    assert 'does not hold' in late.json['description']
    put_task(alice, run, 0, {'status': 'done', 'percentCompleted': 100, 'worker_uuid': second})
    assert run_info(alice, run)['numDone'] == 1
    put_task(alice, run, 0, {'worker_uuid': second}, status=400)


def test_task_put_back_to_waiting_has_no_worker(alice):
    run = create_run(alice, 1)['uuid']
    claim(alice, run, register_worker(alice))
    put_task(alice, run, 0, {'status': 'waiting'})
    assert alice.get(f'/api/runs/{run}/tasks').json['data'][0]['worker'] is None


def test_heartbeat_of_unknown_or_foreign_worker_is_404(alice, bob):
    register_worker(alice)
    alice.post('/api/workers/ghost/heartbeat', status=404)
    bob.post('/api/workers/w1/heartbeat', status=404)


def test_task_out_of_attempts_fails_when_its_lease_runs_out(alice, db):
    run = create_run(alice, 1, timeout=30, maxAttempts=2)['uuid']
    worker = register_worker(alice)
    for attempt in (1, 2):
        assert claim(alice, run, worker).json['attempts'] == attempt
        db.execute('UPDATE tasks SET lease_expires = :past', {'past': time.time() - 1})
    assert run_info(alice, run)['numComputing'] == 1   # expired still counts as computing
    claim(alice, run, worker, status=204)
    info = run_info(alice, run)
    assert (info['numFailed'], info['numComputing']) == (1, 0)
    alice.post(f'/api/runs/{run}/restart', status=204)
    assert claim(alice, run, worker).json['task'] == 0


def test_run_without_timeout_never_takes_a_task_back(alice, db):
    run = create_run(alice, 1)['uuid']
    claim(alice, run, register_worker(alice))
    db.execute('UPDATE tasks SET updated = 0, started = 0')
    claim(alice, run, register_worker(alice, 'other'), status=204)


def test_failed_task_waits_for_a_restart(alice):
    run = create_run(alice, 1)['uuid']
    worker = register_worker(alice)
    claim(alice, run, worker)
    put_task(alice, run, 0, {'status': 'failed'})
    claim(alice, run, worker, status=204)
    assert alice.get(f'/api/runs/{run}', {'info': 'numFailed'}).json == {'numFailed': 1}


def test_task_listing_filters_and_pages(alice):
    run = create_run(alice, 10)['uuid']
    worker = register_worker(alice, 'w', 'node7', 99)
    for _ in range(5):
        claim(alice, run, worker)
    put_task(alice, run, 1, {'status': 'done', 'percentCompleted': 100})
    put_task(alice, run, 3, {'status': 'done', 'percentCompleted': 100})
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


def test_worker_listing_shows_own_workers_and_what_they_hold(alice, bob, root):
    run = create_run(alice, 5)['uuid']
    worker = register_worker(alice, 'w', 'node1', 7)
    register_worker(bob, 'bw')
    claim(alice, run, worker)
    claim(alice, run, worker)
    mine = alice.get('/api/workers').json['data']
    assert [(w['uuid'], w['hostname'], w['pid'], w['numComputing']) for w in mine] == [
        ('w', 'node1', 7, 2)]
    assert mine[0]['start'].endswith('Z') and mine[0]['lastSeen'] >= mine[0]['start']
    assert {w['uuid'] for w in root.get('/api/workers').json['data']} == {'w', 'bw'}


# ---------------------------------------------------------------------------
# Bad input: every route, never a 500.

BAD_BODIES = [b'', b'{', b'null', b'[]', b'"x"', b'1', b'{"a":1}', b'\xff\xfe',
              b'{"numTasks": NaN}', b'{"numTasks": 1e999}', b'[' * 100000,
              b'{"x": "' + b'y' * 70000 + b'"}']
ROUTES = [('POST', '/api/run'), ('POST', '/api/runs/{run}/task'),
          ('PUT', '/api/runs/{run}/tasks/0'), ('POST', '/api/worker')]


@pytest.mark.parametrize('method, path', ROUTES)
def test_malformed_bodies_get_a_json_4xx_on_every_route(alice, method, path):
    run = create_run(alice, 3)['uuid']
    for body in BAD_BODIES:
        resp = alice.request(path.format(run=run), method=method, body=body,
                             headers={'Content-Type': 'application/json'}, expect_errors=True)
        assert 400 <= resp.status_int < 500, (body[:20], resp.status)
        assert resp.json['title'], body[:20]
    assert run_info(alice, run)['numWaiting'] == 3


@pytest.mark.parametrize('body', [
    {}, {'numTasks': 0}, {'numTasks': -5}, {'numTasks': 2**31}, {'numTasks': 10**30},
    {'numTasks': 10.0}, {'numTasks': '10'}, {'numTasks': True}, {'numTasks': None},
    {'numTasks': 5, 'timout': 5}, {'numTasks': 5, 'timeout': 0},
    {'numTasks': 5, 'timeout': 31536001}, {'numTasks': 5, 'maxAttempts': 1001},
    {'numTasks': 5, 'name': 'n' * 201}, {'numTasks': 5, 'name': 7},
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


def original_worker(url: str, run: str, out: multiprocessing.Queue) -> None:
    from taskfarm_worker import TaskFarmWorker

    tf = TaskFarmWorker('alice', PASSWORDS['alice'], run, url_base=url)
    for task in tf.tasks:
        for percent in (25, 50, 100):
            tf.update(percent)
        tf.done()
        out.put(task)


def test_original_client_example_completes_every_task_once(live_server):
    from taskfarm_worker import TaskFarm

    tf = TaskFarm('alice', PASSWORDS['alice'], numTasks=20, url_base=live_server.api)
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=original_worker,
                                       args=(live_server.api, tf.uuid, results))
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

    user, password, url = 'alice', PASSWORDS['alice'], live_server.api
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
    auth = 'Basic ' + base64.b64encode(f'alice:{PASSWORDS["alice"]}'.encode()).decode()
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


def manage(url: str, *args: str) -> str:
    command = [str(Path(sys.executable).parent / 'manageTF'), '-b', url,
               '-u', 'alice', '-p', PASSWORDS['alice'], *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_original_manage_command(live_server):
    from taskfarm_worker import TaskFarm

    tf = TaskFarm('alice', PASSWORDS['alice'], numTasks=3, url_base=live_server.api)
    tf.setTaskInfo(0, 'status', 'done')
    tf.setTaskInfo(1, 'status', 'computing')
    run_id = tf.info('')['id']
    assert manage(live_server.api, '--list') == f'{run_id} {tf.uuid} 3\n'
    assert manage(live_server.api, '-i', tf.uuid) == f'{run_id} {tf.uuid} 3 (1,1,1) 0.0\n'
    manage(live_server.api, '-r', tf.uuid)
    assert (tf.numDone, tf.numWaiting) == (1, 2)
    manage(live_server.api, '-R', tf.uuid)
    assert tf.numWaiting == 3
    manage(live_server.api, '-d', tf.uuid)
    assert manage(live_server.api, '--list') == ''
