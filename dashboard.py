"""The web dashboard: server-rendered HTML pages over the same database.

`GET /runs` lists the signed-in user's runs (an admin's: all) and
`GET /runs/{uuid}` shows one run in detail: its counts, charts of its pace
and of its tasks' durations, its failures grouped by exit code and first
line of message, and forms to restart or delete it. `/runs/{uuid}/failed`
lists one group of failures and `/runs/{uuid}/tasks/{n}` one task with all
its attempts. Sign-in is the browser's own Basic auth with the API's users,
so the owners rule holds here as on the API. Pages work without JavaScript;
a few lines of it refresh the run pages in place every few seconds.

Every number comes from the store (store.py), the API's own. Charts are
inline SVG drawn here, no script. Layout, top-down: the static stylesheet
and script, formatting helpers, charts, page fragments, resources, and
`add_dashboard()` that wires the routes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from urllib.parse import parse_qs, urlencode

import falcon

from store import MAX_INT, Owner, Store, check_run_uuid, valid_text

REFRESH_SECONDS = 5
RUNS_SHOWN = 100            # newest runs on /runs
TASKS_SHOWN = 50            # rows of each task table on a run page
WORKERS_SAMPLE = 5000       # computing tasks whose workers a run page lists
MAX_FORM_BYTES = 4096

FAILURES_SAMPLE = 5000      # newest failed tasks that a run page groups
GROUPS_SHOWN = 20           # biggest groups of failures on a run page
GROUP_TASKS_SHOWN = 200     # tasks of a group per page
ATTEMPTS_SHOWN = 1000       # attempts on a task page
LINE_SHOWN = 200            # characters of a message's first line in tables

CHART_BARS = 60             # the chart of tasks done: one bar a minute, the last hour
CHART_SAMPLE = 10_000       # done tasks it reads at most; older bars say they are not counted
DURATIONS_SAMPLE = 2000     # newest done tasks in the histogram of durations
DURATION_BINS = 20          # about this many bins up to the 99th percentile, then one more
SPARK_BARS = 12             # bars of a run's sparkline on /runs: its last hour
SPARK_SAMPLE = 1000         # done tasks each sparkline reads at most

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
h3 { margin: 1em 0 .3em; font-size: 1em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e0e0e0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.uuid, .asof, .muted, .hint { color: #666; font-size: .85em; }
.uuid { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
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
dd { margin: 0; font-size: 1.3em; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
tr.stale td { background: #fff3e0; }
.flag { color: #bf360c; font-weight: bold; }
.badge { display: inline-block; margin-left: .4em; padding: 0 .4em; border-radius: 3px;
         background: #c62828; color: #fff; font-size: .75em; vertical-align: middle; }
.stopped-note { background: #ffebee; border: 1px solid #e53935; padding: .6em .8em; }
code.line { overflow-wrap: break-word; white-space: pre-wrap; }
td.line { min-width: 14em; }
pre.message { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 24em; overflow: auto;
              margin: .4em 0; padding: .5em .7em; background: #fff; border: 1px solid #e0e0e0;
              font: .85em/1.4 ui-monospace, monospace; }
ol.attempts { list-style: none; padding: 0; }
li.attempt { background: #fff; border: 1px solid #e0e0e0; padding: .5em .8em; margin: .6em 0; }
li.attempt pre.message { background: #fafafa; }
.outcome { font-weight: bold; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(18em, 1fr)); gap: 1em; }
figure.chart { margin: 0; padding: .6em .8em; background: #fff; border: 1px solid #e0e0e0;
               min-width: 0; }
figure.chart figcaption { font-weight: bold; }
figure.chart svg { display: block; width: 100%; height: 8em; }
.chart .top, .chart .axis { color: #666; font-size: .8em; font-variant-numeric: tabular-nums; }
.chart .axis { display: flex; justify-content: space-between; gap: 1em; }
.chart .fill { fill: #43a047; }
#durations .fill { fill: #1e88e5; }
.chart .partial .fill { fill: #a5d6a7; }
.chart .hit { fill: transparent; }
.chart .uncounted .hit { fill: #eceff1; }
.chart g:hover .hit { fill: #f1f8e9; }
.chart .base { stroke: #9e9e9e; stroke-width: 1; }
svg.spark { display: block; width: 8em; height: 1.6em; }
.spark .fill { fill: #43a047; }
.spark .hit { fill: transparent; }
.actions { display: flex; flex-wrap: wrap; gap: 1em; }
.actions form { background: #fff; border: 1px solid #e0e0e0; padding: .6em; max-width: 20em; }
button { font: inherit; padding: .3em .8em; cursor: pointer; }
button.danger { color: #fff; background: #c62828; border: 1px solid #8e0000; }
@media (max-width: 40em) {
  main { padding: .8em .7em; }
  th, td { padding: .25em .4em; }
}
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
# Charts are inline SVG, which needs nothing more.
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


def span(seconds: float) -> str:
    """A duration to three figures, for the edges of a histogram's bins."""
    for unit, size, below in (('ms', 0.001, 1), ('s', 1, 120), ('min', 60, 7200),
                              ('h', 3600, 172800)):
        if seconds < below:
            return f'{seconds / size:.3g} {unit}'
    return f'{seconds / 86400:.3g} d'


