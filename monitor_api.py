"""The monitor's JSON API: every node's latest metrics, cluster views, history and Prometheus, from Redis.

Run ``python monitor_api.py`` (waitress on MONITOR_API_HOST:MONITOR_API_PORT), then
``curl http://localhost:5000/metrics`` or open http://localhost:5000/ for the dashboard.
Tests build their own app with ``create_app({"REDIS_URL": ..., ...})``.
"""

import argparse
import functools
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
from typing import NamedTuple
from urllib.parse import parse_qs

import redis
import waitress
from flask import Blueprint, Flask, Response, abort, current_app, g, jsonify, request, send_file
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_accept_header
from werkzeug.routing import PathConverter
from werkzeug.wsgi import get_host

import insight
import monitors
from monitors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# Nodes silent for longer than this many seconds are deleted, with their history.
DEFAULT_RETENTION = 86400
# Pollers repeat the same request every few seconds: a response up to this old is fine.
DEFAULT_CACHE = 1.0
# A response reused for longer than an hour would show a dead cluster as live: such a setting is a typo.
MAX_CACHE = 3600
# Lower than the extension's timeout, so a request fails with 503 well within a second when Redis hangs.
REDIS_TIMEOUT = 0.5
# A chart needs no more points than this; it keeps a history response to a few tens of KB.
MAX_POINTS = 360
MAX_MINUTES = monitors.TREND_SECONDS // 60
# Distinct URLs cached at once; a client inventing query strings cannot grow the cache past this.
CACHE_ENTRIES = 256
# Bodies smaller than this go out uncompressed.
GZIP_MIN = 1024
STATES = monitors.STATES
# Waitress worker threads: a request waiting on a slow Redis must not hold up the cached ones.
THREADS = 16
# A key of the wrong Redis type fails every request that reads it: log each such key once a minute, not each time.
REPORT_EVERY = 60.0

ENVIRONMENT = (
    ("REDIS_URL", f"Redis holding the metrics (default {monitors.DEFAULT_REDIS_URL})"),
    ("MONITOR_KEY_PREFIX", f"prefix of the Redis keys (default {monitors.DEFAULT_PREFIX})"),
    ("MONITOR_API_HOST", f"address to listen on (default {DEFAULT_HOST}); --host overrides it"),
    ("MONITOR_API_PORT", f"port to listen on (default {DEFAULT_PORT}); --port overrides it"),
    ("MONITOR_API_TOKEN", "when set, every route but /health needs 'Authorization: Bearer <token>' or ?token="),
    ("MONITOR_API_HOSTS", "comma-separated Host names accepted without a token, besides the listening address, "
                          "localhost and loopback addresses (others get 400: no DNS rebinding)"),
    ("MONITOR_CORS_ORIGINS", "comma-separated origins allowed to read the API from a browser, '*' for any "
                             "(default null: a dashboard opened as a file; any page can then read a tokenless API)"),
    ("MONITOR_API_READONLY", "1 turns every route that changes data (control, silences) off (default 0)"),
    ("MONITOR_RETENTION", f"seconds a silent node is kept before it is pruned with its history, 0 keeps "
                          f"them forever (default {DEFAULT_RETENTION})"),
    ("MONITOR_API_CACHE", f"seconds a response may be reused, 0 for never, at most {MAX_CACHE} "
                          f"(default {DEFAULT_CACHE:g})"),
    ("MONITOR_LOST_AFTER", f"seconds a node may be silent without closing before its run is recorded lost, "
                           f"0 for never (default {monitors.DEFAULT_LOST_AFTER})"),
    ("MONITOR_RUNS_KEEP", f"run records kept per spider (default {monitors.DEFAULT_RUNS_KEEP})"),
)

bp = Blueprint("api", __name__)


class NodeIdConverter(PathConverter):
    """Any node id, including ones with slashes, a leading slash or a trailing one."""

    regex = ".+?"
    part_isolating = False


# ---------------------------------------------------------------------------- the app

def create_app(config=None):
    """The API app; ``config`` overrides the settings, which are keyed by their environment variable names.
    A setting it cannot run with raises ConfigError naming it."""
    app = Flask(__name__)
    app.config.update(
        REDIS_URL=monitors.redis_url(),
        MONITOR_KEY_PREFIX=monitors.key_prefix(),
        MONITOR_API_HOST=monitors.env("MONITOR_API_HOST", DEFAULT_HOST),
        MONITOR_API_HOSTS=monitors.env("MONITOR_API_HOSTS"),
        MONITOR_API_TOKEN=monitors.env("MONITOR_API_TOKEN"),
        MONITOR_API_READONLY=monitors.env("MONITOR_API_READONLY", "0"),
        MONITOR_CORS_ORIGINS=monitors.env("MONITOR_CORS_ORIGINS", "null"),
        MONITOR_RETENTION=monitors.env("MONITOR_RETENTION", DEFAULT_RETENTION),
        MONITOR_API_CACHE=monitors.env("MONITOR_API_CACHE", DEFAULT_CACHE),
        MONITOR_LOST_AFTER=monitors.env("MONITOR_LOST_AFTER", monitors.DEFAULT_LOST_AFTER),
        MONITOR_RUNS_KEEP=monitors.env("MONITOR_RUNS_KEEP", monitors.DEFAULT_RUNS_KEEP),
        DASHBOARD_PATH=os.path.join(app.root_path, "dashboard.html"),
    )
    app.config.update(config or {})
    app.debug = False  # never, whatever FLASK_DEBUG says: errors are JSON, tracebacks go to the log
    app.extensions["gate"] = Gate(app.config)
    app.extensions["reader"] = StatusReader(app.config)
    app.url_map.merge_slashes = False  # "a//b" is a node id, not a typo to redirect
    app.url_map.converters["node"] = NodeIdConverter
    app.register_blueprint(bp)
    app.wsgi_app = CachedFastPath(app.wsgi_app, app.extensions["reader"], app.extensions["gate"])
    return app


class StatusReader:
    """The API's read side: a fail-fast Redis client on the status hash, its decode cache, and the response cache."""

    def __init__(self, config):
        self.prefix = config["MONITOR_KEY_PREFIX"] or monitors.DEFAULT_PREFIX
        self.key = monitors.status_key(self.prefix)
        self.retention = monitors.seconds("MONITOR_RETENTION", config["MONITOR_RETENTION"])
        self.cache = Cache(monitors.seconds("MONITOR_API_CACHE", config["MONITOR_API_CACHE"], maximum=MAX_CACHE))
        self.url = config["REDIS_URL"]
        self.redis = redis_client(self.url)
        self.node_reader = monitors.NodeReader(self.redis, self.prefix, self.retention, *runs_settings(config))
        self.outage = monitors.Outage(logger)
        self.reported = {}  # wrong-type problem -> when it was last logged

    def nodes(self):
        """``({node: snapshot with state}, skipped, now)`` straight from Redis, ``now`` on its clock; see
        ``monitors.NodeReader`` (snapshots are shared between reads: never modify one)."""
        return self.node_reader.read()

    def nodes_json(self, nodes, now, full=False):
        """``{node: snapshot + age}`` as JSON bytes, in node order, reusing each unchanged snapshot's JSON;
        without insight.BIG_FIELDS unless ``full``."""
        entries, parts = self.node_reader.entries, []
        for node in sorted(nodes):
            entry = entries.get(node)
            if entry is None or entry.snapshot is not nodes[node]:
                entry = monitors.NodeEntry(None, nodes[node])
            if full and entry.full is None:
                entry.full = to_json({node: nodes[node]})[1:-2]
            if not full and entry.json is None:
                entry.json = to_json({node: insight.slim(nodes[node])})[1:-2]  # '"node":{...' without its braces
            parts.append(b'%s,"age":%d}' % (entry.full if full else entry.json, monitors.age(nodes[node], now)))
        return b"{" + b",".join(parts) + b"}"

    def node(self, name):
        """``(snapshot with state and age, or None; malformed)`` for one node id."""
        snapshot, malformed, now = self.node_reader.node(name)
        if snapshot is not None:
            snapshot["age"] = monitors.age(snapshot, now)
        return snapshot, malformed

    def spider_names(self):
        """The spiders that have nodes, up to a cache period old: unknown names cost no full read each."""
        return self.cache.get("spider names", lambda: {s["spider"] for s in self.nodes()[0].values()})

    def answered(self):
        """Redis answered a request: log the end of an outage, if one was going on."""
        self.outage.ok("Redis at %s answers again", monitors.redact(str(self.url)))

    def wrong_type(self, names=()):
        """What is wrong when Redis answers WRONGTYPE: the status hash, or the history lists of ``names``,
        holding another type (``monitors.wrong_type``); None if they all fit."""
        expected = [(self.key, "hash")]
        for name in names:
            expected += [(monitors.history_key(self.prefix, name), "list"),
                         (monitors.trend_key(self.prefix, name), "list")]
        return monitors.wrong_type(self.redis, expected)

    def report(self, problem):
        """Log a data problem at ERROR, each one at most once per REPORT_EVERY seconds."""
        now = time.monotonic()
        if now - self.reported.get(problem, -REPORT_EVERY) >= REPORT_EVERY:
            if len(self.reported) >= CACHE_ENTRIES:
                self.reported.clear()
            self.reported[problem] = now
            logger.error("%s", problem)


