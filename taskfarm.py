"""Taskfarm: a task-farm server.

A run has N numbered tasks; independent workers ask this server for the next
task number, report progress and mark tasks done. The database hands out the
tasks: every hand-out is one atomic SQL statement, so any number of server
processes can share one PostgreSQL database.

This module is the HTTP side: configuration, auth, request validation, the
Falcon resources and the app factory, and the `taskfarm-server` command.
Every SQL statement lives in the store (store.py); the dashboard
(dashboard.py) is added to the app by `create_app`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import falcon

import dashboard
import metrics
from store import (
    MAX_INT,
    STATUSES,
    DatabaseUnavailable,
    InputsComplete,
    InputsNotExpected,
    Owner,
    RunNotFound,
    Store,
    StoreError,
    TaskNotFound,
    TaskNotHeld,
    Update,
    WorkerNotFound,
    WorkerTaken,
    open_database,
    schema_path,
    valid_text,
)

__version__ = '0.6.0'

# ---------------------------------------------------------------------------
# Configuration: every environment variable, with its default, in one place.


@dataclass(frozen=True)
class Config:
    database_url: str = 'sqlite:///taskfarm.db'
    secret: str | None = None           # else the one init-db stored
    token_ttl: int = 7 * 24 * 3600      # seconds a token stays valid
    auth_cache_seconds: float = 2.0     # revoked users/tokens die within this
    db_timeout: float = 5.0             # wait for a lock, a connection or a reconnect
    pool_size: int = 10                 # PostgreSQL connections per process
    trusted_proxies: tuple[IPNetwork, ...] = ()   # whose X-Forwarded-For is believed
    login_max_failures: int = 5         # failed password checks per name or address...
    login_window: float = 60.0          # ...within this many seconds, then 429 as long
    metrics_allow: tuple[IPNetwork, ...] = (      # who may GET /metrics by address...
        ipaddress.ip_network('127.0.0.0/8'), ipaddress.ip_network('::1/128'))
    metrics_token: str | None = None    # ...or with this bearer token, from anywhere

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get('DATABASE_URL') or cls.database_url,
            secret=env.get('TASKFARM_SECRET') or None,
            token_ttl=int(env.get('TASKFARM_TOKEN_TTL', cls.token_ttl)),
            auth_cache_seconds=float(
                env.get('TASKFARM_AUTH_CACHE_SECONDS', cls.auth_cache_seconds)),
            db_timeout=float(env.get('TASKFARM_DB_TIMEOUT', cls.db_timeout)),
            pool_size=int(env.get('TASKFARM_POOL_SIZE', cls.pool_size)),
            trusted_proxies=trusted_networks(env.get('TASKFARM_TRUSTED_PROXIES', '')),
            login_max_failures=int(
                env.get('TASKFARM_LOGIN_MAX_FAILURES', cls.login_max_failures)),
            login_window=float(env.get('TASKFARM_LOGIN_WINDOW', cls.login_window)),
            metrics_allow=(trusted_networks(env['TASKFARM_METRICS_ALLOW'])
                           if 'TASKFARM_METRICS_ALLOW' in env else cls.metrics_allow),
            metrics_token=env.get('TASKFARM_METRICS_TOKEN') or None,
        )

    @property
    def default_processes(self) -> int:
        """One server process per core on PostgreSQL; one on sqlite, whose
        single write lock two processes would only fight over."""
        if self.database_url.startswith('sqlite'):
            return 1
        return os.cpu_count() or 1


class ConfigError(Exception):
    """The server cannot start as configured; the message says what to do."""


def open_store(config: Config) -> Store:
    return Store(open_database(config.database_url, config.db_timeout, config.pool_size))


MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_SECONDS = 2
MAX_BATCH = 1000            # tasks of one claim, items of one report
MAX_MESSAGE = 4096          # characters of a failure message
MAX_INPUT = 4096            # characters of a task's input
MAX_RANGES = 1000           # items of a restart's `tasks`
MIN_EXIT_CODE = -2**31

# ---------------------------------------------------------------------------
# Auth: salted scrypt password hashes, and HMAC-SHA256 tokens that carry the
# user, an expiry and the user's token stamp (which a password change renews).

SCRYPT = {'n': 2**14, 'r': 8, 'p': 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f'scrypt${salt.hex()}${digest.hex()}'


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split('$')
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt),
                                  dklen=32, **SCRYPT)
    except (ValueError, UnicodeEncodeError):
        return False
    return scheme == 'scrypt' and hmac.compare_digest(computed.hex(), digest)


def sign(secret: bytes, payload: str) -> str:
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b'=').decode()


def issue_token(secret: bytes, user: dict, ttl: int) -> str:
    payload = f"tf1.{user['id']}.{int(time.time()) + ttl}.{user['token_stamp']}"
    return f'{payload}.{sign(secret, payload)}'


def read_token(secret: bytes, token: str) -> tuple[int, str] | None:
    """(user id, token stamp) of a well-signed, unexpired token, else None."""
    payload, _, signature = token.rpartition('.')
    # As bytes: compare_digest refuses str with non-ASCII characters.
    if not hmac.compare_digest(sign(secret, payload).encode(), signature.encode()):
        return None
    try:
        version, user_id, expires, stamp = payload.split('.')
        if version != 'tf1' or int(expires) < time.time():
            return None
        return int(user_id), stamp
    except ValueError:
        return None


class Authenticator:
    """Finds the user of a Basic auth header.

    Users and verified passwords are cached for `auth_cache_seconds`, so the
    hot path costs one HMAC and no query, while a deleted user or a changed
    password still takes effect within that time.
    """

    def __init__(self, store: Store, secret: bytes, config: Config) -> None:
        self.store = store
        self.secret = secret
        self.ttl = config.auth_cache_seconds
        self.users: dict[int, tuple[float, dict | None]] = {}
        self.passwords: dict[bytes, tuple[float, int, str]] = {}
        self.throttle = LoginThrottle(config.login_max_failures, config.login_window)

    def user(self, authorization: str | None, address: str = '') -> dict | None:
        credentials = parse_basic(authorization)
        if credentials is None:
            return None
        name, password = credentials
        found = read_token(self.secret, name) if name.startswith('tf1.') else None
        if found is None:
            found = self.password_user(name, password, address)
        if found is None:
            return None
        user_id, stamp = found
        user = self.user_by_id(user_id)
        if user is None or not hmac.compare_digest(user['token_stamp'], stamp):
            return None
        return user

    def user_by_id(self, user_id: int) -> dict | None:
        now = time.monotonic()
        cached = self.users.get(user_id)
        if cached and cached[0] > now:
            return cached[1]
        user = self.store.user_by_id(user_id)
        self.users[user_id] = (now + self.ttl, user)
        return user

    def password_user(self, name: str, password: str,
                      address: str = '') -> tuple[int, str] | None:
        key = hmac.new(self.secret, f'{name}\0{password}'.encode(), 'sha256').digest()
        now = time.monotonic()
        cached = self.passwords.get(key)
        if cached and cached[0] > now:
            return cached[1], cached[2]
        wait = self.throttle.wait(name, address)
        if wait:
            raise login_throttled(wait)
        row = self.store.user_by_name(name)
        if row is None:
            return None
        if not verify_password(password, row['password_hash']):
            self.throttle.failed(name, address)
            return None
        self.throttle.succeeded(name, address)
        self.passwords[key] = (now + self.ttl, row['id'], row['token_stamp'])
        return row['id'], row['token_stamp']


def parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or header[:6].lower() != 'basic ':
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode('utf-8')
    except (ValueError, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(':')
    # No user name holds a NUL, and PostgreSQL text cannot even be queried with one.
    return (name, password) if sep and '\0' not in name else None


class AuthMiddleware:
    """Puts the caller on req.context.user, or answers 401."""

    def __init__(self, authenticator: Authenticator,
                 trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self.authenticator = authenticator
        self.trusted_proxies = trusted_proxies

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: Any, params: dict) -> None:
        if resource is None or not getattr(resource, 'auth_required', True):
            return
        user = self.authenticator.user(req.get_header('Authorization'),
                                       client_address(req, self.trusted_proxies))
        if user is None:
            raise falcon.HTTPUnauthorized(
                title='Authentication required',
                description='Send HTTP Basic auth: user:password, or a token '
                            'from GET /api/token as the user name.',
                challenges=['Basic realm="taskfarm"'])
        req.context.user = user


# ---------------------------------------------------------------------------
# Login throttling, and the client's address it counts by. A wrong password
# costs a scrypt check (30-60 ms of CPU): after a few for one user name or
# one client address within a window, password logins for that name or
# from that address answer 429 without checking until the window is over.
# Tokens are never throttled, so workers holding one keep working.

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
THROTTLE_TRACKED = 10_000   # names, addresses and known logins remembered, each at most
NAME_KEY_LENGTH = 64        # no user name is longer (admin.py); longer ones share a key

log = logging.getLogger('taskfarm')


def trusted_networks(text: str) -> tuple[IPNetwork, ...]:
    """TASKFARM_TRUSTED_PROXIES: addresses or networks (CIDR), comma-separated."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False)
                 for item in text.split(',') if item.strip())


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
               networks: tuple[IPNetwork, ...]) -> bool:
    return ip is not None and any(ip in network for network in networks)


