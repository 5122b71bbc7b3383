"""The web dashboard: server-rendered HTML pages over the same database.

`GET /runs` lists the signed-in user's runs (an admin's: all) and
`GET /runs/{uuid}` shows one run in detail, with forms to restart or delete
it. Sign-in is the browser's own Basic auth with the API's users, so the
owners rule holds here as on the API. Pages work without JavaScript; a few
lines of it refresh them in place every few seconds.

Every number comes from the store (store.py), the API's own. Layout,
top-down: the static stylesheet and script, formatting helpers, page
fragments, resources, and `add_dashboard()` that wires the routes.
"""

from __future__ import annotations

import hashlib
import hmac
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from urllib.parse import parse_qs

import falcon

from store import Owner, Store, check_run_uuid

REFRESH_SECONDS = 5
RUNS_SHOWN = 100            # newest runs on /runs
TASKS_SHOWN = 50            # rows of each task table on a run page
WORKERS_SAMPLE = 5000       # computing tasks whose workers a run page lists
MAX_FORM_BYTES = 4096

# ---------------------------------------------------------------------------
# Static files: one stylesheet and one small script, served by the app.

STYLESHEET = """\
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { display: flex; justify-content: space-between; padding: .6em 1.2em;
         background: #263238; color: #eceff1; }
header a { color: #fff; font-weight: bold; text-decoration: none; }
main { padding: 1em 1.2em; max-width: 70em; }
h1 { margin: .2em 0; font-size: 1.5em; overflow-wrap: anywhere; }
h2 { margin: 1.4em 0 .4em; font-size: 1.15em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e0e0e0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.uuid, .asof, .muted, .hint { color: #666; font-size: .85em; }
.uuid { font-family: ui-monospace, monospace; }
.bar { display: flex; height: 1em; min-width: 8em; background: #e0e0e0;
       border-radius: 3px; overflow: hidden; }
.big .bar { height: 2em; margin: .6em 0; }
.runs .bar { width: 16em; }
.seg { display: block; height: 100%; }
.done { background: #43a047; }
.computing { background: #1e88e5; }
.failed { background: #e53935; }
.waiting { background: #cfd8dc; }
.key { display: inline-block; width: .8em; height: .8em; margin-right: .3em; }
dl.counts { display: grid; grid-template-columns: repeat(auto-fill, minmax(9em, 1fr));
            gap: .4em 1em; margin: .6em 0; }
dl.counts div { background: #fff; padding: .4em .6em; border: 1px solid #e0e0e0; }
dt { color: #555; font-size: .85em; }
dd { margin: 0; font-size: 1.3em; font-variant-numeric: tabular-nums; }
tr.stale td { background: #fff3e0; }
.flag { color: #bf360c; font-weight: bold; }
.actions { display: flex; flex-wrap: wrap; gap: 1em; }
.actions form { background: #fff; border: 1px solid #e0e0e0; padding: .6em; max-width: 20em; }
button { font: inherit; padding: .3em .8em; cursor: pointer; }
button.danger { color: #fff; background: #c62828; border: 1px solid #8e0000; }
"""

# Refresh <main> in place (no reload, no flicker) and ask before a form
# marked data-confirm is sent; without JavaScript the server asks instead.
SCRIPT = """\
'use strict';
(function () {
  const seconds = Number(document.body.dataset.refresh || 0);
  async function refresh() {
    try {
      if (!document.hidden) {
        // origin + path: a page opened as http://user:pw@host/ has its
        // credentials in the document URL, and fetch() refuses those.
        const resp = await fetch(location.origin + location.pathname, {cache: 'no-store'});
        if (resp.ok) {
          const page = new DOMParser().parseFromString(await resp.text(), 'text/html');
          const fresh = page.querySelector('main');
          if (fresh) document.querySelector('main').replaceWith(fresh);
        }
      }
    } finally {
      setTimeout(refresh, seconds * 1000);
    }
  }
  if (seconds > 0) setTimeout(refresh, seconds * 1000);
  document.addEventListener('submit', function (event) {
    const form = event.target;
    if (!form.dataset.confirm) return;
    if (window.confirm(form.dataset.confirm)) form.elements.confirmed.value = 'yes';
    else event.preventDefault();
  });
})();
"""

# Bar widths are inline styles; scripts, forms and frames stay same-origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

# ---------------------------------------------------------------------------
# Formatting. Every text that reaches the HTML goes through escape().