def exact_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def iso_time(timestamp: float) -> str:
    """As the API writes times: ISO 8601 UTC to the millisecond."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z')


def moment(timestamp: float | None, now: float) -> str:
    """How long ago, with the exact UTC time on hover."""
    if timestamp is None:
        return '<span class="muted">never</span>'
    return f'<time title="{exact_time(timestamp)}">{duration(now - timestamp)} ago</time>'


def clock(now: float, seconds: bool = True) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime(
        '%H:%M:%S UTC' if seconds else '%H:%M')


def run_title(run: dict) -> str:
    return escape(run['name']) if run['name'] else '<span class="muted">(unnamed)</span>'


def first_line(message: str | None) -> str | None:
    """As the store groups failures: the first line, cut as the store cuts it."""
    if message is None:
        return None
    return message.split('\n', 1)[0][:Store.FIRST_LINE_CHARS]


def line_html(line: str | None) -> str:
    if line is None:
        return '<span class="muted">no message</span>'
    if not line:
        return '<span class="muted">(empty first line)</span>'
    cut = '…' if len(line) > LINE_SHOWN else ''
    return f'<code class="line">{escape(line[:LINE_SHOWN])}{cut}</code>'


def exit_code_html(code: int | None) -> str:
    return '<span class="muted">none</span>' if code is None else str(code)


def text_block(text: str) -> str:
    """Text as it was sent, whitespace and all. The newline after <pre> is
    one the HTML parser drops, so a text's own first newline survives."""
    return f'<pre class="message">\n{escape(text)}</pre>'


def task_link(uuid: str, task: int, text: str | None = None) -> str:
    return f'<a href="/runs/{uuid}/tasks/{task}">{text or task}</a>'


def group_href(uuid: str, exit_code: int | None, line: str | None, after: int = -1) -> str:
    """The page of one group of failures; no `line` means no message."""
    query = {'exitCode': 'none' if exit_code is None else exit_code}
    if line is not None:
        query['line'] = line
    if after >= 0:
        query['after'] = after
    return escape(f'/runs/{uuid}/failed?{urlencode(query)}')


# ---------------------------------------------------------------------------
# The numbers of a run: the API's counts, its recent rate and an ETA.


def summarise(store: Store, who: Owner, run: dict, now: float) -> dict:
    """A run's status (from the store) with its recent rate and an ETA."""
    pace = store.pace(who, run, now)
    if pace['etaSeconds'] == 0:
        eta = 'finished' if run['numFailed'] == 0 else 'finished, with failures'
    elif run['stopped']:
        eta = 'stopped'
    elif pace['etaSeconds'] is not None:
        eta = duration(pace['etaSeconds'])
    else:
        eta = 'unknown'
    return {**run, 'rate': pace['donePerMinute'], 'eta': eta}


def rate_text(rate: float) -> str:
    return f'{rate:,.0f}' if rate >= 100 else f'{rate:.1f}'


def tasks_left(run: dict) -> int:
    return run['numTasks'] - run['numDone'] - run['numFailed']


# ---------------------------------------------------------------------------
# Charts: inline SVG bars that stretch to the page's width (viewBox, and a
# width of 100% in the stylesheet). Their text is HTML around the SVG, so it
# stays readable in a narrow window. Every bar carries its number
# (data-count) and says it in words (<title>, the browser's tooltip).


@dataclass(frozen=True)
class Bar:
    count: int | None               # None: not counted
    title: str                      # plain text, escaped when drawn
    data: tuple[tuple[str, str], ...] = ()   # more data-* attributes
    partial: bool = False           # counted in part: at least `count`