def runs_settings(config):
    """``(lost_after, runs_keep)`` from MONITOR_LOST_AFTER and MONITOR_RUNS_KEEP, checked."""
    keep = str(config["MONITOR_RUNS_KEEP"]).strip()
    if not (keep.isascii() and keep.isdigit() and 0 < int(keep) < 10 ** 9):
        raise ConfigError(f"MONITOR_RUNS_KEEP must be a whole number above 0, not {config['MONITOR_RUNS_KEEP']!r}")
    return monitors.seconds("MONITOR_LOST_AFTER", config["MONITOR_LOST_AFTER"]), int(keep)


def redis_client(url):
    """A fail-fast client for ``url``, or ConfigError naming what is wrong with it (see ``monitors.connect``)."""
    try:
        return monitors.connect(url, REDIS_TIMEOUT)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: {exc}") from None


def reader():
    """The app's StatusReader."""
    return current_app.extensions["reader"]


def gate():
    """The app's Gate."""
    return current_app.extensions["gate"]


# ---------------------------------------------------------------------------- the gate: token, Host, CORS, acting

class Refusal(NamedTuple):
    """Why a request is refused: its status, the JSON error message and any extra headers."""

    status: int
    message: str
    headers: tuple = ()

    def response(self):
        return Response(to_json({"error": self.message}), self.status, list(self.headers),
                        mimetype="application/json")


UNAUTHORIZED = Refusal(401, "a valid token is required: 'Authorization: Bearer <token>' or ?token=",
                       (("WWW-Authenticate", "Bearer"),))
HOW_TO_ACT = "set MONITOR_API_TOKEN and send it as 'Authorization: Bearer <token>'"


class Gate:
    """Who may read and who may change data. Every response, the cached fast path's included, goes through
    ``authorize`` and ``cors_headers``; every route that changes data also through ``acting``."""

    def __init__(self, config):
        token = config["MONITOR_API_TOKEN"] or None
        if token is not None and not (token.isascii() and token.isprintable() and token == token.strip()):
            raise ConfigError("MONITOR_API_TOKEN must be printable ASCII without leading or trailing spaces "
                              "(it travels in an HTTP header)")
        self.token = token
        self.origins = set(split_list(config["MONITOR_CORS_ORIGINS"]))
        self.listening = str(config["MONITOR_API_HOST"] or DEFAULT_HOST)
        # Host names accepted without a token; loopback addresses are accepted too (see host_ok).
        self.hosts = {host_name(self.listening), "localhost"} | {host_name(h) for h in
                                                                split_list(config["MONITOR_API_HOSTS"])}
        self.loopback = is_loopback(host_name(self.listening))
        self.readonly = flag("MONITOR_API_READONLY", config["MONITOR_API_READONLY"])

    def authorize(self, environ):
        """None if the request may go on, else a Refusal. With a token, every request but /health and
        CORS preflights must offer it (401); without one, the Host must be this API's (400), which closes
        DNS rebinding: a foreign page that makes its own name resolve to this address sends its own name."""
        if environ.get("PATH_INFO") == "/health":
            return None  # for load balancers and probes: it tells whether Redis answers, and the node count
        if self.token is None:
            host = environ.get("HTTP_HOST")
            if host is None or self.host_ok(host):
                return None
            return Refusal(400, f"Host {host[:100]!r} is not accepted without a token: add it to "
                                "MONITOR_API_HOSTS, or set MONITOR_API_TOKEN")
        if environ["REQUEST_METHOD"] == "OPTIONS" or offers_token(environ, self.token):
            return None
        return UNAUTHORIZED

    def host_ok(self, host):
        name = host_name(host)
        return name in self.hosts or is_loopback(name)

    def cors_headers(self, environ):
        """CORS headers for an allowed Origin (one of the origins, any with ``*``, or the API's own), else none.
        A preflight is told of POST, DELETE and Content-Type only where a change could be accepted."""
        origin = environ.get("HTTP_ORIGIN")
        if not origin:
            return []
        own = origin == own_origin(environ)
        if not (own or origin in self.origins or "*" in self.origins):
            return []
        headers = [("Access-Control-Allow-Origin", origin),
                   ("Access-Control-Expose-Headers", "ETag, X-Skipped-Entries")]
        if environ["REQUEST_METHOD"] == "OPTIONS":  # a preflight
            methods, allowed = "GET, HEAD, OPTIONS", "Authorization, If-None-Match"
            if not self.readonly and (self.token is not None or (own and self.loopback)):
                methods, allowed = methods + ", POST, DELETE", allowed + ", Content-Type"
            headers += [("Access-Control-Allow-Methods", methods), ("Access-Control-Allow-Headers", allowed),
                        ("Access-Control-Max-Age", "600")]
        return headers

    def acting(self, req):
        """``(Refusal or None, how it was accepted)`` for a request to a route that changes data."""
        if self.readonly:
            return Refusal(403, "this API is read-only (MONITOR_API_READONLY=1): control and silences are off"), ""
        if req.method in ("GET", "HEAD"):
            allow = sorted((req.url_rule.methods if req.url_rule else set()) - {"GET", "HEAD", "OPTIONS"})
            return Refusal(405, f"{req.method} does not change data: use {' or '.join(allow) or 'POST'}",
                           (("Allow", ", ".join(allow)),)), ""
        origin = req.headers.get("Origin")
        if self.token is not None:
            if not offers_token(req.environ, self.token):
                return UNAUTHORIZED, ""
            how = "token"
        elif not self.loopback:
            return Refusal(403, f"without a token, changes are accepted only when the API listens on a loopback "
                                f"address, not {self.listening}: {HOW_TO_ACT}"), ""
        elif origin is None:
            how = "no token: loopback, no browser origin"
        elif origin == own_origin(req.environ):
            how = "no token: loopback, the API's own page"
        else:
            return Refusal(403, f"changes are not accepted from origin {origin[:100]!r} without a token: "
                                f"{HOW_TO_ACT}"), ""
        has_body = req.method in ("POST", "PUT", "PATCH") or req.content_length or req.headers.get("Transfer-Encoding")
        if has_body and req.mimetype != "application/json":
            return Refusal(415, "send the body as JSON, with 'Content-Type: application/json'"), ""
        return None, how