def number(value: int) -> str:
    return f'{value:,}'


def share(count: int, total: int) -> str:
    return f'{100 * count / total:.3f}%'


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    minutes = seconds // 60
    if minutes < 60:
        return f'{minutes} min'
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f'{hours} h {minutes} min'
    return f'{hours // 24} d {hours % 24} h'


def moment(timestamp: float | None, now: float) -> str:
    """How long ago, with the exact UTC time on hover."""
    if timestamp is None:
        return '<span class="muted">never</span>'
    exact = datetime.fromtimestamp(timestamp, timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    return f'<time title="{exact}">{duration(now - timestamp)} ago</time>'


def clock(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime('%H:%M:%S UTC')


def run_title(run: dict) -> str:
    return escape(run['name']) if run['name'] else '<span class="muted">(unnamed)</span>'


# ---------------------------------------------------------------------------
# The numbers of a run: the API's counts, its recent rate and an ETA.


def summarise(store: Store, who: Owner, run: dict, now: float) -> dict:
    """A run's status (from the store) with its recent rate and an ETA."""
    pace = store.pace(who, run, now)
    if pace['etaSeconds'] == 0:
        eta = 'finished' if run['numFailed'] == 0 else 'finished, with failures'
    elif pace['etaSeconds'] is not None:
        eta = duration(pace['etaSeconds'])
    else:
        eta = 'unknown'
    return {**run, 'rate': pace['donePerMinute'], 'eta': eta}


def rate_text(rate: float) -> str:
    return f'{rate:,.0f}' if rate >= 100 else f'{rate:.1f}'


# ---------------------------------------------------------------------------
# Page fragments.

PAGE = string.Template("""\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · Taskfarm</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/dashboard.css?v=$version">
$noscript</head>
<body data-refresh="$refresh">
<header><a href="/runs">Taskfarm runs</a><span>signed in as $user</span></header>
<main>
$main
</main>
<script src="/static/dashboard.js?v=$version"></script>
</body></html>
""")

SEGMENTS = (('done', 'numDone'), ('computing', 'numComputing'),
            ('failed', 'numFailed'), ('waiting', 'numWaiting'))


def page(title: str, user: dict, main: str, version: str, refresh: bool = True) -> str:
    """A whole page; title and main are HTML already escaped."""
    seconds = REFRESH_SECONDS if refresh else 0
    noscript = (f'<noscript><meta http-equiv="refresh" content="{seconds}"></noscript>\n'
                if refresh else '')
    return PAGE.substitute(title=title, user=escape(user['username']), main=main,
                           refresh=seconds, noscript=noscript, version=escape(version))


def progress_bar(status: dict) -> str:
    total = status['numTasks']
    label = ', '.join(f'{name} {number(status[key])}' for name, key in SEGMENTS)
    segments = ''.join(
        f'<span class="seg {name}" data-bar="{key}" style="width: {share(status[key], total)}"'
        f' title="{name}: {number(status[key])}"></span>'
        for name, key in SEGMENTS)
    return f'<div class="bar" role="img" aria-label="{label}">{segments}</div>'


def asof(now: float) -> str:
    return (f'<p class="asof">As of {clock(now)}; '
            f'refreshes every {REFRESH_SECONDS} s.</p>')


def runs_table(summaries: list[dict], show_owner: bool) -> str:
    owner_head = '<th>Owner</th>' if show_owner else ''
    rows = []
    for run in summaries:
        owner = f'<td>{escape(run["owner"])}</td>' if show_owner else ''
        rows.append(
            f'<tr id="run-{run["uuid"]}">'
            f'<td><a href="/runs/{run["uuid"]}">{run_title(run)}</a>'
            f'<div class="uuid">{run["uuid"]}</div></td>{owner}'
            f'<td class="n" data-field="numTasks">{number(run["numTasks"])}</td>'
            f'<td>{progress_bar(run)}</td>'
            f'<td class="n" data-field="percentDone">{run["percentDone"]:.1f}%</td>'
            f'<td class="n" data-field="rate">{rate_text(run["rate"])}</td>'
            f'<td class="n" data-field="eta">{run["eta"]}</td></tr>')
    return ('<table class="runs"><thead><tr><th>Run</th>' + owner_head +
            '<th class="n">Tasks</th><th>Progress</th><th class="n">% done</th>'
            '<th class="n">Done/min</th><th class="n">ETA</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def legend() -> str:
    return '<p class="muted">' + ' '.join(
        f'<span class="key {name}"></span>{name}' for name, _ in SEGMENTS) + '</p>'


def run_counts(run: dict) -> str:
    timeout = duration(run['timeout']) if run['timeout'] else 'none'
    cells = [('Tasks', 'numTasks', number(run['numTasks'])),
             ('Done', 'numDone', number(run['numDone'])),
             ('Computing', 'numComputing', number(run['numComputing'])),
             ('Failed', 'numFailed', number(run['numFailed'])),
             ('Waiting', 'numWaiting', number(run['numWaiting'])),
             ('Percent done', 'percentDone', f'{run["percentDone"]:.2f}%'),
             ('Done per minute', 'rate', rate_text(run['rate'])),
             ('ETA', 'eta', run['eta']),
             ('Lease', 'timeout', timeout),
             ('Max attempts', 'maxAttempts', run['maxAttempts'] or 'no limit')]
    return '<dl class="counts">' + ''.join(
        f'<div><dt>{label}</dt><dd data-field="{key}">{value}</dd></div>'
        for label, key, value in cells) + '</dl>'


def worker_cells(row: dict) -> str:
    if row['worker_uuid'] is None:
        return '<td class="muted">none</td><td></td>'
    return (f'<td title="{escape(row["worker_uuid"])}">{escape(row["hostname"])}</td>'
            f'<td class="n">{row["pid"]}</td>')


def lease_ran_out(row: dict, timeout: int | None, now: float) -> bool:
    # A computing task's lease is its last sign of life plus the run's timeout.
    return timeout is not None and row['updated'] is not None and row['updated'] + timeout < now


def more(total: int, shown: int, what: str) -> str:
    if total <= shown:
        return ''
    return f'<p class="muted more">and {number(total - shown)} more {what}.</p>'


def computing_section(rows: list[dict], run: dict, now: float) -> str:
    body = []
    for row in rows:
        stale = lease_ran_out(row, run['timeout'], now)
        flag = ' <span class="flag">lease ran out</span>' if stale else ''
        body.append(
            f'<tr data-task="{row["task"]}"{" class=stale" if stale else ""}>'
            f'<td class="n">{row["task"]}</td>{worker_cells(row)}'
            f'<td class="n">{row["percent"]:.1f}%</td><td class="n">{row["attempts"]}</td>'
            f'<td>{moment(row["started"], now)}</td>'
            f'<td>{moment(row["updated"], now)}{flag}</td></tr>')
    return section(
        'computing', f'Computing: {number(run["numComputing"])}', body,
        '<th class="n">Task</th><th>Worker host</th><th class="n">pid</th>'
        '<th class="n">Progress</th><th class="n">Attempts</th><th>Started</th>'
        '<th>Last sign of life</th>',
        'No task is computing.', more(run['numComputing'], len(rows), 'computing'))


def failed_section(rows: list[dict], run: dict, now: float) -> str:
    body = [f'<tr data-task="{row["task"]}"><td class="n">{row["task"]}</td>'
            f'{worker_cells(row)}<td class="n">{row["percent"]:.1f}%</td>'
            f'<td class="n">{row["attempts"]}</td><td>{moment(row["updated"], now)}</td></tr>'
            for row in rows]
    return section(
        'failed', f'Failed: {number(run["numFailed"])}', body,
        '<th class="n">Task</th><th>Last worker host</th><th class="n">pid</th>'
        '<th class="n">Progress</th><th class="n">Attempts</th><th>Failed</th>',
        'No task has failed.', more(run['numFailed'], len(rows), 'failed'))


def workers_section(rows: list[dict], run: dict, now: float) -> str:
    body = [f'<tr><td title="{escape(row["uuid"])}">{escape(row["hostname"])}</td>'
            f'<td class="n">{row["pid"]}</td><td class="n">{number(row["held"])}</td>'
            f'<td>{moment(row["start"], now)}</td>'
            f'<td>{moment(max(row["last_seen"], row["updated"] or 0), now)}</td></tr>'
            for row in rows]
    note = ''
    if run['numComputing'] > WORKERS_SAMPLE:
        note = (f'<p class="muted">Workers of the {number(WORKERS_SAMPLE)} most recently '
                'active computing tasks.</p>')
    return section(
        'workers', f'Workers: {number(len(rows))}', body,
        '<th>Host</th><th class="n">pid</th><th class="n">Tasks held here</th>'
        '<th>Started</th><th>Last sign of life</th>',
        'No worker holds a task of this run.', note)


def section(name: str, heading: str, rows: list[str], head: str, empty: str,
            after: str) -> str:
    table = (f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
             if rows else f'<p class="muted">{empty}</p>')
    return f'<section id="{name}"><h2>{heading}</h2>{table}{after}</section>'


@dataclass(frozen=True)
class Action:
    """A button of the run page: a POST form behind a confirmation."""

    path: str               # /runs/{uuid}/<path>
    everything: str         # the restart's `all` field
    label: str
    kind: str               # the button's class
    hint: str
    question: str


UNFINISHED = Action('restart', 'false', 'Restart unfinished tasks', 'plain',
                    'Computing and failed tasks go back to waiting; their progress is kept.',
                    'Restart the unfinished tasks of this run?')
EVERYTHING = Action('restart', 'true', 'Restart all tasks', 'danger',
                    'Every task, done ones too, goes back to waiting at 0%.',
                    'Restart ALL tasks of this run from 0%, done ones too?')
DELETE = Action('delete', '', 'Delete run', 'danger',
                'The run and all its tasks are gone for good.',
                'Delete this run and all its tasks? This cannot be undone.')


def action_form(uuid: str, token: str, action: Action, confirmed: bool = False) -> str:
    """A POST form with the CSRF token; JavaScript asks the question before sending."""
    ask = '' if confirmed else f' data-confirm="{escape(action.question)}"'
    everything = (f'<input type="hidden" name="all" value="{action.everything}">'
                  if action.everything else '')
    hint = '' if confirmed else f'<p class="hint">{escape(action.hint)}</p>'
    return (f'<form method="post" action="/runs/{uuid}/{action.path}"{ask}>'
            f'<input type="hidden" name="csrf" value="{token}">{everything}'
            f'<input type="hidden" name="confirmed" value="{"yes" if confirmed else ""}">'
            f'<button type="submit" class="{action.kind}">{action.label}</button>{hint}</form>')


def run_main(run: dict, token: str, computing: list[dict], failed: list[dict],
             workers: list[dict], now: float) -> str:
    forms = ''.join(action_form(run['uuid'], token, action)
                    for action in (UNFINISHED, EVERYTHING, DELETE))
    return (f'<div class="big"><h1>{run_title(run)}</h1>'
            f'<p class="uuid">{run["uuid"]}</p>{asof(now)}'
            f'{progress_bar(run)}{legend()}{run_counts(run)}</div>'
            f'{computing_section(computing, run, now)}{failed_section(failed, run, now)}'
            f'{workers_section(workers, run, now)}'
            f'<h2>Actions</h2><div class="actions">{forms}</div>')


# ---------------------------------------------------------------------------
# CSRF: a form carries an HMAC of the user, their token stamp (which a
# password change renews) and the run; a forged cross-site POST has none.


def csrf_key(secret: bytes) -> bytes:
    # A key of its own, so a CSRF token can never pass for an API token.
    return hmac.new(secret, b'taskfarm dashboard csrf', hashlib.sha256).digest()


def csrf_token(key: bytes, user: dict, uuid: str) -> str:
    payload = f"{user['id']}.{user['token_stamp']}.{uuid}"
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def read_form(req: falcon.Request) -> dict[str, str]:
    """The urlencoded form of a POST: one value per field."""
    raw = req.bounded_stream.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        raise falcon.HTTPContentTooLarge(
            title='Form too large',
            description=f'Dashboard forms are limited to {MAX_FORM_BYTES} bytes.')
    try:
        fields = parse_qs(raw.decode('ascii'), keep_blank_values=True, max_num_fields=10)
    except ValueError:
        raise falcon.HTTPBadRequest(title='Invalid form',
                                    description='Send the form of the run page.') from None
    return {name: values[-1] for name, values in fields.items()}


# ---------------------------------------------------------------------------
# Resources.


def html_response(resp: falcon.Response, text: str) -> None:
    resp.content_type = falcon.MEDIA_HTML
    resp.cache_control = ['no-store']
    resp.set_header('Content-Security-Policy', CONTENT_SECURITY_POLICY)
    resp.set_header('X-Content-Type-Options', 'nosniff')
    resp.text = text


class StaticFile:
    auth_required = False

    def __init__(self, content_type: str, text: str) -> None:
        self.content_type = content_type
        self.text = text

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = self.content_type
        resp.cache_control = ['public', 'max-age=3600']
        resp.text = self.text


class RunsPage:
    def __init__(self, store: Store, version: str) -> None:
        self.store = store
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        now = time.time()
        user, who = req.context.user, Owner.of(req.context.user)
        runs, total = self.store.run_summaries(who, RUNS_SHOWN)
        summaries = [summarise(self.store, who, run, now) for run in runs]
        heading = 'All runs' if user['is_admin'] else 'Your runs'
        if summaries:
            listing = runs_table(summaries, show_owner=user['is_admin'])
            listing += more(total, len(runs), 'older runs')
        else:
            listing = ('<p class="muted">No runs yet. Create one with '
                       '<code>POST /api/run</code>.</p>')
        main = f'<h1>{heading}</h1>{asof(now)}{listing}{legend()}'
        html_response(resp, page(heading, user, main, self.version))


class RunPage:
    def __init__(self, store: Store, secret: bytes, version: str) -> None:
        self.store = store
        self.key = csrf_key(secret)
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        now = time.time()
        who = Owner.of(req.context.user)
        run = summarise(self.store, who, self.store.run_summary(who, uuid), now)
        main = run_main(run, csrf_token(self.key, req.context.user, uuid),
                        self.store.computing_tasks(who, uuid, TASKS_SHOWN),
                        self.store.failed_tasks(who, uuid, TASKS_SHOWN),
                        self.store.run_workers(who, uuid, WORKERS_SAMPLE), now)
        title = escape(run['name']) if run['name'] else uuid
        html_response(resp, page(title, req.context.user, main, self.version))

    def checked_form(self, req: falcon.Request, uuid: str) -> dict[str, str]:
        check_run_uuid(uuid)
        form = read_form(req)
        expected = csrf_token(self.key, req.context.user, uuid)
        # As bytes: compare_digest() raises on non-ASCII str, and forms may send any.
        if not hmac.compare_digest(form.get('csrf', '').encode(), expected.encode()):
            raise falcon.HTTPForbidden(
                title='Invalid form token',
                description='This form is stale or came from another site; '
                            'reload the run page and try again.')
        return form

    def confirm(self, req: falcon.Request, resp: falcon.Response, run: dict,
                form: dict[str, str], action: Action) -> bool:
        """True if the form was confirmed; else answer with a page that asks."""
        if form.get('confirmed') == 'yes':
            return True
        main = (f'<h1>{action.label}: {run_title(run)}</h1>'
                f'<p class="uuid">{run["uuid"]}</p>'
                f'<p>{escape(action.question)} {escape(action.hint)}</p>'
                f'{action_form(run["uuid"], form["csrf"], action, confirmed=True)}'
                f'<p><a href="/runs/{run["uuid"]}">No, back to the run</a></p>')
        html_response(resp, page(action.label, req.context.user, main, self.version,
                                 refresh=False))
        return False

    def on_post_restart(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        form = self.checked_form(req, uuid)
        action = {'false': UNFINISHED, 'true': EVERYTHING}.get(form.get('all', ''))
        if action is None:
            raise falcon.HTTPBadRequest(title='Invalid all',
                                        description='all must be true or false.')
        who = Owner.of(req.context.user)
        run = self.store.run_summary(who, uuid)
        if self.confirm(req, resp, run, form, action):
            self.store.restart(who, uuid, reset_progress=action is EVERYTHING)
            raise falcon.HTTPSeeOther(f'/runs/{uuid}')

    def on_post_delete(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        form = self.checked_form(req, uuid)
        who = Owner.of(req.context.user)
        run = self.store.run_summary(who, uuid)
        if self.confirm(req, resp, run, form, DELETE):
            self.store.delete_run(who, uuid)
            raise falcon.HTTPSeeOther('/runs')


def add_dashboard(app: falcon.App, store: Store, secret: bytes, version: str) -> None:
    """Add the dashboard's pages, forms and static files to the app."""
    run_page = RunPage(store, secret, version)
    app.add_route('/runs', RunsPage(store, version))
    app.add_route('/runs/{uuid}', run_page)
    app.add_route('/runs/{uuid}/restart', run_page, suffix='restart')
    app.add_route('/runs/{uuid}/delete', run_page, suffix='delete')
    app.add_route('/static/dashboard.css', StaticFile('text/css; charset=utf-8', STYLESHEET))
    app.add_route('/static/dashboard.js',
                  StaticFile('text/javascript; charset=utf-8', SCRIPT))