def bars_svg(bars: Sequence[Bar], label: str, css: str = '', height: int = 100) -> str:
    top = max((bar.count or 0 for bar in bars), default=0)
    width = 10 * len(bars)
    drawn = []
    for i, bar in enumerate(bars):
        count = bar.count or 0
        # A bar of a few among thousands still shows.
        tall = max(height * count / top, 1.0) if count else 0.0
        kind = 'uncounted' if bar.count is None else 'partial' if bar.partial else 'counted'
        data = ''.join(f' data-{name}="{escape(value)}"' for name, value in bar.data)
        counted = '' if bar.count is None else f' data-count="{bar.count}"'
        drawn.append(
            f'<g class="{kind}"{counted}{data}><title>{escape(bar.title)}</title>'
            f'<rect class="hit" x="{i * 10}" y="0" width="10" height="{height}"></rect>'
            f'<rect class="fill" x="{i * 10 + 1}" y="{height - tall:.2f}" width="8"'
            f' height="{tall:.2f}"></rect></g>')
    return (f'<svg{css} viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img"'
            f' aria-label="{escape(label)}">{"".join(drawn)}'
            f'<line class="base" x1="0" y1="{height}" x2="{width}" y2="{height}"'
            ' vector-effect="non-scaling-stroke"></line></svg>')


def chart_figure(name: str, caption: str, bars: Sequence[Bar], label: str,
                 axis: Sequence[str], notes: Sequence[str]) -> str:
    top = max((bar.count or 0 for bar in bars), default=0)
    ticks = ''.join(f'<span>{tick}</span>' for tick in axis)
    remarks = ''.join(f'<p class="muted">{note}</p>' for note in notes)
    return (f'<figure class="chart" id="{name}"><figcaption>{caption}</figcaption>'
            f'<div class="top">{number(top)}</div>{bars_svg(bars, label)}'
            f'<div class="axis">{ticks}</div>{remarks}</figure>')