def acting(view):
    """Guards a route that changes data (control, silences): put it under the route decorator.

        @bp.post("/control")
        @acting
        def control(): ...   # g.actor = {"address": client address, "via": how it was let in}

    Refused with JSON: 403 in read-only mode, or without a token from anywhere but curl or the API's own
    page on a loopback API; 401 without the token when one is set; 405 for GET; 415 for a body that is not
    JSON. Every accepted and refused request is logged (method, path, client address, reason; never the token).
    """
    @functools.wraps(view)
    def guarded(*args, **kwargs):
        refusal, how = gate().acting(request)
        if refusal is not None:
            log_acting(refusal)
            return refusal.response()
        logger.info("Accepted %s %s from %s (%s)", request.method, request.path[:200], request.remote_addr, how)
        g.actor = {"address": request.remote_addr, "via": how}
        return view(*args, **kwargs)

    guarded.changes_data = True
    return guarded


def log_acting(refusal):
    logger.warning("Refused %s %s from %s (%d): %s", request.method, request.path[:200], request.remote_addr,
                   refusal.status, refusal.message)


def offers_token(environ, token):
    """Whether the request offers the token, as a Bearer header or ``?token=``; compared in constant time."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    offered = [header[7:].strip()] if header[:7].lower() == "bearer " else []
    query = environ.get("QUERY_STRING", "")
    if "token" in query:
        offered += parse_qs(query).get("token", [])
    expected = token.encode()
    return any(hmac.compare_digest(o.encode(), expected) for o in offered)


def own_origin(environ):
    return f"{environ['wsgi.url_scheme']}://{get_host(environ)}"


def host_name(host):
    """The name in a Host header or a setting, lower case, without its port or brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(name):
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_list(raw):
    return [part.strip() for part in str(raw or "").split(",") if part.strip()]


def flag(name, raw):
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be 0 or 1, not {raw!r}")


@bp.before_app_request
def apply_gate():
    refusal = gate().authorize(request.environ)
    if refusal is not None:
        if getattr(current_app.view_functions.get(request.endpoint), "changes_data", False):
            log_acting(refusal)
        return refusal.response()
    return None


@bp.after_app_request
def add_cors_headers(response):
    response.headers.extend(gate().cors_headers(request.environ))
    if "Origin" not in response.headers.get("Vary", ""):  # cached bodies carry it already
        response.vary.add("Origin")
    return response


# ---------------------------------------------------------------------------- cached responses

class Cache:
    """Values computed at most once per ``ttl`` seconds per key; while one request recomputes an expired
    value, the others get the old one instead of waiting (or all recomputing it at once)."""

    def __init__(self, ttl):
        self.ttl = ttl
        self.entries = {}  # key -> (expires, value)
        self.busy = set()
        self.lock = threading.Lock()

    def get(self, key, compute):
        if self.ttl <= 0:
            return compute()
        entry = self.entries.get(key)
        if entry and time.monotonic() < entry[0]:
            return entry[1]
        with self.lock:
            mine = key not in self.busy
            self.busy.add(key)
        if not mine and entry:
            return entry[1]
        try:
            value = compute()
        except redis.RedisError:
            self.entries.clear()  # Redis is down: nobody gets old figures as if they were current
            raise
        finally:
            if mine:
                with self.lock:
                    self.busy.discard(key)
        if len(self.entries) >= CACHE_ENTRIES:
            self.entries.clear()
        self.entries[key] = (time.monotonic() + self.ttl, value)
        return value

    def fresh(self, key):
        """The value if it is cached and not expired, else None."""
        entry = self.entries.get(key)
        return entry[1] if entry and time.monotonic() < entry[0] else None


class Body:
    """A prepared response: bytes, a gzipped copy, ETags and headers, ready to send again and again."""

    def __init__(self, data, mimetype="application/json", headers=None):
        tag = hashlib.blake2b(data, digest_size=12).hexdigest()
        # no-cache: browsers keep the body but revalidate it each time, and get a 304 if it still holds.
        common = [("Content-Type", mimetype), ("Cache-Control", "no-cache"), *(headers or {}).items()]
        self.zipped = None
        if len(data) >= GZIP_MIN:
            vary = ("Vary", "Accept-Encoding, Origin")
            self.zipped = (gzip.compress(data, 4, mtime=0), tag + "-gz",
                           common + [("ETag", f'"{tag}-gz"'), ("Content-Encoding", "gzip"), vary])
        else:
            vary = ("Vary", "Origin")
        self.plain = (data, tag, common + [("ETag", f'"{tag}"'), vary])

    def pick(self, environ):
        """``(status, headers, bytes)`` for this request: gzipped if it takes gzip, 304 if its ETag holds."""
        accept = environ.get("HTTP_ACCEPT_ENCODING", "")
        zipped = self.zipped is not None and "gzip" in accept and (
            ";" not in accept or parse_accept_header(accept)["gzip"] > 0)
        data, tag, headers = self.zipped if zipped else self.plain
        match = environ.get("HTTP_IF_NONE_MATCH")
        if match and (f'"{tag}"' in match or match.strip() == "*"):
            return 304, headers, b""
        return 200, headers, data


def json_body(payload, skipped=None):
    """A Body of ``payload`` (a JSON-able value, or JSON bytes already), with its skipped-entries count."""
    headers = {} if skipped is None else {"X-Skipped-Entries": str(skipped)}
    return Body(payload if isinstance(payload, bytes) else to_json(payload), headers=headers)


def to_json(payload):
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def cache_key(environ):
    """Responses are cached per path and query string, any ``token`` left out."""
    query = environ.get("QUERY_STRING", "")
    if "token" in query:
        query = "&".join(part for part in query.split("&") if not part.startswith("token="))
    return environ.get("PATH_INFO", ""), query


def cached(compute):
    """The response for this URL, computed at most once per cache period (see ``Body.pick``)."""
    body = reader().cache.get(cache_key(request.environ), compute)
    reader().answered()
    status, headers, data = body.pick(request.environ)
    return Response(data, status, headers)


class CachedFastPath:
    """WSGI middleware: answers a GET whose response is cached and fresh without going through Flask's
    request handling (a third of the cost of a request), through the same gate; everything else goes on
    to the app (a refused request too: the app answers the refusal)."""

    def __init__(self, app, status_reader, gate):
        self.app = app
        self.reader = status_reader
        self.gate = gate

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "GET" and self.gate.authorize(environ) is None:
            body = self.reader.cache.fresh(cache_key(environ))
            if body is not None:
                status, headers, data = body.pick(environ)
                if status == 200:
                    headers = headers + [("Content-Length", str(len(data)))]
                start_response("200 OK" if status == 200 else "304 Not Modified",
                               headers + self.gate.cors_headers(environ))
                return [data]
        return self.app(environ, start_response)


# ---------------------------------------------------------------------------- routes

@bp.get("/metrics")
def metrics():
    """Every node's latest snapshot with its state: ``{node: snapshot}``; ``?spider=`` and ``?state=``."""
    spider = request.args.get("spider")
    full = all_fields()
    states = request.args.get("state")
    if states is not None:
        states = set(states.split(","))
        if not states <= set(STATES):
            abort(400, f"state must be one or more of {', '.join(STATES)}, comma-separated")

    def compute():
        nodes, skipped, now = reader().nodes()
        chosen = {n: s for n, s in nodes.items()
                  if (spider is None or s["spider"] == spider) and (states is None or s["state"] in states)}
        return json_body(reader().nodes_json(chosen, now, full), skipped)

    return cached(compute)