def client_address(req: falcon.Request, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy.

    Then X-Forwarded-For is read from the right, where each proxy appended
    the address it saw: the client is the first address that is not a
    trusted proxy's. Entries left of it were written by the client itself.
    """
    address = req.remote_addr
    if not trusted_proxies or not is_trusted(parse_ip(address), trusted_proxies):
        return address
    for hop in reversed((req.get_header('X-Forwarded-For') or '').split(',')):
        ip = parse_ip(hop)
        if ip is None:
            break       # nothing, or garbage: the nearest trusted proxy is all we know
        address = str(ip)
        if not is_trusted(ip, trusted_proxies):
            break
    return address


@dataclass
class Strikes:
    """The failed password checks of one name or address in its window."""
    since: float
    count: int = 0
    blocked_until: float = 0.0
    logged: bool = False    # this block's first refusal was logged

    def over(self, now: float, window: float) -> bool:
        return now >= max(self.since + window, self.blocked_until)


class LoginThrottle:
    """Counts failed password checks per user name and per client address.

    `max_failures` within `window` seconds block that name or that address
    for `window` seconds (0 for either turns throttling off). A blocked name
    stays open to the addresses that logged in as it before, so that an
    attacker cannot lock its user out. Memory stays bounded: at most
    THROTTLE_TRACKED names and addresses (the least recently failed are
    forgotten first), and as many known logins.
    """

    def __init__(self, max_failures: int, window: float,
                 tracked: int = THROTTLE_TRACKED) -> None:
        self.enabled = max_failures > 0 and window > 0
        self.max_failures = max_failures
        self.window = window
        self.tracked = tracked
        self.strikes: OrderedDict[tuple[str, str], Strikes] = OrderedDict()
        self.known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.lock = threading.Lock()

    def wait(self, name: str, address: str) -> float:
        """Seconds until name may try a password from address; 0: now."""
        if not self.enabled:
            return 0.0
        name = name[:NAME_KEY_LENGTH]
        now = time.monotonic()
        with self.lock:
            keys = [('address', address)]
            if (name, address) not in self.known:
                keys.append(('user', name))
            return max(self.blocked_for(key, now) for key in keys)

    def blocked_for(self, key: tuple[str, str], now: float) -> float:
        strikes = self.strikes.get(key)
        if strikes is None or strikes.blocked_until <= now:
            return 0.0
        if not strikes.logged:      # one line per block, however many attempts
            strikes.logged = True
            log.warning('login throttled: %s %r had %d failed password checks; its password '
                        'logins get 429 without a check for %.0f s', key[0], key[1],
                        strikes.count, strikes.blocked_until - now)
        return strikes.blocked_until - now

    def failed(self, name: str, address: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self.lock:
            for key in (('address', address), ('user', name[:NAME_KEY_LENGTH])):
                self.strike(key, now)
            self.forget_old(now)

    def strike(self, key: tuple[str, str], now: float) -> None:
        strikes = self.strikes.pop(key, None)   # back in last: the most recently failed
        if strikes is None or strikes.over(now, self.window):
            strikes = Strikes(since=now)
        strikes.count += 1
        if strikes.count >= self.max_failures:
            strikes.blocked_until = now + self.window
        self.strikes[key] = strikes

    def forget_old(self, now: float) -> None:
        while self.strikes:
            oldest = next(iter(self.strikes.values()))
            if len(self.strikes) <= self.tracked and not oldest.over(now, self.window):
                return
            self.strikes.popitem(last=False)

    def succeeded(self, name: str, address: str) -> None:
        if not self.enabled:
            return
        key = (name[:NAME_KEY_LENGTH], address)
        with self.lock:
            self.known.pop(key, None)
            self.known[key] = None
            if len(self.known) > self.tracked:
                self.known.popitem(last=False)


def login_throttled(wait: float) -> falcon.HTTPTooManyRequests:
    seconds = math.ceil(wait)
    return falcon.HTTPTooManyRequests(
        title='Too many failed logins',
        description='Too many wrong passwords for this user or from this address: '
                    f'try again in {seconds} s. Tokens keep working meanwhile.',
        retry_after=seconds)


def owner(req: falcon.Request) -> Owner:
    """Who asks: the owner rule of every store call."""
    return Owner.of(req.context.user)


# ---------------------------------------------------------------------------
# Request validation: small explicit checks that name the field at fault.


def strict_json_loads(text: str) -> Any:
    def finite(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f'number {value} is too large')
        return number

    def reject(name: str) -> None:
        raise ValueError(f'{name} is not valid JSON')

    try:
        return json.loads(text, parse_float=finite, parse_constant=reject)
    except RecursionError:
        raise ValueError('JSON nested too deeply') from None


def read_body(req: falcon.Request, allowed: Sequence[str], empty_ok: bool = False) -> dict:
    """The JSON object of the body, refusing keys the route does not know.

    The body is read as JSON whatever its Content-Type: a `curl -d` without
    a header should not turn into a form. With empty_ok, no body is {}.
    """
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise body_too_large()
    raw = req.bounded_stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large()
    if empty_ok and not raw.strip():
        return {}
    try:
        body = strict_json_loads(raw.decode('utf-8')) if raw.strip() else None
    except ValueError as e:
        raise falcon.HTTPBadRequest(title='Invalid JSON',
                                    description=f'The body is not valid UTF-8 JSON: {e}.'
                                    ) from None
    if not isinstance(body, dict):
        raise falcon.HTTPBadRequest(
            title='Invalid body',
            description=f'Send a JSON object with keys from: {", ".join(allowed)}.')
    check_keys(body, allowed)
    return body


def body_too_large() -> falcon.HTTPContentTooLarge:
    return falcon.HTTPContentTooLarge(
        title='Body too large',
        description=f'Request bodies are limited to {MAX_BODY_BYTES} bytes.')


def check_keys(body: dict, allowed: Sequence[str], where: str = '') -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise falcon.HTTPBadRequest(
            title='Unknown key',
            description=f'{where}Unknown key {unknown[0][:64]!r}; '
                        f'this takes: {", ".join(allowed)}.')


def bad_field(key: str, problem: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title=f'Invalid {key}', description=f'{key} {problem}.')


def present(body: dict, key: str, required: bool) -> bool:
    """Whether an optional key was sent; a missing required key is a 400."""
    if key in body:
        return True
    if required:
        raise bad_field(key, 'is required')
    return False


def require_int(body: dict, key: str, minimum: int, maximum: int,
                required: bool = True) -> int | None:
    if not present(body, key, required):
        return None
    value = body[key]
    if type(value) is not int:
        raise bad_field(key, 'must be an integer')
    if not minimum <= value <= maximum:
        raise bad_field(key, f'must be from {minimum} to {maximum}')
    return value


def require_number(body: dict, key: str, minimum: float, maximum: float) -> float | None:
    if not present(body, key, required=False):
        return None
    value = body[key]
    if type(value) not in (int, float):
        raise bad_field(key, 'must be a number')
    if not minimum <= value <= maximum:
        raise bad_field(key, f'must be from {minimum:g} to {maximum:g}')
    return float(value)


def require_str(body: dict, key: str, max_length: int, required: bool = True,
                min_length: int = 1) -> str | None:
    if not present(body, key, required):
        return None
    value = body[key]
    if not isinstance(value, str):
        raise bad_field(key, 'must be a string')
    if not min_length <= len(value) <= max_length:
        raise bad_field(key, f'must be {min_length} to {max_length} characters long')
    if not valid_text(value, max_length):
        raise bad_field(key, 'must not contain NUL characters or unpaired surrogates')
    return value


def require_bool(body: dict, key: str) -> bool:
    if not present(body, key, required=False):
        return False
    if type(body[key]) is not bool:
        raise bad_field(key, 'must be true or false')
    return body[key]


def require_list(body: dict, key: str, minimum: int, maximum: int,
                 required: bool = True) -> list | None:
    if not present(body, key, required):
        return None
    value = body[key]
    if not isinstance(value, list):
        raise bad_field(key, 'must be a list')
    if not minimum <= len(value) <= maximum:
        raise bad_field(key, f'must have {minimum} to {maximum} items')
    return value


def require_status(body: dict) -> str | None:
    if 'status' not in body:
        return None
    if body['status'] not in STATUSES:
        raise bad_field('status', f'must be one of: {", ".join(STATUSES)}')
    return body['status']


UPDATE_KEYS = ('percentCompleted', 'status', 'message', 'exitCode', 'final')


def read_update(body: dict, task: int) -> Update:
    """An update: one or more of percentCompleted, status, message, exitCode, final."""
    if not body.keys() & set(UPDATE_KEYS):
        raise falcon.HTTPBadRequest(
            title='Nothing to update',
            description=f'Send one or more of: {", ".join(UPDATE_KEYS)}.')
    status = require_status(body)
    final = require_bool(body, 'final')
    if 'final' in body and status != 'failed':
        raise bad_field('final', 'is allowed only beside "status": "failed"')
    return Update(task=task, percent=require_number(body, 'percentCompleted', 0, 100),
                  status=status, final=final,
                  message=require_str(body, 'message', MAX_MESSAGE, required=False,
                                      min_length=0),
                  exit_code=require_int(body, 'exitCode', MIN_EXIT_CODE, MAX_INT,
                                        required=False))


def read_updates(items: list) -> list[Update]:
    """The items of a batch report; a 400 names the index of a bad one."""
    updates, seen = [], {}
    for index, item in enumerate(items):
        where = f'updates[{index}]'
        try:
            if not isinstance(item, dict):
                raise falcon.HTTPBadRequest(title='Invalid update',
                                            description='An update is a JSON object.')
            check_keys(item, ('task', *UPDATE_KEYS))
            task = require_int(item, 'task', 0, MAX_INT)
            updates.append(read_update(item, task))
        except falcon.HTTPBadRequest as e:
            raise falcon.HTTPBadRequest(title=e.title,
                                        description=f'{where}: {e.description}') from None
        if task in seen:
            raise falcon.HTTPBadRequest(
                title='Task named twice',
                description=f'{where}: task {task} is already in updates[{seen[task]}]; '
                            'send one update per task.')
        seen[task] = index
    return updates


def check_input(value: Any, kind: str | None, where: str) -> None:
    """A task's input: a line of text, or any JSON value, of at most MAX_INPUT characters."""
    if kind == 'text':
        if not isinstance(value, str):
            raise bad_field(where, 'must be a string: this run takes text inputs')
        if not valid_text(value, MAX_INPUT):
            raise bad_field(where, f'must be at most {MAX_INPUT} characters, without NUL '
                                   'characters or unpaired surrogates')
    elif kind == 'json' and len(json.dumps(value, separators=(',', ':'))) > MAX_INPUT:
        raise bad_field(where, f'must be at most {MAX_INPUT} characters as compact JSON')


def int_param(req: falcon.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    if not re.fullmatch(r'-?\d{1,12}', raw) or not minimum <= int(raw) <= maximum:
        raise falcon.HTTPBadRequest(
            title=f'Invalid {name}',
            description=f'{name} must be an integer from {minimum} to {maximum}.')
    return int(raw)


def status_param(req: falcon.Request) -> str | None:
    status = req.get_param('status')
    if status is not None and status not in STATUSES:
        raise bad_field('status', f'must be one of: {", ".join(STATUSES)}')
    return status


RANGE_RE = re.compile(r'(\d{1,10})(?:-(\d{1,10}))?')


def parse_ranges(text: str, num_tasks: int) -> list[tuple[int, int]]:
    """`3-5,9` to [(3, 5), (9, 9)]: task numbers and inclusive ranges within the run."""
    items = text.split(',')
    if len(items) > MAX_RANGES:
        raise bad_field('tasks', f'has more than {MAX_RANGES} items')
    ranges = []
    for item in items:
        match = RANGE_RE.fullmatch(item)
        if match is None:
            raise bad_field('tasks', f'must be task numbers or ranges a-b, comma-separated, '
                                     f'without spaces (not {item[:32]!r})')
        low = int(match[1])
        high = low if match[2] is None else int(match[2])
        if low > high:
            raise bad_field('tasks', f'has a range {item!r} whose start is after its end')
        if high >= num_tasks:
            raise bad_field('tasks', f'names task {high}; this run has tasks 0 to '
                                     f'{num_tasks - 1}')
        ranges.append((low, high))
    return ranges


def unknown_info(info: str, allowed: Sequence[str]) -> falcon.HTTPNotFound:
    return falcon.HTTPNotFound(
        title='Unknown info',
        description=f'info must be empty or one of: {", ".join(allowed)} (not {info[:64]!r}).')


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z')


# ---------------------------------------------------------------------------
# JSON shapes.


def run_json(row: dict) -> dict:
    return {'id': row['id'], 'uuid': row['uuid'], 'numTasks': row['num_tasks'],
            'name': row['name']}


def task_json(row: dict) -> dict:
    """A task as the API shows it; a task that has no row yet is waiting at 0%."""
    if row.get('id') is None:
        task = {'id': None, 'task': row['task'], 'percentCompleted': 0.0,
                'status': 'waiting', 'attempts': 0, 'failures': 0,
                'message': None, 'exitCode': None}
    else:
        task = {'id': row['id'], 'task': row['task'],
                'percentCompleted': float(row['percent']), 'status': row['status'],
                'attempts': row['attempts'], 'failures': row['failures'],
                'message': row['message'], 'exitCode': row['exit_code']}
    if row.get('input') is not None:
        task['input'] = json.loads(row['input'])
    return task


def worker_json(row: dict) -> dict | None:
    if row['worker_uuid'] is None:
        return None
    return {'uuid': row['worker_uuid'], 'hostname': row['hostname'], 'pid': row['pid']}


def listed_task_json(row: dict) -> dict:
    return {**task_json(row), 'started': iso(row['started']),
            'updated': iso(row['updated']), 'worker': worker_json(row)}


def attempt_json(row: dict) -> dict:
    return {'attempt': row['attempt'], 'outcome': row['outcome'],
            'started': iso(row['started']), 'ended': iso(row['ended']),
            'exitCode': row['exit_code'], 'message': row['message'],
            'worker': worker_json(row)}


# ---------------------------------------------------------------------------
# Resources: each parses the request, calls the store, shapes the JSON.

INDEX_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Taskfarm Server</title></head>
<body>
<h1>Taskfarm Server</h1>
<p>version: {version}</p>
<p>A task farm: runs of numbered tasks, handed out to independent workers.
The HTTP API is under <code>/api/</code>; see the project's README.md for the
API table and <a href="https://taskfarm.readthedocs.io/en/latest/">the
original taskfarm documentation</a>.</p>
<p><a href="/runs">The dashboard: your runs</a> (sign in as your taskfarm user).</p>
</body></html>
"""


class Index:
    auth_required = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = INDEX_PAGE.format(version=html.escape(__version__))


class Token:
    def __init__(self, secret: bytes, ttl: int) -> None:
        self.secret = secret
        self.ttl = ttl

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'token': issue_token(self.secret, req.context.user, self.ttl)}


class Runs:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, ('numTasks', 'name', 'timeout', 'maxAttempts', 'retries',
                               'maxFailures', 'inputs'))
        inputs = body.get('inputs')
        if inputs not in (None, 'text', 'json'):
            raise bad_field('inputs', 'must be "text" or "json"')
        run = self.store.create_run(
            owner(req), num_tasks=require_int(body, 'numTasks', 1, MAX_INT),
            name=require_str(body, 'name', 200, required=False),
            timeout=require_int(body, 'timeout', 1, 31536000, required=False),
            max_attempts=require_int(body, 'maxAttempts', 1, 1000, required=False),
            retries=require_int(body, 'retries', 0, 100, required=False),
            max_failures=require_int(body, 'maxFailures', 1, MAX_INT, required=False),
            inputs=inputs)
        resp.status = falcon.HTTP_201
        resp.media = run

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'data': [run_json(row) for row in self.store.runs(owner(req))]}


RUN_INFO = ('percentDone', 'numWaiting', 'numDone', 'numComputing', 'numFailed')


class Run:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        info = req.get_param('info', default='')
        if info and info not in RUN_INFO:
            raise unknown_info(info, RUN_INFO)
        status = self.store.run_status(owner(req), uuid)
        resp.media = {info: status[info]} if info else status

    def on_delete(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        self.store.delete_run(owner(req), uuid)
        resp.status = falcon.HTTP_204

    def on_post_restart(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        everything = req.get_param('all', default='False').lower()
        if everything not in ('true', 'false'):
            raise falcon.HTTPNotFound(title='Invalid all',
                                      description='all must be True or False.')
        status = req.get_param('status', default=None)
        if status is not None and status not in STATUSES:
            raise bad_field('status', f'must be one of: {", ".join(STATUSES)}')
        tasks = req.get_param('tasks', default=None)
        ranges = None
        if tasks is not None:
            ranges = parse_ranges(tasks, self.store.find_run(owner(req), uuid)['num_tasks'])
        self.store.restart(owner(req), uuid, reset_progress=everything == 'true',
                           status=status, ranges=ranges)
        resp.status = falcon.HTTP_204

    def on_get_tasks(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        rows = self.store.list_tasks(
            owner(req), uuid, status=status_param(req),
            limit=int_param(req, 'limit', 100, 1, 1000),
            after=int_param(req, 'after', -1, -1, MAX_INT))
        resp.media = {'data': [listed_task_json(row) for row in rows]}

    def on_put_inputs(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        """One chunk of a run's inputs: tasks first, first + 1, ..."""
        body = read_body(req, ('first', 'inputs'))
        first = require_int(body, 'first', 0, MAX_INT)
        inputs = require_list(body, 'inputs', 1, MAX_BATCH * 10)
        kind = self.store.find_run(owner(req), uuid)['inputs']
        for index, value in enumerate(inputs):
            check_input(value, kind, f'inputs[{index}]')
        resp.media = self.store.add_inputs(owner(req), uuid, first, inputs)

    def on_get_pace(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        run = self.store.run_summary(owner(req), uuid)
        resp.media = self.store.pace(owner(req), run, time.time())

    def on_patch_tasks(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        """The batch report: many updates of one worker's tasks in one request."""
        body = read_body(req, ('worker_uuid', 'updates'))
        worker = require_str(body, 'worker_uuid', 64)
        updates = read_updates(require_list(body, 'updates', 1, MAX_BATCH))
        resp.media = {'updates': self.store.report(owner(req), uuid, worker, updates)}


class TaskHandout:
    """POST /api/runs/{uuid}/task: one task (the original protocol)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        body = read_body(req, ('worker_uuid', 'requestId'))
        claim = self.store.claim(owner(req), uuid, require_str(body, 'worker_uuid', 64),
                                 request_id=require_str(body, 'requestId', 64, required=False))
        if not claim.tasks:
            resp.status = falcon.HTTP_204
            return
        resp.status = falcon.HTTP_201
        resp.media = task_json(claim.tasks[0])


class TaskClaim:
    """POST /api/runs/{uuid}/tasks/claim: a batch, after the worker's updates."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        body = read_body(req, ('worker_uuid', 'count', 'updates', 'requestId'))
        worker = require_str(body, 'worker_uuid', 64)
        count = require_int(body, 'count', 1, MAX_BATCH, required=False) or 1
        request_id = require_str(body, 'requestId', 64, required=False)
        items = require_list(body, 'updates', 0, MAX_BATCH, required=False)
        updates = None if items is None else read_updates(items)
        claim = self.store.claim(owner(req), uuid, worker, count=count,
                                 request_id=request_id, updates=updates)
        resp.media = {'data': [task_json(row) for row in claim.tasks]}
        if updates is not None:
            resp.media['updates'] = claim.results


TASK_INFO = ('status', 'percentCompleted', 'percentDone', 'attempts')


class Task:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response,
               uuid: str, task_id: int) -> None:
        info = req.get_param('info', default='')
        if info and info not in TASK_INFO:
            raise unknown_info(info, TASK_INFO)
        task = task_json(self.store.task(owner(req), uuid, task_id))
        if info:
            resp.media = {info: task['percentCompleted' if info == 'percentDone' else info]}
        else:
            resp.media = task

    def on_put(self, req: falcon.Request, resp: falcon.Response,
               uuid: str, task_id: int) -> None:
        body = read_body(req, ('worker_uuid', *UPDATE_KEYS))
        worker = require_str(body, 'worker_uuid', 64, required=False)
        self.store.update_task(owner(req), uuid, read_update(body, task_id), worker)
        resp.status = falcon.HTTP_204

    def on_get_attempts(self, req: falcon.Request, resp: falcon.Response,
                        uuid: str, task_id: int) -> None:
        rows = self.store.attempts(owner(req), uuid, task_id)
        resp.media = {'data': [attempt_json(row) for row in rows]}


class Workers:
    def __init__(self, store: Store) -> None:
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, ('uuid', 'hostname', 'pid'))
        uuid = require_str(body, 'uuid', 64)
        worker_id = self.store.register_worker(
            owner(req), uuid, hostname=require_str(body, 'hostname', 255),
            pid=require_int(body, 'pid', 0, MAX_INT))
        resp.status = falcon.HTTP_201
        resp.media = {'uuid': uuid, 'id': worker_id}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {'data': [
            {'id': row['id'], 'uuid': row['uuid'], 'hostname': row['hostname'],
             'pid': row['pid'], 'start': iso(row['start']),
             'lastSeen': iso(row['last_seen']), 'numComputing': row['computing']}
            for row in self.store.workers(owner(req))]}

    def on_post_heartbeat(self, req: falcon.Request, resp: falcon.Response, uuid: str) -> None:
        body = read_body(req, ('run', 'tasks'), empty_ok=True)
        run = require_str(body, 'run', 64, required='tasks' in body)
        tasks = require_list(body, 'tasks', 0, MAX_BATCH, required=run is not None) or []
        if any(type(task) is not int or not 0 <= task <= MAX_INT for task in tasks):
            raise bad_field('tasks', f'must be task numbers from 0 to {MAX_INT}')
        self.store.heartbeat(owner(req), uuid, run=run, tasks=tasks)
        resp.status = falcon.HTTP_204


def openapi_path() -> Path:
    """openapi.json, installed where schema.sql is: beside the modules in a
    checkout, in <prefix>/share/taskfarm after a plain `pip install`."""
    return schema_path().with_name('openapi.json')


class OpenAPIDocument:
    """GET /api/openapi.json: the API's OpenAPI 3.1 description, the repository's file."""

    auth_required = False

    def __init__(self) -> None:
        self.document = openapi_path().read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.document


class EmptySegments:
    """A path with an empty segment (`/api/runs//task`) is unknown, as any
    unknown run: the router would take the empty uuid and answer 405."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if '//' in req.path:
            raise falcon.HTTPNotFound(title='Not found',
                                      description=f'No route {req.path[:200]!r}.')


# ---------------------------------------------------------------------------
# The app.

# Each domain error of the store, and the HTTP answer it gets.
STORE_ERRORS: dict[type[StoreError], tuple[type[falcon.HTTPError], str]] = {
    RunNotFound: (falcon.HTTPNotFound, 'Unknown run'),
    WorkerNotFound: (falcon.HTTPNotFound, 'Unknown worker'),
    TaskNotFound: (falcon.HTTPNotFound, 'Unknown task'),
    TaskNotHeld: (falcon.HTTPConflict, 'Task not held'),
    WorkerTaken: (falcon.HTTPConflict, 'Worker uuid taken'),
    InputsNotExpected: (falcon.HTTPBadRequest, 'Inputs not expected'),
    InputsComplete: (falcon.HTTPConflict, 'Inputs complete'),
}


def store_error(req: falcon.Request, resp: falcon.Response, ex: StoreError,
                params: dict) -> None:
    error, title = STORE_ERRORS[type(ex)]
    raise error(title=title, description=str(ex))


def database_unavailable(req: falcon.Request, resp: falcon.Response, ex: Exception,
                         params: dict) -> None:
    raise falcon.HTTPServiceUnavailable(
        title='Database unavailable',
        description='The database cannot answer right now; try again shortly.',
        retry_after=RETRY_AFTER_SECONDS)


def json_errors(req: falcon.Request, resp: falcon.Response,
                exception: falcon.HTTPError) -> None:
    """Every error answers JSON, whatever the client accepts, and says what was
    wrong: Falcon's own errors (no such route, a method the route lacks) carry
    only a title, so they get a description here."""
    body = exception.to_dict()
    if 'description' not in body:
        body['description'] = falcon_error_description(req, exception)
    resp.content_type = falcon.MEDIA_JSON
    resp.media = body


def falcon_error_description(req: falcon.Request, exception: falcon.HTTPError) -> str:
    if exception.status_code == 405:
        allowed = (exception.headers or {}).get('Allow', '')
        return f'This route does not take {req.method[:20]}; it takes {allowed}.'
    if exception.status_code == 404:
        return f'No route {req.path[:200]!r}; the API is described at /api/openapi.json.'
    return exception.title


def load_secret(store: Store, config: Config) -> bytes:
    if config.secret:
        return config.secret.encode()
    try:
        secret = store.secret()
    except DatabaseUnavailable as e:
        raise ConfigError(f'cannot read the database ({e}); '
                          'run `taskfarm-admin init-db` first.') from None
    if secret is None:
        raise ConfigError('no secret to sign tokens with: set TASKFARM_SECRET '
                          'or run `taskfarm-admin init-db`.')
    return secret.encode()


def create_app(store: Store, config: Config | None = None) -> falcon.App:
    """The WSGI app over one store; ConfigError if it cannot serve."""
    config = config or Config()
    secret = load_secret(store, config)
    figures = metrics.Metrics(store)
    app = falcon.App(middleware=[metrics.MetricsMiddleware(figures), EmptySegments(),
                                 AuthMiddleware(Authenticator(store, secret, config),
                                                config.trusted_proxies)])
    app.set_error_serializer(json_errors)
    for error in STORE_ERRORS:
        app.add_error_handler(error, store_error)
    app.add_error_handler(DatabaseUnavailable, figures.counting(database_unavailable))

    run, workers, task = Run(store), Workers(store), Task(store)
    app.add_route('/', Index())
    app.add_route('/api/token', Token(secret, config.token_ttl))
    app.add_route('/api/run', Runs(store))
    app.add_route('/api/runs', Runs(store))
    app.add_route('/api/runs/{uuid}', run)
    app.add_route('/api/runs/{uuid}/restart', run, suffix='restart')
    app.add_route('/api/runs/{uuid}/tasks', run, suffix='tasks')
    app.add_route('/api/runs/{uuid}/inputs', run, suffix='inputs')
    app.add_route('/api/runs/{uuid}/pace', run, suffix='pace')
    app.add_route('/api/runs/{uuid}/task', TaskHandout(store))
    app.add_route('/api/runs/{uuid}/tasks/claim', TaskClaim(store))
    app.add_route('/api/runs/{uuid}/tasks/{task_id:int}', task)
    app.add_route('/api/runs/{uuid}/tasks/{task_id:int}/attempts', task, suffix='attempts')
    app.add_route('/api/worker', workers)
    app.add_route('/api/workers', workers)
    app.add_route('/api/workers/{uuid}/heartbeat', workers, suffix='heartbeat')
    app.add_route('/api/openapi.json', OpenAPIDocument())
    app.add_route('/metrics', metrics.MetricsResource(figures, metrics.MetricsAccess(
        config.metrics_allow, config.metrics_token,
        lambda req: client_address(req, config.trusted_proxies))))
    dashboard.add_dashboard(app, store, secret, __version__)
    return app


def get_app() -> falcon.App:
    """The app as deployed: configured from the environment."""
    config = Config.from_env()
    return create_app(open_store(config), config)


# ---------------------------------------------------------------------------
# `taskfarm-server`: waitress, in one process or several sharing one socket.


def serve(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='taskfarm-server', description=__doc__.split('\n')[0])
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=5000)
    parser.add_argument('--threads', type=int, default=8,
                        help='waitress threads per process (default 8)')
    parser.add_argument('--workers', type=int, default=None,
                        help='server processes sharing the listening socket (default: '
                             'one per core on PostgreSQL, one on sqlite)')
    args = parser.parse_args(argv)
    config = Config.from_env()
    try:
        check_config(config)
    except ConfigError as e:
        sys.exit(f'taskfarm-server: {e}')
    workers = args.workers or config.default_processes
    with metrics.shared_by(workers):
        serve_with_waitress(get_app, args.host, args.port, args.threads, workers,
                            f'taskfarm {__version__}')


def check_config(config: Config) -> None:
    """Fail before serving, in one line, if the app could not start."""
    try:
        store = open_store(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        load_secret(store, config)
    finally:
        store.close()   # before forking: each process opens its own connections


def serve_with_waitress(make_app: Callable[[], Any], host: str, port: int, threads: int,
                        workers: int, label: str) -> None:
    """Serve make_app() with waitress in `workers` processes on one socket.

    The benchmark serves its bare-Falcon ceiling through this too, so both
    run under the same server settings.
    """
    import waitress

    # waitress warns for every request that waits for a thread; under load
    # that is thousands of lines and ~4% of the server's time.
    logging.getLogger('waitress.queue').setLevel(logging.ERROR)
    listener = socket.create_server((host, port))
    children, is_child = fork_servers(workers)
    app = make_app()    # after the fork: each process has its own connections
    if not is_child:
        port = listener.getsockname()[1]    # the real one, when port is 0
        print(f'{label} serving on http://{host}:{port} '
              f'({workers} process(es) x {threads} threads)', flush=True)
    server = waitress.create_server(
        app, sockets=[listener], threads=threads, connection_limit=1000,
        channel_timeout=120, max_request_body_size=WAITRESS_BODY_LIMIT, ident='taskfarm',
        # Keep X-Forwarded-For: client_address() decides whom to believe.
        clear_untrusted_proxy_headers=False)
    server.channel_class = taskfarm_channel()
    try:
        server.run()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)


# Bodies up to this size reach the app, which answers anything over
# MAX_BODY_BYTES with its own JSON 413; waitress refuses larger ones itself.
WAITRESS_BODY_LIMIT = 1024 * 1024


def taskfarm_channel() -> type:
    """waitress's HTTP channel with two changes, for waitress 3.0 (pinned so in
    pyproject.toml; test_taskfarm.py checks both on a live server):

    - KeepAliveTask keeps the connection open after a 204: waitress closes
      it after any response without a Content-Length, even one that must
      have no body (204, 304), so every progress PUT would cost a new
      connection (30% of a worker cycle).
    - JsonErrorTask answers the errors that waitress raises itself (a
      malformed request line, headers too large, a body over its limit) in
      the API's JSON error shape instead of text/plain.
    """
    import waitress.channel
    import waitress.task

    class KeepAliveTask(waitress.task.WSGITask):
        def set_close_on_finish(self) -> None:
            closing = self.request.headers.get('CONNECTION', '').lower() == 'close'
            if self.has_body or self.version != '1.1' or closing:
                super().set_close_on_finish()

    class JsonErrorTask(waitress.task.ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            body = json.dumps({'title': f'{error.code} {error.reason}',
                               'description': str(error.body)}).encode()
            self.status = f'{error.code} {error.reason}'
            self.response_headers.append(('Content-Type', 'application/json'))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class TaskfarmChannel(waitress.channel.HTTPChannel):
        task_class = KeepAliveTask
        error_task_class = JsonErrorTask

    return TaskfarmChannel


def fork_servers(count: int) -> tuple[list[int], bool]:
    """Fork count - 1 more server processes: (their pids, whether this is one).

    On Linux a child asks the kernel for SIGTERM when its parent dies, so
    stopping the one command (even with SIGKILL) stops them all.
    """
    children = []
    for _ in range(count - 1):
        pid = os.fork()
        if pid == 0:
            if sys.platform.startswith('linux'):
                import ctypes
                ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            return [], True
        children.append(pid)
    if children:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    return children, False


if __name__ == '__main__':
    serve()