@dataclass(frozen=True)
class Timeline:
    """Tasks done per bar of `width` seconds from `start` (done_by_bar's rows).

    When the store read its whole sample, the bars before the oldest task it
    read were not counted, and the bar holding that task only in part.
    """

    start: float
    width: float
    counts: list[int]
    cut: bool = False       # the sample ran out: bars before first_counted are not counted
    first_counted: int = 0

    @classmethod
    def of(cls, rows: list[dict], start: float, width: float, bars: int,
           sample: int) -> Timeline:
        counts = [0] * bars
        for row in rows:
            # A task done since the page's clock was read counts in the last bar.
            counts[min(row['bar'], bars - 1)] += row['done']
        if rows and rows[0]['sampled'] >= sample:
            reach = min(bars - 1, int((rows[0]['reach'] - start) // width))
            return cls(start, width, counts, cut=True, first_counted=reach)
        return cls(start, width, counts)

    def bars(self, what: str) -> list[Bar]:
        drawn = []
        for i, count in enumerate(self.counts):
            low = self.start + i * self.width
            high = low + self.width
            when = f'{clock(low)} to {clock(high)}'
            data = (('from', iso_time(low)), ('to', iso_time(high)))
            if i < self.first_counted:
                drawn.append(Bar(None, f'{when}: not counted', data))
            elif i == self.first_counted and self.cut:
                drawn.append(Bar(count, f'{when}: at least {number(count)} {what}', data,
                                 partial=True))
            else:
                drawn.append(Bar(count, f'{when}: {number(count)} {what}', data))
        return drawn


def chart_end(run: dict, newest: list[dict], now: float) -> float:
    """The chart of a finished run ends with its last done task; others end now."""
    if tasks_left(run) == 0 and newest:
        return newest[0]['updated']
    return now


def done_chart(store: Store, who: Owner, run: dict, newest: list[dict], now: float) -> str:
    """Tasks done per minute over the run's life, its last hour at most."""
    end = chart_end(run, newest, now)
    bars = max(1, min(CHART_BARS, int((end - run['created']) // 60) + 1))
    start = end - 60 * bars
    rows = store.done_by_bar(who, run['uuid'], start, 60.0, CHART_SAMPLE)
    timeline = Timeline.of(rows, start, 60.0, bars, CHART_SAMPLE)
    notes = []
    if timeline.cut:
        notes.append(f'Only the newest {number(CHART_SAMPLE)} done tasks are read: the '
                     f'minutes before {clock(start + timeline.first_counted * 60, False)} UTC '
                     'are not counted (grey), and the first one shown only in part (light).')
    if not any(timeline.counts):
        notes.append('No task was done in this time.')
    label = (f'Tasks done per minute from {clock(start, False)} to {clock(end, False)} UTC;'
             f' at most {number(max(timeline.counts))} in a minute')
    return chart_figure('done-chart', 'Tasks done per minute', timeline.bars('done'), label,
                        (f'{clock(start, False)} UTC', f'{clock(end, False)} UTC'), notes)


def nice_width(step: float) -> float:
    """The smallest round bin width of at least `step` seconds."""
    for width in (*(unit * 10.0 ** power for power in range(-3, 2) for unit in (1, 2, 5)),
                  60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200):
        if width >= step:
            return width
    return 86400 * math.ceil(step / 86400)


@dataclass(frozen=True)
class Bin:
    low: float
    high: float | None      # None: everything from `low` on
    count: int


def duration_bins(durations: Sequence[float], bins: int = DURATION_BINS) -> list[Bin]:
    """Round bins from the shortest duration to the 99th percentile, and one
    more for the longest 1% when they lie beyond, so that one outlier cannot
    squeeze the rest into a single bar."""
    ordered = sorted(max(0.0, seconds) for seconds in durations)
    if not ordered:
        return []
    shortest, typical = ordered[0], ordered[math.ceil(0.99 * len(ordered)) - 1]
    width = nice_width((typical - shortest) / bins or max(shortest, 1.0) / bins)
    first = math.floor(shortest / width) * width

    def place(seconds: float) -> int:
        # 2.0 // 0.1 is 19.0 in floating point: nudge past such near-misses.
        return math.floor((seconds - first) / width + 1e-9)

    count = place(typical) + 1
    counts = [0] * (count + 1)
    for seconds in ordered:
        counts[min(count, place(seconds))] += 1
    made = [Bin(first + i * width, first + (i + 1) * width, counts[i]) for i in range(count)]
    if counts[count]:
        made.append(Bin(first + count * width, None, counts[count]))
    return made


def bin_edges(b: Bin) -> str:
    return f'{span(b.low)} or more' if b.high is None else f'{span(b.low)} to {span(b.high)}'


def bin_bar(b: Bin) -> Bar:
    return Bar(b.count, f'{bin_edges(b)}: {number(b.count)} tasks',
               (('from', f'{b.low:.6g}'), ('to', '' if b.high is None else f'{b.high:.6g}')))


def durations_chart(run: dict, newest: list[dict]) -> str:
    """A histogram of how long the newest done tasks took, hand-out to done."""
    durations = [row['updated'] - row['started'] for row in newest
                 if row['started'] is not None]
    bins = duration_bins(durations)
    notes = []
    if len(newest) < run['numDone']:
        notes.append(f'The newest {number(len(newest))} of {number(run["numDone"])} '
                     'done tasks.')
    if len(durations) < len(newest):
        notes.append(f'{number(len(newest) - len(durations))} done without a hand-out '
                     'have no duration.')
    if not bins:
        notes.append('No task is done yet.')
    axis: tuple[str, ...] = ()
    if bins:
        last = bins[-1]
        axis = (span(bins[0].low),
                span(last.high) if last.high is not None else f'{span(last.low)} or more')
    label = (f'How long {number(len(durations))} done tasks took, in {len(bins)} bins'
             if bins else 'No task is done yet')
    return chart_figure('durations', 'Task durations, hand-out to done',
                        [bin_bar(b) for b in bins], label, axis, notes)


def sparkline(store: Store, who: Owner, run: dict, now: float) -> str:
    """Tasks done over the run's last hour (or its life so far), in a few bars."""
    width = max(5.0, (now - max(run['created'], now - 3600)) / SPARK_BARS)
    start = now - SPARK_BARS * width
    rows = store.done_by_bar(who, run['uuid'], start, width, SPARK_SAMPLE)
    timeline = Timeline.of(rows, start, width, SPARK_BARS, SPARK_SAMPLE)
    label = (f'Tasks done from {clock(start, False)} to {clock(now, False)} UTC, '
             f'{duration(width)} a bar: {", ".join(map(str, timeline.counts))}')
    return bars_svg(timeline.bars('done'), label, css=' class="spark"')


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


def asof(now: float, refresh: bool = True) -> str:
    then = f'refreshes every {REFRESH_SECONDS} s' if refresh else 'reload to update'
    return f'<p class="asof">As of {clock(now)}; {then}.</p>'


def stopped_badge(run: dict) -> str:
    return ' <span class="badge" data-field="stopped">stopped</span>' if run['stopped'] else ''


def runs_table(summaries: list[dict], sparks: dict[str, str], show_owner: bool) -> str:
    owner_head = '<th>Owner</th>' if show_owner else ''
    rows = []
    for run in summaries:
        owner = f'<td>{escape(run["owner"])}</td>' if show_owner else ''
        rows.append(
            f'<tr id="run-{run["uuid"]}">'
            f'<td><a href="/runs/{run["uuid"]}">{run_title(run)}</a>{stopped_badge(run)}'
            f'<div class="uuid">{run["uuid"]}</div></td>{owner}'
            f'<td class="n" data-field="numTasks">{number(run["numTasks"])}</td>'
            f'<td>{progress_bar(run)}</td>'
            f'<td class="n" data-field="percentDone">{run["percentDone"]:.1f}%</td>'
            f'<td class="n" data-field="rate">{rate_text(run["rate"])}</td>'
            f'<td>{sparks[run["uuid"]]}</td>'
            f'<td class="n" data-field="eta">{run["eta"]}</td></tr>')
    return ('<div class="scroll"><table class="runs"><thead><tr><th>Run</th>' + owner_head +
            '<th class="n">Tasks</th><th>Progress</th><th class="n">% done</th>'
            '<th class="n">Done/min</th><th>Last hour</th><th class="n">ETA</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


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
             ('Max attempts', 'maxAttempts', run['maxAttempts'] or 'no limit'),
             ('Retries', 'retries', run['retries'] or 0),
             ('Max failures', 'maxFailures', run['maxFailures'] or 'no limit')]
    return '<dl class="counts">' + ''.join(
        f'<div><dt>{label}</dt><dd data-field="{key}">{value}</dd></div>'
        for label, key, value in cells) + '</dl>'


def stopped_note(run: dict) -> str:
    if not run['stopped']:
        return ''
    return ('<p class="stopped-note" id="stopped"><strong>Stopped:</strong> failed tasks '
            f'reached this run\'s limit of {number(run["maxFailures"])} (maxFailures); '
            f'{number(run["numFailed"])} are failed now. No task is handed out until a '
            'restart: <em>Restart failed tasks</em> below puts them back and resumes the run.'
            '</p>')


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
            f'<td class="n">{task_link(run["uuid"], row["task"])}</td>{worker_cells(row)}'
            f'<td class="n">{row["percent"]:.1f}%</td><td class="n">{row["attempts"]}</td>'
            f'<td>{moment(row["started"], now)}</td>'
            f'<td>{moment(row["updated"], now)}{flag}</td></tr>')
    return section(
        'computing', f'Computing: {number(run["numComputing"])}', body,
        '<th class="n">Task</th><th>Worker host</th><th class="n">pid</th>'
        '<th class="n">Progress</th><th class="n">Attempts</th><th>Started</th>'
        '<th>Last sign of life</th>',
        'No task is computing.', more(run['numComputing'], len(rows), 'computing'))


def failure_groups(groups: list[dict], run: dict, now: float) -> str:
    """The failed tasks by exit code and first line of message, biggest groups first."""
    if not groups:
        return ''
    uuid = run['uuid']
    body = [f'<tr class="group" data-tasks="{group["tasks"]}"><td class="n">'
            f'<a class="group-link" href="{group_href(uuid, group["exit_code"], group["line"])}"'
            f'>{number(group["tasks"])}</a></td>'
            f'<td class="n">{exit_code_html(group["exit_code"])}</td>'
            f'<td class="line">{line_html(group["line"])}</td>'
            f'<td class="n">{task_link(uuid, group["first_task"])}</td>'
            f'<td>{moment(group["latest"], now)}</td></tr>'
            for group in groups]
    sampled, total = groups[0]['sampled'], groups[0]['groups']
    notes = []
    if sampled < run['numFailed']:
        notes.append(f'Grouped from the newest {number(sampled)} of '
                     f'{number(run["numFailed"])} failed tasks.')
    if total > len(groups):
        rest = sampled - sum(group['tasks'] for group in groups)
        notes.append(f'and {number(total - len(groups))} more groups of '
                     f'{number(rest)} tasks.')
    return ('<div id="failure-groups"><h3>By exit code and first line of message</h3>'
            '<div class="scroll"><table><thead><tr><th class="n">Tasks</th>'
            '<th class="n">Exit code</th><th>First line of message</th>'
            '<th class="n">First task</th><th>Latest</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            + ''.join(f'<p class="muted">{note}</p>' for note in notes) + '</div>')


def failed_row(row: dict, line: str | None, uuid: str, now: float) -> str:
    return (f'<tr data-task="{row["task"]}"><td class="n">{task_link(uuid, row["task"])}</td>'
            f'<td class="n">{exit_code_html(row["exit_code"])}</td>'
            f'<td class="line">{line_html(line)}</td>'
            f'{worker_cells(row)}<td class="n">{row["percent"]:.1f}%</td>'
            f'<td class="n">{row["attempts"]}</td><td>{moment(row["updated"], now)}</td></tr>')


FAILED_HEAD = ('<th class="n">Task</th><th class="n">Exit code</th><th>First line of message</th>'
               '<th>Last worker host</th><th class="n">pid</th><th class="n">Progress</th>'
               '<th class="n">Attempts</th><th>Failed</th>')


def failed_section(rows: list[dict], groups: list[dict], run: dict, now: float) -> str:
    body = [failed_row(row, first_line(row['message']), run['uuid'], now) for row in rows]
    newest = '<h3>Newest failures</h3>' if rows else ''
    return section(
        'failed', f'Failed: {number(run["numFailed"])}', body, FAILED_HEAD,
        'No task has failed.', more(run['numFailed'], len(rows), 'failed'),
        before=failure_groups(groups, run, now) + newest)


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
            after: str, before: str = '') -> str:
    table = (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table></div>'
             if rows else f'<p class="muted">{empty}</p>')
    return f'<section id="{name}"><h2>{heading}</h2>{before}{table}{after}</section>'


@dataclass(frozen=True)
class Action:
    """A button of the run page: a POST form behind a confirmation."""

    path: str               # /runs/{uuid}/<path>
    everything: str         # the restart's `all` field
    label: str
    kind: str               # the button's class
    hint: str
    question: str
    status: str = ''        # the restart's `status` field: only tasks in that status


UNFINISHED = Action('restart', 'false', 'Restart unfinished tasks', 'plain',
                    'Computing and failed tasks go back to waiting; their progress is kept.',
                    'Restart the unfinished tasks of this run?')
FAILED = Action('restart', 'false', 'Restart failed tasks', 'plain',
                'Only the failed tasks go back to waiting; their progress is kept. '
                'A stopped run resumes.',
                'Restart the failed tasks of this run?', status='failed')
EVERYTHING = Action('restart', 'true', 'Restart all tasks', 'danger',
                    'Every task, done ones too, goes back to waiting at 0%.',
                    'Restart ALL tasks of this run from 0%, done ones too?')
DELETE = Action('delete', '', 'Delete run', 'danger',
                'The run and all its tasks are gone for good.',
                'Delete this run and all its tasks? This cannot be undone.')
RESTARTS = (UNFINISHED, FAILED, EVERYTHING)


def action_form(uuid: str, token: str, action: Action, confirmed: bool = False) -> str:
    """A POST form with the CSRF token; JavaScript asks the question before sending."""
    ask = '' if confirmed else f' data-confirm="{escape(action.question)}"'
    everything = (f'<input type="hidden" name="all" value="{action.everything}">'
                  if action.everything else '')
    status = (f'<input type="hidden" name="status" value="{action.status}">'
              if action.status else '')
    hint = '' if confirmed else f'<p class="hint">{escape(action.hint)}</p>'
    return (f'<form method="post" action="/runs/{uuid}/{action.path}"{ask}>'
            f'<input type="hidden" name="csrf" value="{token}">{everything}{status}'
            f'<input type="hidden" name="confirmed" value="{"yes" if confirmed else ""}">'
            f'<button type="submit" class="{action.kind}">{action.label}</button>{hint}</form>')


@dataclass(frozen=True)
class RunView:
    """What a run page shows, as the store gave it."""

    run: dict
    computing: list[dict]
    failed: list[dict]
    groups: list[dict]
    workers: list[dict]
    charts: str


def run_main(view: RunView, token: str, now: float) -> str:
    run = view.run
    forms = ''.join(action_form(run['uuid'], token, action)
                    for action in (*RESTARTS, DELETE))
    return (f'<div class="big"><h1>{run_title(run)}{stopped_badge(run)}</h1>'
            f'<p class="uuid">{run["uuid"]}</p>{asof(now)}{stopped_note(run)}'
            f'{progress_bar(run)}{legend()}{run_counts(run)}</div>'
            f'<section id="charts" class="charts">{view.charts}</section>'
            f'{computing_section(view.computing, run, now)}'
            f'{failed_section(view.failed, view.groups, run, now)}'
            f'{workers_section(view.workers, run, now)}'
            f'<h2>Actions</h2><div class="actions">{forms}</div>')


def back_to_run(uuid: str, name: str | None) -> str:
    title = escape(name) if name else uuid
    return f'<p><a href="/runs/{uuid}">← run {title}</a></p>'


def task_counts(row: dict, now: float) -> str:
    stale = row['status'] == 'computing' and lease_ran_out(row, row['timeout'], now)
    worker = ('<span class="muted">none</span>' if row['worker_uuid'] is None else
              f'<span title="{escape(row["worker_uuid"])}">{escape(row["hostname"])}</span>'
              f' pid {row["pid"]}')
    cells = [('Status', 'status', row['status']),
             ('Progress', 'percentCompleted', f'{row["percent"]:.1f}%'),
             ('Attempts', 'attempts', row['attempts']),
             ('Failures', 'failures', row['failures']),
             ('Exit code', 'exitCode', exit_code_html(row['exit_code'])),
             ('Worker', 'worker', worker),
             ('Handed out', 'started', moment(row['started'], now)),
             ('Last change', 'updated', moment(row['updated'], now)
              + (' <span class="flag">lease ran out</span>' if stale else ''))]
    return '<dl class="counts">' + ''.join(
        f'<div><dt>{label}</dt><dd data-field="{key}">{value}</dd></div>'
        for label, key, value in cells) + '</dl>'


def attempt_item(row: dict, now: float) -> str:
    worker = ('no worker' if row['hostname'] is None else
              f'<span title="{escape(row["worker_uuid"])}">{escape(row["hostname"])}</span>'
              f' pid {row["pid"]}')
    took = (f' · took {duration(row["ended"] - row["started"])}'
            if row['started'] is not None and row['ended'] is not None else '')
    code = '' if row['exit_code'] is None else f' · exit code {row["exit_code"]}'
    message = (text_block(row['message']) if row['message'] is not None
               else '<p class="muted">No message.</p>')
    return (f'<li class="attempt" data-attempt="{row["attempt"]}" '
            f'data-outcome="{escape(row["outcome"])}"><div><strong>Attempt {row["attempt"]}'
            f'</strong> · <span class="outcome">{escape(row["outcome"])}</span>{code}'
            f' · {worker} · started {moment(row["started"], now)}'
            f' · ended {moment(row["ended"], now)}{took}</div>{message}</li>')


NO_ROW = {'status': 'waiting', 'percent': 0.0, 'attempts': 0, 'failures': 0}


def task_main(uuid: str, row: dict, attempts: list[dict], now: float) -> str:
    if row['id'] is None:       # never handed out nor changed: waiting at 0%
        row = {**row, **NO_ROW}
    shown = ([f'<h2>Latest message</h2>{text_block(row["message"])}']
             if row['message'] is not None else [])
    if row['input'] is not None:
        value = json.loads(row['input'])
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        shown.append(f'<h2>Input</h2>{text_block(text)}')
    if attempts:
        history = ('<ol class="attempts">'
                   + ''.join(attempt_item(attempt, now) for attempt in attempts) + '</ol>')
    else:
        history = '<p class="muted">None so far.</p>'
    cut = (f'<p class="muted">The first {number(ATTEMPTS_SHOWN)} attempts.</p>'
           if len(attempts) >= ATTEMPTS_SHOWN else '')
    return (f'{back_to_run(uuid, row["run_name"])}<h1>Task {row["task"]}</h1>'
            f'<p class="uuid">of run {uuid}</p>{asof(now, refresh=False)}'
            f'{task_counts(row, now)}{"".join(shown)}'
            f'<section id="attempts"><h2>Attempts that did not end done: '
            f'{number(len(attempts))}</h2>'
            '<p class="hint">Failed, taken back after the lease ran out, put back or restarted;'
            ' oldest first. A task that is done shows its last attempt above.</p>'
            f'{history}{cut}</section>')


def group_main(run: dict, exit_code: int | None, line: str | None, rows: list[dict],
               after: int, now: float) -> str:
    uuid = run['uuid']
    total = rows[0]['total'] if rows else 0
    body = [failed_row(row, row['line'], uuid, now) for row in rows]
    table = (f'<div class="scroll"><table><thead><tr>{FAILED_HEAD}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>' if rows
             else '<p class="muted">No failed task is in this group now.</p>')
    notes = []
    if run['numFailed'] > FAILURES_SAMPLE:
        notes.append(f'Among the newest {number(FAILURES_SAMPLE)} of '
                     f'{number(run["numFailed"])} failed tasks.')
    if total > len(rows):
        notes.append(f'<a href="{group_href(uuid, exit_code, line, rows[-1]["task"])}">'
                     f'The next {number(min(GROUP_TASKS_SHOWN, total - len(rows)))} of '
                     f'{number(total - len(rows))} more</a>')
    since = f' after task {after}' if after >= 0 else ''
    return (f'{back_to_run(uuid, run["name"])}'
            f'<h1>Failed tasks: exit code {exit_code_html(exit_code)}</h1>'
            f'<p>First line of message: {line_html(line)}</p>{asof(now, refresh=False)}'
            f'<section id="group" data-total="{total}"><h2>{number(total)} tasks{since}</h2>'
            f'{table}</section>' + ''.join(f'<p class="muted">{note}</p>' for note in notes))


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


def chosen_restart(form: dict[str, str]) -> Action:
    choice = (form.get('all', ''), form.get('status', ''))
    for action in RESTARTS:
        if (action.everything, action.status) == choice:
            return action
    raise falcon.HTTPBadRequest(
        title='Invalid restart',
        description='all must be true or false, and status failed or absent '
                    '(only with all=false).')


def bad_param(name: str, what: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title=f'Invalid {name}', description=f'{name} must be {what}.')


def group_of(req: falcon.Request) -> tuple[int | None, str | None, int]:
    """A failure group's exit code, first line and `after` from the query string;
    no `line` means the tasks have no message."""
    code = req.get_param('exitCode', required=True)
    try:
        exit_code = None if code == 'none' else int(code)
    except ValueError:
        raise bad_param('exitCode', 'none or an integer') from None
    if exit_code is not None and not -MAX_INT - 1 <= exit_code <= MAX_INT:
        raise bad_param('exitCode', f'from {-MAX_INT - 1} to {MAX_INT}')
    line = req.get_param('line')
    if line is not None and not valid_text(line, Store.FIRST_LINE_CHARS):
        raise bad_param('line', f'text of at most {Store.FIRST_LINE_CHARS} characters, '
                                'without NUL')
    after = req.get_param_as_int('after', min_value=-1, max_value=MAX_INT, default=-1)
    return exit_code, line, after


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
            sparks = {run['uuid']: sparkline(self.store, who, run, now) for run in runs}
            listing = runs_table(summaries, sparks, show_owner=user['is_admin'])
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
        newest = self.store.newest_done(who, uuid, DURATIONS_SAMPLE)
        view = RunView(
            run, self.store.computing_tasks(who, uuid, TASKS_SHOWN),
            self.store.failed_tasks(who, uuid, TASKS_SHOWN),
            self.store.failure_groups(who, uuid, FAILURES_SAMPLE, GROUPS_SHOWN),
            self.store.run_workers(who, uuid, WORKERS_SAMPLE),
            done_chart(self.store, who, run, newest, now) + durations_chart(run, newest))
        main = run_main(view, csrf_token(self.key, req.context.user, uuid), now)
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
        action = chosen_restart(form)
        who = Owner.of(req.context.user)
        run = self.store.run_summary(who, uuid)
        if self.confirm(req, resp, run, form, action):
            self.store.restart(who, uuid, reset_progress=action is EVERYTHING,
                               status=action.status or None)
            raise falcon.HTTPSeeOther(f'/runs/{uuid}')

    def on_post_delete(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        form = self.checked_form(req, uuid)
        who = Owner.of(req.context.user)
        run = self.store.run_summary(who, uuid)
        if self.confirm(req, resp, run, form, DELETE):
            self.store.delete_run(who, uuid)
            raise falcon.HTTPSeeOther('/runs')


class FailedTasksPage:
    """One group of a run's failures: its tasks, by number, a page at a time."""

    def __init__(self, store: Store, version: str) -> None:
        self.store = store
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        now = time.time()
        who = Owner.of(req.context.user)
        run = self.store.run_summary(who, uuid)
        exit_code, line, after = group_of(req)
        rows = self.store.failed_in_group(who, uuid, exit_code, line, after,
                                          FAILURES_SAMPLE, GROUP_TASKS_SHOWN)
        main = group_main(run, exit_code, line, rows, after, now)
        html_response(resp, page('Failed tasks', req.context.user, main, self.version,
                                 refresh=False))


class TaskPage:
    """One task with all its attempts. It does not refresh itself, so that a
    message can be read and copied in peace."""

    def __init__(self, store: Store, version: str) -> None:
        self.store = store
        self.version = version

    def on_get(self, req: falcon.Request, resp: falcon.Response, uuid: str,
               task: int) -> None:
        now = time.time()
        who = Owner.of(req.context.user)
        row = self.store.task_detail(who, uuid, task)
        attempts = self.store.attempts(who, uuid, task, ATTEMPTS_SHOWN)
        main = task_main(uuid, row, attempts, now)
        html_response(resp, page(f'Task {task}', req.context.user, main, self.version,
                                 refresh=False))


def add_dashboard(app: falcon.App, store: Store, secret: bytes, version: str) -> None:
    """Add the dashboard's pages, forms and static files to the app."""
    run_page = RunPage(store, secret, version)
    app.add_route('/runs', RunsPage(store, version))
    app.add_route('/runs/{uuid}', run_page)
    app.add_route('/runs/{uuid}/restart', run_page, suffix='restart')
    app.add_route('/runs/{uuid}/delete', run_page, suffix='delete')
    app.add_route('/runs/{uuid}/failed', FailedTasksPage(store, version))
    app.add_route(f'/runs/{{uuid}}/tasks/{{task:int(min=0, max={MAX_INT})}}',
                  TaskPage(store, version))
    app.add_route('/static/dashboard.css', StaticFile('text/css; charset=utf-8', STYLESHEET))
    app.add_route('/static/dashboard.js',
                  StaticFile('text/javascript; charset=utf-8', SCRIPT))