@bp.get("/metrics/<node:name>")
def metric(name):
    """A node id gives its snapshot; a spider name gives the spider's cluster view."""
    full = all_fields()

    def compute():
        snapshot, malformed = reader().node(name)
        if snapshot is not None:
            return json_body(snapshot)
        if name in reader().spider_names():
            nodes, skipped, now = reader().nodes()
            view = monitors.cluster_view(nodes, name)
            if view is not None:  # the view with its nodes' JSON spliced in: {..., "nodes": {...}}
                members = view.pop("nodes")
                view.update(monitors.queue_forecasts(reader().redis, members, reader().prefix, now)[name])
                return json_body(to_json(view)[:-1] + b',"nodes":' + reader().nodes_json(members, now, full) + b"}",
                                 skipped)
        if malformed:
            abort(404, "that node's stored snapshot is malformed")
        abort(404, "no node or spider by that name")

    return cached(compute)


@bp.get("/metrics/<node:name>/history")
def history(name):
    """A node's time series, or its spider's summed over nodes: ``?minutes=`` 1 to 1440, default 60."""
    minutes = request.args.get("minutes", "60")
    if not (minutes.isascii() and minutes.isdigit() and 1 <= int(minutes) <= MAX_MINUTES):
        abort(400, f"minutes must be a whole number from 1 to {MAX_MINUTES}")
    minutes = int(minutes)
    return cached(lambda: json_body(read_series(name, minutes)))


@bp.get("/spiders")
def spiders():
    """``{spider: cluster view}``, each view's ``nodes`` being the list of its node ids."""

    def compute():
        nodes, skipped, now = reader().nodes()
        return json_body(monitors.spiders_view(nodes, reader().redis, reader().prefix, now), skipped)

    return cached(compute)


def all_fields():
    """``?fields=all`` asks a list view for every field; by default it leaves out insight.BIG_FIELDS
    (per-domain figures, field coverage, error samples, latency buckets: most of a snapshot's size)."""
    fields = request.args.get("fields")
    if fields not in (None, "all"):
        abort(400, "fields must be 'all' (or absent: list views leave the large insight fields out)")
    return fields == "all"


@bp.get("/health")
def health():
    """200 when Redis answers, 503 (through the Redis error handler) when it does not. Never cached."""
    count = reader().redis.hlen(reader().key)
    reader().answered()
    return {"status": "ok", "redis": "ok", "nodes": count}


@bp.get("/prometheus")
def prometheus():
    """Prometheus text format, one collector built per scrape."""

    def compute():
        registry = CollectorRegistry()
        registry.register(ClusterCollector(*reader().nodes()[:2]))
        registry.register(RunsCollector(reader().redis.hgetall(monitors.run_meta_key(reader().prefix, "totals"))))
        return Body(generate_latest(registry), CONTENT_TYPE_LATEST)

    return cached(compute)


@bp.get("/")
def dashboard():
    path = current_app.config["DASHBOARD_PATH"]
    if not os.path.isfile(path):
        abort(404, "dashboard.html is not installed next to monitor_api.py")
    return send_file(path, mimetype="text/html", max_age=0)


@bp.get("/openapi.json")
def openapi():
    return jsonify(OPENAPI)


# ---------------------------------------------------------------------------- alerts and silences

@bp.get("/alerts")
def alerts():
    """``{"alerts": [...], "alerter": heartbeat or null, "silences": n, "now"}``: the alerter's pending and
    firing alerts, newest first (``monitors.read_alerts``)."""
    return cached(lambda: json_body(monitors.read_alerts(reader().redis, reader().prefix)))


@bp.get("/silences")
def silences():
    """``{"silences": [{id, matchers, until, comment, who, created}]}``, oldest first."""
    found = monitors.read_silences(reader().redis, reader().prefix)
    reader().answered()
    return {"silences": [{"id": sid, **silence} for sid, silence in found.items()]}


@bp.post("/silences")
@acting
def add_silence():
    """``{"matchers": {...}, "duration" | "until", "comment"}`` -> 201 ``{"id", "until"}``."""
    mon = reader()
    now = monitors.redis_now(mon.redis.time())
    try:
        silence = monitors.silence_from(request.get_json(silent=True), now,
                                        f"{g.actor['address']} ({g.actor['via']})")
        sid = monitors.add_silence(mon.redis, mon.prefix, silence)
    except ValueError as exc:
        abort(400, str(exc))
    mon.cache.entries.clear()  # /alerts shows it at once
    logger.info("Silence %s added by %s: %s until %s", sid, g.actor["address"], silence["matchers"], silence["until"])
    return {"id": sid, "until": silence["until"]}, 201


@bp.delete("/silences/<node:name>")
@acting
def delete_silence(name):
    """Delete a silence by id: 200 ``{"id", "deleted": true}``, or 404."""
    if not monitors.delete_silence(reader().redis, reader().prefix, name[:100]):
        abort(404, "no silence by that id")
    reader().cache.entries.clear()
    logger.info("Silence %s deleted by %s", name[:100], g.actor["address"])
    return {"id": name, "deleted": True}

# ---------------------------------------------------------------------------- fleet control

# The control log answers this many entries unless ?limit= says otherwise (at most CONTROL_LOG_KEEP).
CONTROL_LOG_LIMIT = 50
# A node id or spider name in a command is at most this long; a comment at most MAX_COMMENT characters.
MAX_NAME = 1000
MAX_COMMENT = 500
TARGET_KINDS = ("node", "spider", "all")


@bp.route("/control", methods=["GET", "POST"])  # GET listed so that @acting refuses it, and logs the refusal
@acting
def control():
    """``{"command", "node"|"spider"|"all", "comment"?}``: stored for the nodes to apply, and logged; 202 with
    the nodes it reaches now (not closed). A spider or ``all`` command also holds for nodes that start later."""
    command, kind, name, comment = parse_command(request.get_json(silent=True))
    nodes = reader().nodes()[0]
    if kind == "node":
        if name not in nodes:
            abort(404, "no node by that name")
        if nodes[name]["state"] == "closed":
            abort(409, "that node is closed: there is nothing to control")
        chosen = [name]
    else:
        chosen = [n for n, s in nodes.items() if kind == "all" or s["spider"] == name]
        if kind == "spider" and not chosen:
            abort(404, "no spider by that name")
    reached = sorted(n for n in chosen if nodes[n]["state"] != "closed")
    target = "all" if kind == "all" else f"{kind}:{name}"
    entry = monitors.issue_command(reader().redis, reader().prefix, command, target, comment=comment,
                                   who=g.actor["address"], via=g.actor["via"], reached=len(reached))
    reader().answered()
    logger.info("Control command %d: %s for %s from %s, reaching %d node(s)", entry["id"], command,
                target[:200], g.actor["address"], len(reached))
    return {"id": entry["id"], "command": command, "target": target, "at": entry["at"], "nodes": reached}, 202


def parse_command(body):
    """``(command, target kind, name, comment)`` from a POST /control body; 400 naming what is wrong."""
    if not isinstance(body, dict):
        abort(400, "send a JSON object: {\"command\": \"pause\", \"node\"|\"spider\"|\"all\": ...}")
    unknown = sorted(set(body) - {"command", "comment", *TARGET_KINDS})
    if unknown:
        abort(400, f"unknown field {unknown[0][:100]!r}: use command, node, spider, all and comment")
    command = body.get("command")
    if command not in monitors.CONTROL_COMMANDS:
        abort(400, f"command must be one of {', '.join(monitors.CONTROL_COMMANDS)}")
    kinds = [k for k in TARGET_KINDS if k in body]
    if len(kinds) != 1:
        abort(400, "name exactly one target: \"node\": <node id>, \"spider\": <name> or \"all\": true")
    kind, name = kinds[0], body[kinds[0]]
    if kind == "all" and name is not True:
        abort(400, "\"all\" must be true")
    if kind != "all" and not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and monitors._utf8(name)):
        abort(400, f"\"{kind}\" must be a non-empty string of at most {MAX_NAME} characters")
    comment = body.get("comment", "")
    if not (isinstance(comment, str) and len(comment) <= MAX_COMMENT and monitors._utf8(comment)):
        abort(400, f"comment must be a string of at most {MAX_COMMENT} characters")
    return command, kind, name if kind != "all" else None, comment


@bp.get("/control/log")
def control_log():
    """The newest control commands first, each with who sent it, when, and every node's acknowledgement."""
    limit = request.args.get("limit", str(CONTROL_LOG_LIMIT))
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= monitors.CONTROL_LOG_KEEP):
        abort(400, f"limit must be a whole number from 1 to {monitors.CONTROL_LOG_KEEP}")
    log = monitors.read_control_log(reader().redis, reader().prefix, int(limit))
    reader().answered()
    return {"log": log}


# ---------------------------------------------------------------------------- errors

@bp.app_errorhandler(HTTPException)
def http_error(exc):
    response = exc.get_response()  # keeps headers such as Allow
    response.data = json.dumps({"error": exc.description})
    response.content_type = "application/json"
    return response


@bp.app_errorhandler(redis.RedisError)
def redis_error(exc):
    """503 while Redis is down or hanging (logged once per outage); a key of the wrong type (a hand edit,
    another program sharing the prefix) is named with its type, and any other refusal by Redis quoted."""
    if isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc):
        try:
            problem = (reader().wrong_type() or reader().wrong_type(history_names()) or runs_wrong_type()
                       or f"a key read by {request.path[:200]} has the wrong Redis type")
        except redis.RedisError as again:  # Redis went down meanwhile
            exc = again
        else:
            reader().report(f"{problem}: the routes that read it fail until it is deleted or fixed")
            return jsonify(error=problem), 500
    if isinstance(exc, redis.ResponseError):  # NOPERM, OOM, LOADING...
        problem = f"Redis refused the request: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        reader().report(problem)
        return jsonify(error=problem), 503
    reader().outage.failed("Redis at %s is unavailable: %s", monitors.redact(str(reader().url)),
                           monitors.scrub(exc, reader().url))
    response = jsonify(error="Redis is unavailable")
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


def history_names():
    """The nodes whose history lists a history request reads: the node named, or its spider's nodes."""
    if request.endpoint != "api.history":
        return ()
    name = request.view_args["name"]
    return [name] + sorted(n for n, s in reader().nodes()[0].items() if s["spider"] == name)


@bp.app_errorhandler(Exception)
def internal_error(exc):
    logger.exception("Unhandled error on %s %s", request.method, request.path[:200])
    return jsonify(error="internal error"), 500


# ---------------------------------------------------------------------------- history

def read_series(name, minutes):
    """``{"name", "kind", "minutes", "step", "points"}`` for a node, or for a spider over its nodes."""
    mon = reader()
    snapshot, _, now = mon.node_reader.node(name)
    if snapshot is not None:
        members, kind = {name: snapshot}, "node"
    elif name in mon.spider_names():
        nodes, _, now = mon.nodes()
        members, kind = {n: s for n, s in nodes.items() if s["spider"] == name}, "spider"
    else:
        members = {}
    if not members:
        abort(404, "no node or spider by that name")
    long = minutes * 60 > monitors.HISTORY_SECONDS
    intervals = {n: s.get("interval", monitors.DEFAULT_INTERVAL) for n, s in members.items()}  # gated: (0, 1 day]
    # One point per step: no more than MAX_POINTS, and no finer than the nodes report.
    step = math.ceil(max(minutes * 60 / MAX_POINTS, monitors.TREND_BUCKET if long else max(intervals.values())))
    series = monitors.read_histories(mon.redis, list(members), minutes, mon.prefix, now)
    if kind == "node":
        points = list({int(row["timestamp"] // step): row for row in series[name]}.values())
    else:
        holds = {n: monitors.STALE_INTERVALS * intervals[n] for n in members}
        hosts = {n: s.get("host", n) for n, s in members.items()}
        before = {n: members[n] for n in members if not series[n]}
        points = spider_points(series, holds, hosts, step, int(now // step), before)
    return {"name": name, "kind": kind, "minutes": minutes, "step": step, "points": points[-MAX_POINTS:]}


def spider_points(series, holds, hosts, step, last, before=None):
    """One point per ``step``-second bucket up to ``last`` over every node's rows (sorted, in the window),
    combined by ``monitors.SPIDER_FIELDS``. A node's last row counts in later buckets until it is
    ``holds[node]`` seconds old (so a late report is not a dip in the totals); its counters (pages, items,
    errors) count for good, as in the cluster view, where a closed or dead node's pages still count.
    ``before``: ``{node: snapshot}`` of nodes whose rows all ended before the window, counted from the
    start. Each row fills at most ``holds / step + 1`` buckets, whatever the stored timestamps."""
    buckets = {}  # bucket -> {node: row}
    for node, rows in series.items():
        for row, following in zip(rows, rows[1:] + [None]):
            start = int(row["timestamp"] // step)
            end = min(int(following["timestamp"] // step) if following else last + 1, last + 1,
                      int((row["timestamp"] + holds[node]) // step) + 1)
            for b in range(start, end):
                buckets.setdefault(b, {})[node] = row
    combined = [f for f in monitors.HISTORY_FIELDS if f in monitors.SPIDER_FIELDS]
    counters = [f for f in combined if monitors.SPIDER_FIELDS[f] == "sum" and f not in monitors.CRAWLING_FIELDS]
    fields = [f for f in combined if f not in counters]
    latest = dict(before or {})  # node -> its newest row so far: where its counters stand
    points = []
    for b in sorted(buckets):
        nodes = list(buckets[b])
        rows = [buckets[b][n] for n in nodes]
        latest.update(buckets[b])
        point = {"timestamp": b * step, "nodes": len(rows)}
        point.update(monitors.combine(rows, fields, [hosts[n] for n in nodes]))
        point.update(monitors.combine(list(latest.values()), counters))
        points.append(point)
    return points


# ---------------------------------------------------------------------------- Prometheus

# (snapshot field, metric name, help, scale): base units, so percentages become ratios.
GAUGES = (
    ("cpu", "scrapy_host_cpu_usage_ratio", "Host CPU in use, 0 to 1.", 0.01),
    ("memory", "scrapy_host_memory_usage_ratio", "Host memory in use, 0 to 1.", 0.01),
    ("process_cpu", "scrapy_process_cpu_usage_ratio", "CPU used by the crawler process (1 = one core).", 0.01),
    ("rss", "scrapy_process_resident_memory_bytes", "Resident memory of the crawler process.", 1),
    ("timestamp", "scrapy_node_last_report_timestamp_seconds", "When the node last reported.", 1),
    ("start_time", "scrapy_node_start_time_seconds", "When the node's crawl started.", 1),
    ("interval", "scrapy_node_report_interval_seconds", "Seconds between the node's reports.", 1),
)
COUNTERS = (
    ("bytes_sent", "scrapy_host_network_sent_bytes", "Bytes sent by the host."),
    ("bytes_recv", "scrapy_host_network_received_bytes", "Bytes received by the host."),
    ("pages", "scrapy_responses_received", "Responses received (response_received_count)."),
    ("items", "scrapy_items_scraped", "Items scraped (item_scraped_count)."),
    ("dropped", "scrapy_items_dropped", "Items dropped by pipelines (item_dropped_count)."),
    ("requests", "scrapy_downloader_requests", "Requests sent (downloader/request_count)."),
    ("exceptions", "scrapy_downloader_exceptions", "Download exceptions (downloader/exception_count)."),
    ("retries", "scrapy_retries", "Requests retried (retry/count)."),
    ("errors", "scrapy_log_errors", "ERROR log lines (log_count/ERROR)."),
    ("warnings", "scrapy_log_warnings", "WARNING log lines (log_count/WARNING)."),
)
QUEUES = (("queue_requests", "requests"), ("queue_start_urls", "start_urls"), ("queue_dupefilter", "dupefilter"))


class ClusterCollector:
    """A prometheus_client collector over one read of the status hash."""

    def __init__(self, nodes, skipped):
        self.nodes = nodes
        self.skipped = skipped

    def collect(self):
        labels = ["node", "spider"]
        for field, name, doc, scale in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            self.add(family, field, scale)
            yield family
        for field, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            self.add(family, field)
            yield family
        family = CounterMetricFamily("scrapy_http_responses", "Responses by status class.",
                                     labels=labels + ["status_class"])
        for node, s in self.nodes.items():
            for c in range(1, 6):
                if monitors.is_number(s.get(f"status_{c}xx")):
                    family.add_metric([node, s["spider"], f"{c}xx"], s[f"status_{c}xx"])
        yield family
        up = GaugeMetricFamily("scrapy_node_up", "1 while the node reports on time, else 0.", labels=labels)
        for node, s in self.nodes.items():
            up.add_metric([node, s["spider"]], 1 if s["state"] == "live" else 0)
        yield up
        state = GaugeMetricFamily("scrapy_node_state", "1 for the node's state (live, paused, stale, closed).",
                                  labels=labels + ["state"])
        for node, s in self.nodes.items():
            state.add_metric([node, s["spider"], s["state"]], 1)
        yield state
        views = monitors.spiders_view(self.nodes)
        count = GaugeMetricFamily("scrapy_nodes", "Nodes of each spider by state.", labels=["spider", "state"])
        queue = GaugeMetricFamily("scrapy_queue_size", "Entries in the spider's shared scrapy-redis queues.",
                                  labels=["spider", "queue"])
        for spider, view in views.items():
            for state in STATES:
                count.add_metric([spider, state], view[f"nodes_{state}"])
            for field, kind in QUEUES:
                if monitors.is_number(view.get(field)):
                    queue.add_metric([spider, kind], view[field])
        yield count
        yield queue
        yield from insight_families(self.nodes)
        yield GaugeMetricFamily("scrapy_monitor_skipped_entries",
                                "Malformed values in the status hash, left out above.", value=self.skipped)

    def add(self, family, field, scale=1):
        for node, s in self.nodes.items():
            if monitors.is_number(s.get(field)):
                family.add_metric([node, s["spider"]], s[field] * scale if scale == 1 else round(s[field] * scale, 6))


class RunsCollector:
    """``scrapy_runs_total{spider,finish_reason}``: runs ever recorded (capping the history never lowers it)."""

    def __init__(self, raw_totals):
        self.totals = monitors.run_totals(raw_totals)

    def collect(self):
        family = CounterMetricFamily("scrapy_runs", "Runs recorded, by finish reason (lost: a node that went "
                                     "silent without closing).", labels=["spider", "finish_reason"])
        for (spider, reason), count in sorted(self.totals.items()):
            family.add_metric([spider, reason], count)
        yield family


# ---------------------------------------------------------------------------- run history

MAX_RUNS = 500
DEFAULT_RUNS = 50


@bp.get("/runs")
def runs():
    """Runs, newest first: ``?spider=`` (default: every spider's), ``limit`` (1-500, default 50), ``before`` (a
    ``next`` cursor or unix seconds), ``reason`` (finish reasons, comma-separated)."""
    args = request.args
    spider, limit, before = args.get("spider"), args.get("limit", str(DEFAULT_RUNS)), args.get("before")
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_RUNS):
        abort(400, f"limit must be a whole number from 1 to {MAX_RUNS}")
    if monitors.run_bound(before) is None:
        abort(400, "before must be a cursor from 'next' or unix seconds")
    reasons = set(split_list(args["reason"])) if args.get("reason") else None

    def compute():
        found, cursor = monitors.read_runs(reader().redis, reader().prefix, spider or None, int(limit), before, reasons)
        return json_body({"runs": found, "next": cursor})

    return cached(compute)


def runs_wrong_type():
    """For a runs route answered WRONGTYPE: which run history key has another type (or None)."""
    if request.endpoint not in ("api.runs", "api.runs_summary"):
        return None
    prefix = reader().prefix
    expected = [(monitors.run_meta_key(prefix, "totals"), "hash")]
    spider = request.view_args.get("name") or request.args.get("spider")
    if spider:
        expected.append((monitors.runs_key(prefix, spider), "zset"))
    return monitors.wrong_type(reader().redis, expected)


@bp.get("/runs/<node:name>/summary")
def runs_summary(name):
    """Run count, the baseline, finish reasons and per-day totals for the last 30 days of one spider."""

    def compute():
        now = monitors.redis_now(reader().redis.time())
        summary = monitors.runs_summary(reader().redis, reader().prefix, name, now)
        if not summary["runs"] and not summary["totals"] and name not in reader().spider_names():
            abort(404, "no spider by that name has runs or nodes")
        return json_body(summary)

    return cached(compute)

# ---------------------------------------------------------------------------- Prometheus: crawl insight

# (snapshot domain figure, metric name, help): per-domain counters of the top domains.
DOMAIN_COUNTERS = (
    ("pages", "scrapy_domain_responses", "Responses received from the domain (top domains, the rest as 'other')."),
    ("errors", "scrapy_domain_errors", "ERROR log lines naming a request to the domain."),
)
DOMAIN_STATUSES = ("4xx", "5xx", "429")


def insight_families(nodes):
    """The download latency histogram, per-domain counters and item field coverage of every node."""
    labels = ["node", "spider"]
    latency = HistogramMetricFamily("scrapy_download_latency_seconds",
                                    "Download latency of the node's responses over its run.", labels=labels)
    coverage = GaugeMetricFamily("scrapy_item_field_coverage_ratio",
                                 "Share of the run's items with the field present and not empty.",
                                 labels=labels + ["field"])
    counters = {field: CounterMetricFamily(name, doc, labels=labels + ["domain"]) for field, name, doc in DOMAIN_COUNTERS}
    statuses = CounterMetricFamily("scrapy_domain_error_responses",
                                   "Responses from the domain by error status (4xx, 5xx, and 429 among the 4xx).",
                                   labels=labels + ["domain", "status"])
    for node, s in nodes.items():
        buckets = s.get("latency_buckets")
        if buckets:
            bounds = [f"{b:g}" for b in insight.LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([node, s["spider"]], list(zip(bounds, buckets)), monitors.number(s.get("latency_sum"), 0))
        for domain, figures in (s.get("domains") or {}).items():
            for field, family in counters.items():
                if figures[field] is not None:
                    family.add_metric([node, s["spider"], domain], figures[field])
            for status in DOMAIN_STATUSES:
                if figures[status] is not None:
                    statuses.add_metric([node, s["spider"], domain, status], figures[status])
        for field, share in (s.get("fields") or {}).items():
            coverage.add_metric([node, s["spider"], field], share)
    yield latency
    yield from counters.values()
    yield statuses
    yield coverage


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    prog = "monitor_api.py"
    epilog = "environment:\n" + "\n".join(f"  {name:22} {text}" for name, text in ENVIRONMENT)
    parser = monitors.Parser(prog=prog, description=__doc__.splitlines()[0], epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=monitors.env("MONITOR_API_HOST", DEFAULT_HOST),
                        help="address to listen on (default: $MONITOR_API_HOST or %(default)s)")
    parser.add_argument("--port", default=monitors.env("MONITOR_API_PORT", str(DEFAULT_PORT)),
                        help="port to listen on (default: $MONITOR_API_PORT or %(default)s)")
    try:
        args = parser.parse_args(argv)
        port = args.port.strip()
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"the port must be a number from 1 to 65535, not {args.port!r}")
        app = create_app({"MONITOR_API_HOST": args.host})
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" on every busy second
        log_start(app)
        try:
            server = waitress.create_server(app, host=args.host, port=int(port), threads=THREADS,
                                            ident="scrapy-cluster-monitor")
        except (OSError, ValueError, UnicodeError) as exc:
            raise ConfigError(f"cannot listen on {args.host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    except ConfigError as exc:
        return monitors.exit_config_error(prog, exc)
    server.print_listen("Serving on http://{}:{}")
    server.run()
    return 0


def log_start(app):
    reader, gate = app.extensions["reader"], app.extensions["gate"]
    logger.info("Reading %s (prefix %r); token %s%s", monitors.redact(str(reader.url)), reader.prefix,
                "required" if gate.token else "not required", "; read-only" if gate.readonly else "")
    if gate.token is None and not gate.loopback:
        logger.warning("Listening on %s without MONITOR_API_TOKEN: anyone who can reach it can read the metrics; "
                       "requests must name this address, localhost or a name in MONITOR_API_HOSTS as their Host, "
                       "and changes (control, silences) are refused", gate.listening)


# ---------------------------------------------------------------------------- OpenAPI

# The description served at /openapi.json; test_api checks that its paths are the app's routes and that real
# responses fit it. Python rather than a data file, so it uses the module's own limits (STATES, MAX_MINUTES).

def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description, schema, headers=False):
    out = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = {"X-Skipped-Entries": {"description": "Malformed values in Redis, left out.",
                                                "schema": {"type": "integer"}}}
    return out


_GATE = {"400": _json("Without a token: a Host that is not this API's (see MONITOR_API_HOSTS).", _ref("Error")),
         "401": _json("Missing or wrong token (when MONITOR_API_TOKEN is set).", _ref("Error"))}
_ERRORS = {**_GATE,
           "500": _json("A Redis key the route reads has the wrong type (the error names it).", _ref("Error")),
           "503": _json("Redis is unavailable, or refused the request.", _ref("Error"))}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "A node id (its slashes may be sent as they are) or a spider name."}
_SEED = ["timestamp", "spider", "cpu", "memory", "bytes_sent", "bytes_recv"]

_FIELDS = {"name": "fields", "in": "query", "schema": {"type": "string", "enum": ["all"]},
           "description": "all: list views include domains, fields, error_samples and latency_buckets "
                          "(a node's own snapshot always has them)."}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "scrapy-cluster-monitor API", "version": "1.0.0",
             "description": "Live metrics of scrapy-redis crawler nodes, read from Redis. Responses may be up to "
                            "MONITOR_API_CACHE seconds old; they carry an ETag and answer If-None-Match with 304."},
    "security": [{}, {"bearer": []}, {"query": []}],
    "paths": {
        "/metrics": {"get": {
            "summary": "Every node's latest snapshot, keyed by node id.",
            "parameters": [
                {"name": "spider", "in": "query", "schema": {"type": "string"}, "description": "Only this spider's nodes."},
                {"name": "state", "in": "query", "schema": {"type": "string"},
                 "description": "live, paused, stale or closed; several comma-separated."}, _FIELDS],
            "responses": {"200": _json("{node id: snapshot}", {"type": "object", "additionalProperties": _ref("Snapshot")},
                                       headers=True),
                          **_ERRORS, "400": _json("Unknown state, or a Host not accepted.", _ref("Error"))}}},
        "/metrics/{name}": {"get": {
            "summary": "A node's snapshot, or a spider's cluster view.",
            "parameters": [_NAME, _FIELDS],
            "responses": {"200": _json("The node's snapshot, or the spider's view (it has `nodes`).",
                                       {"oneOf": [_ref("Snapshot"), _ref("ClusterView")]}, headers=True),
                          "404": _json("No such node or spider.", _ref("Error")), **_ERRORS}}},
        "/metrics/{name}/history": {"get": {
            "summary": "Time series for charts: a node's, or a spider's summed over its nodes.",
            "parameters": [_NAME, {"name": "minutes", "in": "query",
                                   "schema": {"type": "integer", "minimum": 1, "maximum": MAX_MINUTES, "default": 60}}],
            "responses": {"200": _json("Points oldest first.", _ref("History")),
                          "404": _json("No such node or spider.", _ref("Error")), **_ERRORS,
                          "400": _json("Bad minutes, or a Host not accepted.", _ref("Error"))}}},
        "/spiders": {"get": {
            "summary": "One cluster view per spider; `nodes` lists the node ids.",
            "responses": {"200": _json("{spider: view}", {"type": "object", "additionalProperties": _ref("SpiderView")},
                                       headers=True), **_ERRORS}}},
        "/health": {"get": {
            "summary": "Whether Redis answers. Needs no token.", "security": [{}],
            "responses": {"200": _json("Redis answers.", _ref("Health")),
                          "500": _ERRORS["500"], "503": _ERRORS["503"]}}},
        "/prometheus": {"get": {
            "summary": "Prometheus text format: base units, _total counters, node and spider labels.",
            "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_ERRORS}}},
        "/": {"get": {
            "summary": "The dashboard page (dashboard.html).",
            "responses": {"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                          "404": _json("dashboard.html is not installed.", _ref("Error")), **_GATE}}},
        "/alerts": {"get": {
            "summary": "The alerter's pending and firing alerts, newest first, and its heartbeat.",
            "responses": {"200": _json("Alerts.", _ref("Alerts")), **_ERRORS}}},
        "/silences": {
            "get": {"summary": "The active silences, oldest first.",
                    "responses": {"200": _json("Silences.", {"type": "object", "required": ["silences"]}), **_ERRORS}},
            "post": {"summary": "Silence the alerts matching every given label (same access rules as control).",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("NewSilence")}}},
                     "responses": {"201": _json("Created.", {"type": "object", "required": ["id", "until"]}),
                                   **_ERRORS, "400": _json("Bad matchers, duration or until.", _ref("Error")),
                                   "403": _json("Read-only, or no token from a browser.", _ref("Error"))}}},
        "/silences/{name}": {"delete": {
            "summary": "Delete a silence by id.", "parameters": [{"name": "name", "in": "path", "required": True,
                                                                   "schema": {"type": "string"}}],
            "responses": {"200": _json("Deleted.", {"type": "object", "required": ["id", "deleted"]}),
                          "404": _json("No such silence.", _ref("Error")), **_ERRORS}}},

        "/control": {"post": {
            "summary": "Pause, resume, stop or drain one node, a spider's nodes or every node.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ControlRequest")}}},
            "responses": {"202": _json("Stored; nodes apply it within about 2 s.", _ref("ControlAccepted")),
                          "400": _json("Bad body, or a Host not accepted.", _ref("Error")),
                          "403": _json("Read-only mode, or no token from a browser origin or a non-loopback API.",
                                       _ref("Error")),
                          "404": _json("No such node or spider.", _ref("Error")),
                          "405": _json("GET: control only takes POST.", _ref("Error")),
                          "409": _json("That node is closed.", _ref("Error")),
                          "415": _json("The body is not application/json.", _ref("Error")), **_ERRORS}}},
        "/control/log": {"get": {
            "summary": "Control commands, newest first, with each node's acknowledgement.",
            "parameters": [{"name": "limit", "in": "query", "schema": {
                "type": "integer", "minimum": 1, "maximum": monitors.CONTROL_LOG_KEEP, "default": CONTROL_LOG_LIMIT}}],
            "responses": {"200": _json("The log.", {"type": "object", "required": ["log"], "properties": {
                "log": {"type": "array", "items": _ref("ControlEntry")}}}),
                "400": _json("Bad limit, or a Host not accepted.", _ref("Error")), **_ERRORS}}},
        "/openapi.json": {"get": {
            "summary": "This description.",
            "responses": {"200": _json("OpenAPI 3 document.", {"type": "object", "required": ["openapi", "paths"]}),
                          **_GATE}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "query": {"type": "apiKey", "in": "query", "name": "token"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Alerts": {"type": "object", "required": ["alerts", "alerter"], "properties": {"alerts": {
                "type": "array", "items": {"type": "object", "required": [
                    "rule", "alertname", "severity", "node", "spider", "host", "state", "value", "threshold",
                    "since", "last_sent", "silenced"]}}}},
            "NewSilence": {"type": "object", "required": ["matchers"], "properties": {
                "matchers": {"type": "object", "description": "any of node, spider, host, rule"},
                "duration": {"description": "seconds, or text like 90m, 2h, 1d (at most 30 days)"},
                "until": {"type": "number"}, "comment": {"type": "string"}}},
            "Health": {"type": "object", "required": ["status", "redis", "nodes"],
                       "properties": {"status": {"type": "string"}, "redis": {"type": "string"},
                                      "nodes": {"type": "integer"}}},
            "Snapshot": {
                "type": "object",
                "description": "A node's latest report as monitors.py writes it (see the README for every field), "
                               "plus its derived state.",
                "required": _SEED + ["node", "host", "pid", "status", "interval", "pages", "items", "state"],
                "properties": {"timestamp": {"type": "integer"}, "spider": {"type": "string"},
                               "cpu": {"type": "number"}, "memory": {"type": "number"},
                               "bytes_sent": {"type": "integer"}, "bytes_recv": {"type": "integer"},
                               "node": {"type": "string"}, "host": {"type": "string"}, "pid": {"type": "integer"},
                               "status": {"type": "string", "enum": ["running", "paused", "closed"]},
                               "command": {"type": "object", "description": "the last control command applied",
                                           "required": ["id", "name", "at"]},
                               "interval": {"type": "number"}, "pages": {"type": "integer"},
                               "items": {"type": "integer"}, "state": {"type": "string", "enum": list(STATES)}}},
            "SpiderView": {
                "type": "object",
                "required": _SEED + ["pages", "items", "requests", "errors", "pages_per_min", "items_per_min",
                                     "requests_per_min", "errors_per_min", "queue_requests", "queue_start_urls",
                                     "queue_dupefilter", "nodes_live", "nodes_stale", "nodes_closed", "nodes",
                                     "queue_rate", "queue_eta"],
                "properties": {"nodes": {"type": "array", "items": {"type": "string"}}}},
            "ClusterView": {
                "type": "object",
                "required": _SEED + ["pages", "items", "nodes_live", "nodes_stale", "nodes_closed", "nodes",
                                     "queue_rate", "queue_eta"],
                "properties": {"nodes": {"type": "object", "additionalProperties": _ref("Snapshot")}}},
            "ControlRequest": {
                "type": "object", "required": ["command"],
                "description": "Exactly one of node, spider and all.",
                "properties": {"command": {"type": "string", "enum": list(monitors.CONTROL_COMMANDS)},
                               "node": {"type": "string"}, "spider": {"type": "string"},
                               "all": {"type": "boolean", "enum": [True]},
                               "comment": {"type": "string", "maxLength": MAX_COMMENT}}},
            "ControlAccepted": {
                "type": "object", "required": ["id", "command", "target", "at", "nodes"],
                "properties": {"id": {"type": "integer"}, "command": {"type": "string"},
                               "target": {"type": "string", "description": "node:<id>, spider:<name> or all"},
                               "at": {"type": "number", "description": "Redis's clock, unix seconds"},
                               "nodes": {"type": "array", "items": {"type": "string"}}}},
            "ControlEntry": {
                "type": "object", "required": ["id", "command", "target", "at", "acks"],
                "properties": {"id": {"type": "integer"}, "command": {"type": "string"}, "target": {"type": "string"},
                               "at": {"type": "number"}, "comment": {"type": "string"},
                               "who": {"type": "string", "description": "the client address"},
                               "via": {"type": "string", "description": "how it was let in: token, or no token..."},
                               "reached": {"type": "integer", "description": "nodes not closed when it was sent"},
                               "acks": {"type": "object", "additionalProperties": {"type": "number"},
                                        "description": "node id: when it applied the command (its clock)"}}},
            "History": {
                "type": "object", "required": ["name", "kind", "minutes", "step", "points"],
                "properties": {
                    "name": {"type": "string"}, "kind": {"type": "string", "enum": ["node", "spider"]},
                    "minutes": {"type": "integer"}, "step": {"type": "integer"},
                    "points": {"type": "array", "items": {
                        "type": "object", "required": ["timestamp", "cpu", "memory", "pages", "items"],
                        "description": "A node's points are its rows (one per step); a spider's add `nodes`, the "
                                       "number of nodes summed, with cpu/memory averaged and queue_requests the largest."}}}},
        },
    },
}


# Run history's part of the description.
def _NULLABLE(kind):  # noqa: N802 - reads as a schema constant
    return {"oneOf": [{"type": kind}, {"enum": [None]}]}


OPENAPI["paths"].update({
    "/runs": {"get": {
        "summary": "Runs (one node's life each), newest end_time first.",
        "parameters": [
            {"name": "spider", "in": "query", "schema": {"type": "string"},
             "description": "Only this spider's runs (default: every spider's)."},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_RUNS,
                                                        "default": DEFAULT_RUNS}},
            {"name": "before", "in": "query", "schema": {"type": "string"},
             "description": "The `next` of the previous page (exact even among runs sharing an end_time), or "
                            "unix seconds: runs that ended earlier."},
            {"name": "reason", "in": "query", "schema": {"type": "string"},
             "description": "Only runs with these finish reasons (comma-separated; `lost` included)."}],
        "responses": {"200": _json("A page of runs and the cursor of the next one (null at the end).",
                                   {"type": "object", "required": ["runs", "next"],
                                    "properties": {"runs": {"type": "array", "items": _ref("Run")},
                                                   "next": _NULLABLE("string")}}),
                      **_ERRORS, "400": _json("Bad limit or before, or a Host not accepted.",
                                              _ref("Error"))}}},
    "/runs/{name}/summary": {"get": {
        "summary": "A spider's runs at a glance: count, baseline, finish reasons, per-day totals for 30 days.",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "A spider name."}],
        "responses": {"404": _json("No spider by that name has runs or nodes.", _ref("Error")),
                      "200": _json("The summary.", {
            "type": "object", "required": ["spider", "runs", "baseline", "baseline_runs", "reasons", "totals", "days"],
            "properties": {"runs": {"type": "integer"}, "baseline_runs": {"type": "integer"},
                           "baseline": _NULLABLE("object"),
                           "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
                           "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
                           "days": {"type": "array", "items": {"type": "object",
                                                               "required": ["day", "runs", "pages", "items", "errors"]}}}}),
                      **_ERRORS}}},
})
OPENAPI["components"]["schemas"]["Run"] = {
    "type": "object",
    "description": "One node's run; counters as its last snapshot had them, times on Redis's clock. `compare` "
                   "holds ratios to the median of the previous 10 runs not lost (null with fewer than 3).",
    "required": ["node", "spider", "host", "pid", "start_time", "end_time", "duration", "finish_reason",
                 *monitors.RUN_COUNTERS, "pages_per_min", "items_per_min", "compare", "baseline_runs"],
    "properties": {"node": {"type": "string"}, "spider": {"type": "string"}, "finish_reason": {"type": "string"},
                   "end_time": {"type": "integer"}, "duration": {"type": "integer"},
                   "compare": _NULLABLE("object"), "baseline_runs": {"type": "integer"}}}


if __name__ == "__main__":
    sys.exit(main())
