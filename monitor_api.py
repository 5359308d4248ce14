"""The monitor's JSON API: every node's latest metrics, cluster views, history, runs, alerts and Prometheus.

Run ``python monitor_api.py`` (waitress on MONITOR_API_HOST:MONITOR_API_PORT), then
``curl http://localhost:5000/metrics`` or open http://localhost:5000/ for the dashboard.
Tests build their own app with ``create_app({"REDIS_URL": ..., ...})``. The routes are thin: who may do
what is monitor_gate.py, the routes that change data monitor_changes.py, the response cache monitor_cache.py,
Prometheus monitor_prometheus.py, the OpenAPI document monitor_openapi.json, and what they read monitor_read.py
and monitor_alert_state.py.
"""

import argparse
import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import re
import sys
import time

import redis
import waitress
from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request, send_file, stream_with_context
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from monitor_acting import CONTROL_LOG_KEEP
from monitor_alert_state import read_alerts, read_silences
from monitor_cache import CACHE_ENTRIES, Body, Cache, CachedFastPath, cache_key, json_body, to_json
from monitor_changes import audit_refusal, audit_reload, changes, reader
from monitor_contract import (
    BIG_FIELDS,
    DEFAULT_INTERVAL,
    HISTORY_SECONDS,
    STALE_INTERVALS,
    TREND_BUCKET,
    TREND_SECONDS,
    dead_totals_key,
    history_key,
    insight_key,
    redis_now,
    run_meta_key,
    runs_key,
    status_key,
    trend_key,
)
from monitor_events import Hub
from monitor_export import DAY_COLUMNS, RUN_COLUMNS, csv_text, days_rows, runs_rows
from monitor_fields import NODE_FIELDS, VIEW_FIELDS, closed, node_json, parse_fields, project_view, projected
from monitor_gate import ADMIN, MAX_BODY, OPERATOR, SEED_BODY, TICKET_SECONDS, Gate, gate, identity, log_acting, needs
from monitor_nodes import ChangeFeed, NodeEntry, NodeReader, gc_paused, wrong_type
from monitor_prometheus import LEVELS, NODE_LABELS, RedisCollector, exposition, scrape_input
from monitor_queues import DEAD_LIMIT, MAX_DEAD_LIMIT, dead_bound, read_dead
from monitor_read import STATES, read_histories, read_markers, read_rollups, spider_points, spiders_view
from monitor_records import read_audit, read_control_log, read_runs, run_bound
from monitor_records import runs_summary as read_runs_summary
from monitor_redis import RedisWatch
from monitor_settings import (
    API,
    ConfigError,
    Outage,
    Parser,
    connect,
    described,
    exit_config_error,
    ha_kind,
    key_prefix,
    port,
    readers_of,
    redact,
    scrub,
    split_list,
    unknown_settings,
    value,
    whole,
)
from monitor_snapshot import age, ages, last_report

logger = logging.getLogger(__name__)

# Lower than the extension's timeout, so a request fails with 503 well within a second when Redis hangs.
REDIS_TIMEOUT = 0.5
# A chart needs no more points than this; it keeps a history response to a few tens of KB.
MAX_POINTS = 360
MAX_MINUTES = TREND_SECONDS // 60
# Waitress worker threads: a request waiting on a slow Redis must not hold up the cached ones.
THREADS = 16
# Connections waitress keeps open at once besides the event streams' (its default limit).
CONNECTIONS = 100
# A key of the wrong Redis type fails every request that reads it: log each such key once a minute, not each time.
REPORT_EVERY = 60.0
# The OpenAPI document served at /openapi.json, beside this file (test_api checks it against the routes).
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monitor_openapi.json")
# Waitress itself refuses a body over this before reading it (the gate answers 413 in JSON from MAX_BODY up).
WAITRESS_BODY = SEED_BODY
# A response larger than this goes through a temporary file on its way out (waitress's default is 1 MB): a large
# prepared body does not (monitor_cache.wrapped), a streamed one (CSV exports) may.
WAITRESS_OUTBUF = 4 * 1024 * 1024
# glibc raises its mmap threshold to the largest block freed (up to 32 MB): past that, the megabyte bodies of a big
# cluster come from the heap, which keeps them resident once freed. A fixed threshold gives each back when sent
# (10,000 nodes, /metrics/<spider> read again and again: 480 MB resident without, 200 MB with).
MMAP_THRESHOLD = 1 << 20
bp = Blueprint("api", __name__)


class NodeIdConverter(PathConverter):
    """Any node id, including ones with slashes, a leading slash or a trailing one."""

    regex = ".+?"
    part_isolating = False


# ---------------------------------------------------------------------------- the app

def create_app(config=None):
    """The API app. Its settings (monitor_settings.SETTINGS read by the API) come from ``config`` (keyed by their
    environment variable names: tests, the command line), else the environment, else their defaults, parsed;
    a setting it cannot run with raises ConfigError naming it."""
    app = Flask(__name__)
    given = dict(config or {})
    app.config.update({s.name: value(s.name, given.pop(s.name, None)) for s in readers_of(API)})
    app.config.update({"DASHBOARD_PATH": os.path.join(app.root_path, "dashboard.html"), **given})
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY  # a chunked body too is cut there (413), before any parsing
    app.debug = False  # never, whatever FLASK_DEBUG says: errors are JSON, tracebacks go to the log
    app.extensions["gate"] = Gate(app.config)
    app.extensions["reader"] = StatusReader(app.config)
    app.extensions["events"] = Hub(app.config["REDIS_URL"], app.extensions["reader"].prefix,  # {prefix} on a cluster
                                   app.config["MONITOR_EVENTS_KEEP"], app.config["MONITOR_EVENTS_CLIENTS"],
                                   app.config["MONITOR_EVENTS_DROP"], app.extensions["reader"].node_reader.feed)
    app.extensions["gate"].tokens.reloaded = functools.partial(audit_reload, app.extensions["reader"], app.config)
    app.extensions["audit_refusal"] = audit_refusal
    app.url_map.merge_slashes = False  # "a//b" is a node id, not a typo to redirect
    app.url_map.converters["node"] = NodeIdConverter
    app.register_blueprint(bp)
    app.register_blueprint(changes)
    app.wsgi_app = CachedFastPath(app.wsgi_app, app.extensions["reader"], app.extensions["gate"])
    with open(OPENAPI_PATH, encoding="utf-8") as f:
        app.extensions["openapi"] = json.load(f)
    return app


def opened(node, snapshot, entry, fields):
    """A node's ``node_json`` part as ``nodes_json`` sends it, with its digest and its report time (``last_report``,
    a number): ``(part, digest, time)``, kept on its reader's entry (``entry``: None, or one of another snapshot,
    keeps nothing) for as long as the snapshot is unchanged, so an unchanged node's part is neither made nor hashed
    again."""
    if entry is None or entry.snapshot is not snapshot:
        entry = NodeEntry(None, snapshot)
    if fields is None:
        entry.json = entry.json or digested(node_json(node, snapshot, None), snapshot)
        return entry.json
    if fields == "all":
        entry.full = entry.full or digested(node_json(node, snapshot, "all"), snapshot)
        return entry.full
    if entry.projection is None or entry.projection[0] != fields:
        entry.projection = (fields, digested(node_json(node, snapshot, fields), snapshot))
    return entry.projection[1]


def digested(part, snapshot):
    return part, hashlib.blake2b(part, digest_size=12).digest(), last_report(snapshot)


class StatusReader:
    """The API's read side: a fail-fast Redis client on the status hash, its decode cache, and the response cache."""

    def __init__(self, config):
        self.prefix = key_prefix(config["MONITOR_KEY_PREFIX"], config["REDIS_URL"])  # {prefix} under a cluster URL
        self.key = status_key(self.prefix)
        self.retention = config["MONITOR_RETENTION"]
        self.cache = Cache(config["MONITOR_API_CACHE"])
        self.url = config["REDIS_URL"]
        self.redis = connect(self.url, REDIS_TIMEOUT)
        # List views, spider views and housekeeping read the slim hash (no insight's big fields); ?fields=all
        # and Prometheus the status hash (and so does one node's snapshot: NodeReader.node).
        self.node_reader = NodeReader(self.redis, self.prefix, self.retention, config["MONITOR_LOST_AFTER"],
                                      config["MONITOR_RUNS_KEEP"], slim=True, feed=ChangeFeed(self.url, self.prefix))
        self.full_reader = NodeReader(self.redis, self.prefix, runs_keep=config["MONITOR_RUNS_KEEP"])
        self.memos = {False: {}, True: {}}  # combined spider figures per reader (spiders_view's memo)
        self.finished_after = config["MONITOR_FINISHED_AFTER"]
        self.watch = RedisWatch(self.redis, self.prefix, ha_kind(self.url) == "cluster")
        self.outage = Outage(logger)
        self.reported = {}  # wrong-type problem -> when it was last logged

    def redis_health(self):
        """``monitor_redis.RedisWatch.read``'s payload, read at most once per cache period (INFO once a second):
        callers arriving while it is read wait for that reading rather than read again."""
        fresh = self.cache.fresh("redis health")
        if fresh is not None:
            return fresh
        with self.watch.lock:
            return self.cache.get("redis health", lambda: self.watch.read(*self.nodes()[::2]))

    def nodes(self, full=False):
        """``({node: snapshot with state}, skipped, now)`` straight from Redis, ``now`` on its clock; see
        ``NodeReader`` (snapshots are shared between reads: never modify one). Without insight's big fields
        unless ``full``."""
        return (self.full_reader if full else self.node_reader).read()

    def views(self, nodes, now, full=False):
        """``spiders_view`` with queue forecasts of a read pass (``nodes(full)``): a spider none of whose
        snapshots changed since the last pass keeps its combined figures, so the routes combine once."""
        return spiders_view(nodes, self.redis, self.prefix, now, self.finished_after, memo=self.memos[full])

    def nodes_json(self, nodes, now, fields=None, head=b"{", tail=b"}"):
        """``(head + {node: snapshot + age} as JSON bytes, in node order + tail, a digest of the same without
        ages)``, reusing each unchanged snapshot's JSON and digest (``opened``): projected by ``fields``
        (``monitor_fields.parse_fields``: None leaves out insight's big fields, "all" sends every field, a tuple
        only those, ``age`` only if it is one). The body is joined once (at 10,000 nodes, megabytes)."""
        entries = (self.full_reader if fields == "all" or _big(fields) else self.node_reader).entries
        names = sorted(nodes)
        snaps = [nodes[node] for node in names]
        kept = list(map(entries.get, names))
        if fields is None and None not in kept:  # the list view's parts the entries keep, taken at C speed
            opens = list(map(operator.attrgetter("json"), kept))
            fresh = map(operator.is_, map(operator.attrgetter("snapshot"), kept), snaps)
            for i in itertools.compress(range(len(names)), map(operator.not_, map(
                    operator.and_, fresh, map(operator.is_not, opens, itertools.repeat(None))))):
                opens[i] = opened(names[i], snaps[i], kept[i], None)  # a new snapshot, or a part never made
        else:
            opens = list(map(opened, names, snaps, kept, itertools.repeat(fields)))
        parts = list(map(operator.itemgetter(0), opens))
        if isinstance(fields, tuple) and "age" not in fields:
            return head + b",".join(map(closed, parts, itertools.repeat(None))) + tail, None
        tag = hashlib.blake2b(b"".join(map(operator.itemgetter(1), opens)), digest_size=12).digest()
        aged = ages(map(operator.itemgetter(2), opens), now)  # from each report time kept beside its part
        if isinstance(fields, tuple) and any(map(operator.methodcaller("endswith", b"{"), parts)):
            return head + b",".join(map(closed, parts, aged)) + tail, tag  # an empty object: no comma before the age
        ends = list(map(b',"age":%d},'.__mod__, aged))
        if ends:
            ends[-1] = ends[-1][:-1]  # no comma after the last node
        return b"".join([head, *itertools.chain.from_iterable(zip(parts, ends)), tail]), tag

    def node(self, name):
        """``(snapshot with state and age, or None; malformed; now)`` for one node id."""
        snapshot, malformed, now = self.full_reader.node(name)
        if snapshot is not None:
            snapshot["age"] = age(snapshot, now)
        return snapshot, malformed, now

    def spider_names(self):
        """The spiders that have nodes, up to a cache period old: unknown names cost no full read each."""
        return self.cache.get("spider names", lambda: {s["spider"] for s in self.nodes()[0].values()})

    def answered(self):
        """Redis answered a request: log the end of an outage, if one was going on."""
        self.outage.ok("Redis at %s answers again", redact(str(self.url)))

    def wrong_type(self, names=()):
        """What is wrong when Redis answers WRONGTYPE: the status hash, or the history lists of ``names``,
        holding another type (``wrong_type``); None if they all fit."""
        expected = [(self.key, "hash")]
        for name in names:
            expected += [(history_key(self.prefix, name), "list"),
                         (trend_key(self.prefix, name), "list")]
        return wrong_type(self.redis, expected)

    def report(self, problem):
        """Log a data problem at ERROR, each one at most once per REPORT_EVERY seconds."""
        now = time.monotonic()
        if now - self.reported.get(problem, -REPORT_EVERY) >= REPORT_EVERY:
            if len(self.reported) >= CACHE_ENTRIES:
                self.reported.clear()
            self.reported[problem] = now
            logger.error("%s", problem)


@bp.before_app_request
def apply_gate():
    refusal = gate().authorize(request.environ)
    if refusal is not None:
        if refusal.status != 429:  # a throttled address is logged once, when its minute starts
            log_acting(refusal)  # reads too: a refused read is a guess worth seeing
        return refusal.response()
    return None


@bp.after_app_request
def add_cors_headers(response):
    response.headers.extend(gate().headers(request.environ))
    if "Origin" not in response.headers.get("Vary", ""):  # cached bodies carry it already
        response.vary.add("Origin")
    return response


def cached(compute):
    """The response for this URL, computed at most once per cache period (see ``Body.sent``)."""
    body = reader().cache.get(cache_key(request.environ), compute)
    reader().answered()
    status, headers, app_iter = body.sent(request.environ)
    return Response(app_iter, status, headers, direct_passthrough=True)


# ---------------------------------------------------------------------------- routes

def _big(fields):
    """Whether a ``?fields=`` projection names one of insight's big fields (read from the status hash)."""
    return isinstance(fields, tuple) and not BIG_FIELDS.isdisjoint(fields)


@bp.get("/metrics")
def metrics():
    """Every node's latest snapshot with its state: ``{node: snapshot}``; ``?spider=``, ``?state=``, ``?fields=``."""
    spider = request.args.get("spider")
    fields = fields_asked(NODE_FIELDS)
    states = request.args.get("state")
    if states is not None:
        states = set(split_list(states))
        if not states <= set(STATES):
            abort(400, f"state must be one or more of {', '.join(STATES)}, comma-separated")

    def compute():
        nodes, skipped, now = reader().nodes(fields == "all" or _big(fields))
        chosen = {n: s for n, s in nodes.items()
                  if (spider is None or s["spider"] == spider) and (states is None or s["state"] in states)}
        data, tag = reader().nodes_json(chosen, now, fields)
        return json_body(data, skipped, tag and tag + b"%d" % skipped, now if tag else None)

    return cached(compute)


@bp.get("/metrics/<node:name>")
def metric(name):
    """A node id gives its snapshot; a spider name gives the spider's cluster view. ``?fields=`` projects
    the node's snapshot, or the view's nodes."""
    fields = fields_asked(NODE_FIELDS)

    def compute():
        snapshot, malformed, now = reader().node(name)
        if snapshot is not None:
            if isinstance(fields, tuple):
                snapshot = projected(snapshot, fields) | ({"age": snapshot["age"]} if "age" in fields else {})
            if "age" not in snapshot:
                return json_body(snapshot)
            return json_body(snapshot, tag=to_json({**snapshot, "age": None}), now=now)
        if reader().cache.ttl <= 0 or name in reader().spider_names():  # uncached: one read, not two
            full = fields == "all" or _big(fields)
            nodes, skipped, now = reader().nodes(full)
            view = reader().views(nodes, now, full).get(name)
            if view is not None:  # the view with its nodes' JSON spliced in: {..., "nodes": {...}}
                members = {n: nodes[n] for n in view.pop("nodes")}
                head = to_json(view)[:-1] + b',"nodes":'
                data, tag = reader().nodes_json(members, now, fields, head + b"{", b"}}")
                return json_body(data, skipped, tag and head + tag + b"%d" % skipped, now if tag else None)
        if malformed:
            abort(404, "that node's stored snapshot is malformed")
        abort(404, "no node or spider by that name")

    return cached(compute)


@bp.get("/metrics/<node:name>/history")
def history(name):
    """A node's time series, or its spider's summed over nodes: ``?minutes=`` 1 to 1440, default 60."""
    minutes = query_whole("minutes", 60, MAX_MINUTES)
    return cached(lambda: json_body(read_series(name, minutes)))


@bp.get("/spiders")
def spiders():
    """``{spider: cluster view}``, each view's ``nodes`` being the list of its node ids."""

    fields = fields_asked(VIEW_FIELDS)

    def compute():
        nodes, skipped, now = reader().nodes()
        views = reader().views(nodes, now)
        return json_body({spider: project_view(view, fields) for spider, view in views.items()}, skipped)

    return cached(compute)


@bp.get("/spiders/<node:name>/history")
def spider_history(name):
    """A spider's history: ``?days=7`` (10-minute points) or ``?days=90`` (hourly), from the write-time rollups;
    else ``?minutes=`` as /metrics/<spider>/history (the last 24 hours, from its nodes' histories)."""
    days = request.args.get("days")
    if days not in (None, "7", "90"):
        abort(400, "days must be 7 or 90 (or absent: ?minutes= covers the last 24 hours)")
    minutes = query_whole("minutes", 60, MAX_MINUTES) if days is None else None

    def compute():
        mon = reader()
        now = redis_now(mon.redis.time())
        if days is None:
            found = read_series(name, minutes)
        else:
            found = read_rollups(mon.redis, mon.prefix, name, int(days), now)
            if not found["points"] and name not in mon.spider_names():
                abort(404, "no spider by that name has history or nodes")
        found["markers"] = read_markers(mon.redis, mon.prefix, name, now - (minutes * 60 if days is None
                                                                             else int(days) * 86400))
        return json_body(found)

    return cached(compute)


def query_whole(name, default, high):
    """The query parameter ``name`` as a whole number from 1 to ``high`` (``default`` when absent); 400 naming
    the parameter otherwise."""
    raw = request.args.get(name)
    try:
        return default if raw is None else whole(name, raw, 1, high)
    except ConfigError as exc:
        abort(400, str(exc))


def fields_asked(known):
    """``?fields=``: absent (a list view leaves out insight's big fields: per-domain figures, field coverage,
    error samples, latency buckets, most of a snapshot's size), ``all``, or the names of the only fields to
    send (``monitor_fields.parse_fields``); 400 naming unknown ones."""
    try:
        return parse_fields(request.args.get("fields"), known)
    except ValueError as exc:
        abort(400, str(exc))


@bp.get("/health")
def health():
    """200 when Redis answers, 503 (through the Redis error handler) when it does not. Never cached."""
    count = reader().redis.hlen(reader().key)
    reader().answered()
    return {"status": "ok", "redis": "ok", "nodes": count}


@bp.get("/prometheus")
def prometheus():
    """Prometheus text format, one collector built per scrape: ``?detail=spider`` (the default, see
    MONITOR_PROMETHEUS_DETAIL) or ``node``; ``?node_label=id`` or ``nopid``."""

    detail = request.args.get("detail", current_app.config["MONITOR_PROMETHEUS_DETAIL"])
    node_label = request.args.get("node_label", current_app.config["MONITOR_PROMETHEUS_NODE_LABEL"])
    if detail not in LEVELS or node_label not in NODE_LABELS:
        abort(400, f"detail must be {' or '.join(LEVELS)}, node_label {' or '.join(NODE_LABELS)}")

    def compute():
        nodes, skipped, now = reader().nodes()  # the slim read the list views share; insight from its own hash
        r, prefix = reader().redis, reader().prefix
        with r.pipeline(transaction=False) as pipe:
            if nodes:  # HMGET of no field is an error
                pipe.hmget(insight_key(prefix), list(nodes))
            pipe.hgetall(run_meta_key(prefix, "totals"))
            pipe.hgetall(dead_totals_key(prefix))
            *insights, totals, dead = pipe.execute()
        extra = []
        with contextlib.suppress(redis.ResponseError):  # INFO renamed away (some managed Redis): no Redis figures
            extra.append(RedisCollector(reader().redis_health()))
        with gc_paused():  # a bulk decode: see gc_paused
            decoded = scrape_input(nodes, now, insights[0] if nodes else [], lambda names: r.hmget(reader().key, names))
            return Body(exposition(decoded, now, totals, dead, detail, node_label == "nopid",
                                   current_app.config["MONITOR_FINISHED_AFTER"], extra, skipped), CONTENT_TYPE_LATEST)

    return cached(compute)


@bp.get("/redis")
def redis_health():
    """Redis's own health: INFO per master, the spiders' scrapy-redis key sizes with growth and forecast, the
    monitor's footprint (see monitor_redis.py)."""
    return cached(lambda: json_body(reader().redis_health()))


@bp.get("/events")
def events():
    """``text/event-stream`` of changes as they are written (see monitor_events.py and docs/live.md): ``nodes``,
    ``states``, ``alerts``, ``control``; ``Last-Event-ID`` (or ``?last=``) replays what a client missed, or
    sends ``reset``. Each open stream holds one server thread, apart from the other routes' (``threads``)."""
    hub = current_app.extensions["events"]
    if not hub.limit:
        abort(404, "/events is off (MONITOR_EVENTS_CLIENTS=0): poll /metrics")
    stream = hub.open(request.headers.get("Last-Event-ID") or request.args.get("last"), request.environ)
    if stream is None:
        response = jsonify(error=f"{hub.limit} event streams are open, the most allowed (MONITOR_EVENTS_CLIENTS): "
                                 "poll /metrics, or try again later")
        response.status_code, response.headers["Retry-After"] = 503, "10"
        return response
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Vary": "Accept-Encoding"}
    if stream.gzipped:
        headers["Content-Encoding"] = "gzip"
    return Response(stream, 200, headers, mimetype="text/event-stream")


@bp.post("/events/ticket")
def events_ticket():
    """A ticket for ``GET /events?ticket=`` (EventSource cannot send the token as a header), good for
    monitor_gate.TICKET_SECONDS, for this request's identity."""
    ticket = gate().tickets.issue(identity(request))
    return {"ticket": ticket, "expires_in": int(TICKET_SECONDS)}, 200, {"Cache-Control": "no-store"}


def threads(app):
    """Waitress worker threads: THREADS for the routes, and one for each event stream that may be open."""
    return THREADS + app.config["MONITOR_EVENTS_CLIENTS"]


def server_options(app):
    """Waitress's options: its threads (``threads``), and room for the streams' connections beside waitress's
    usual CONNECTIONS (past its limit it accepts no new connection, whatever the route), polled with poll(), not
    select(), which fails past 1,024 descriptors."""
    return {"threads": threads(app), "connection_limit": CONNECTIONS + app.config["MONITOR_EVENTS_CLIENTS"],
            "asyncore_use_poll": True}


@bp.get("/")
def dashboard():
    path = current_app.config["DASHBOARD_PATH"]
    if not os.path.isfile(path):
        abort(404, "dashboard.html is not installed next to monitor_api.py")
    return send_file(path, mimetype="text/html", max_age=0)


@bp.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["openapi"])


# ---------------------------------------------------------------------------- alerts and silences

@bp.get("/alerts")
def alerts():
    """``{"alerts": [...], "alerter": heartbeat or null, "silences": n, "now"}``: the alerter's pending and
    firing alerts, newest first (``read_alerts``)."""
    return cached(lambda: json_body(read_alerts(reader().redis, reader().prefix)))


@bp.get("/silences")
@needs(OPERATOR)
def silences():
    """``{"silences": [{id, matchers, until, comment, who, created}]}``, oldest first (operators and admins:
    comments and who sent them are not metrics)."""
    found = read_silences(reader().redis, reader().prefix)
    reader().answered()
    return {"silences": [{"id": sid, **silence} for sid, silence in found.items()]}


@bp.get("/whoami")
def whoami():
    """``{"name", "role", "readonly"}``: who this request is (``anonymous`` with the rights a tokenless request
    gets) and whether the API is read-only, so a page can hide what its role cannot do."""
    who = identity(request)
    role = who.role
    if role != "none" and gate().may(request, OPERATOR) is not None:
        role = "viewer"  # e.g. a cross-site page: it may read metrics only
    return {"name": who.name, "role": role, "readonly": gate().readonly, "why": who.why}


@bp.get("/audit")
@needs(OPERATOR)
def audit():
    """``{"entries": [...], "next"}``: every change, newest first (``read_audit``): ``?limit=`` (1-1000, default
    50), ``before`` (an id: the previous page's ``next``), ``who``, ``action``, ``request``. Admins see every
    entry; operators their own."""
    who, args = identity(request), request.args
    limit, before = query_whole("limit", AUDIT_LIMIT, 1000), query_whole("before", None, 10 ** 18)
    by = args.get("who")
    if who.role != ADMIN:
        if by not in (None, who.name):
            abort(403, f"{who.name} is an operator: it sees only its own audit entries (?who={who.name})")
        by = who.name
    found = read_audit(reader().redis, reader().prefix, limit, before, by, args.get("action") or None,
                       args.get("request") or None)
    reader().answered()
    return found


# The audit log answers this many entries unless ?limit= says otherwise.
AUDIT_LIMIT = 50


# The control log answers this many entries unless ?limit= says otherwise (at most CONTROL_LOG_KEEP).
CONTROL_LOG_LIMIT = 50


@bp.get("/control/log")
@needs(OPERATOR)
def control_log():
    """The newest control commands first, each with who sent it, when, and every node's acknowledgement."""
    limit = query_whole("limit", CONTROL_LOG_LIMIT, CONTROL_LOG_KEEP)
    log = read_control_log(reader().redis, reader().prefix, limit)
    reader().answered()
    return {"log": log}


@bp.get("/queues/<node:name>/dead")
def dead_letters(name):
    """The spider's dead letters, newest first: ``?limit=`` (1-1000, default 50), ``before`` (a ``next`` cursor),
    ``reason`` (comma-separated); ``{"dead": [...], "next", "total"}``; urls redacted."""
    limit, before = query_whole("limit", DEAD_LIMIT, MAX_DEAD_LIMIT), request.args.get("before")
    if dead_bound(before) is None:
        abort(400, "before must be a dead letter id from 'next'")
    reasons = set(split_list(request.args["reason"])) if request.args.get("reason") else None

    def compute():
        found = read_dead(reader().redis, reader().prefix, name, limit, before, reasons)
        if not found["total"] and name not in reader().spider_names():
            abort(404, "no spider by that name has nodes or dead letters")
        return json_body(found)

    return cached(compute)


# ---------------------------------------------------------------------------- errors

@bp.app_errorhandler(HTTPException)
def http_error(exc):
    response = exc.get_response()  # keeps headers such as Allow
    response.data = json.dumps({"error": exc.description, **getattr(exc, "extra", {})})
    response.content_type = "application/json"
    return response


@bp.app_errorhandler(redis.exceptions.RedisClusterException)
def cluster_error(exc):
    """A Redis Cluster with a slot no master serves (a master lost without a replica): an outage, 503."""
    return redis_error(redis.ConnectionError(str(exc)))


@bp.app_errorhandler(redis.RedisError)
def redis_error(exc):
    """503 while Redis is down or hanging (logged once per outage); a key of the wrong type (a hand edit,
    another program sharing the prefix) is named with its type, and any other refusal by Redis quoted."""
    if isinstance(exc, redis.ResponseError) and "WRONGKEY " in str(exc):  # a write script refused before writing
        problem = str(exc).split("WRONGKEY ", 1)[1].splitlines()[0][:300]
        reader().report(f"{problem}: changes that write it fail, and write nothing, until it is deleted or fixed")
        return jsonify(error=f"{problem}: nothing was written"), 500
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
    reader().outage.failed("Redis at %s is unavailable: %s", redact(str(reader().url)),
                           scrub(exc, reader().url))
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
    long = minutes * 60 > HISTORY_SECONDS
    intervals = {n: s.get("interval", DEFAULT_INTERVAL) for n, s in members.items()}  # gated: (0, 1 day]
    # One point per step: no more than MAX_POINTS, and no finer than the nodes report.
    step = math.ceil(max(minutes * 60 / MAX_POINTS, TREND_BUCKET if long else max(intervals.values())))
    series = read_histories(mon.redis, list(members), minutes, mon.prefix, now)
    if kind == "node":
        points = list({int(row["timestamp"] // step): row for row in series[name]}.values())
    else:
        holds = {n: STALE_INTERVALS * intervals[n] for n in members}
        hosts = {n: s.get("host", n) for n, s in members.items()}
        before = {n: members[n] for n in members if not series[n]}
        points = spider_points(series, holds, hosts, step, int(now // step), before)
    return {"name": name, "kind": kind, "minutes": minutes, "step": step, "points": points[-MAX_POINTS:]}


# ---------------------------------------------------------------------------- run history

MAX_RUNS = 500
DEFAULT_RUNS = 50
MAX_CSV_RUNS = 1_000_000


def wants_csv():
    """``?format=csv`` (True) or ``json``/absent (False); 400 for anything else."""
    kind = request.args.get("format", "json")
    if kind not in ("json", "csv"):
        abort(400, "format must be json or csv")
    return kind == "csv"


def csv_response(chunks, name):
    """A streamed ``text/csv`` download named ``name``.csv: ``chunks`` are produced as the client reads."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]  # a spider's name may hold anything: not in a header
    headers = {"Content-Disposition": f'attachment; filename="{name}.csv"', "Cache-Control": "no-store"}
    return Response(stream_with_context(chunks), 200, headers, mimetype="text/csv")


@bp.get("/runs")
def runs():
    """Runs, newest first: ``?spider=`` (default: every spider's), ``limit`` (1-500, default 50), ``before`` (a
    ``next`` cursor or unix seconds), ``reason`` (finish reasons, comma-separated). ``format=csv`` streams
    the same rows as CSV (``limit`` then defaults to every run, up to 1,000,000)."""
    args = request.args
    as_csv = wants_csv()
    spider, before = args.get("spider"), args.get("before")
    limit = query_whole("limit", MAX_CSV_RUNS, MAX_CSV_RUNS) if as_csv else query_whole("limit", DEFAULT_RUNS, MAX_RUNS)
    if run_bound(before) is None:
        abort(400, "before must be a cursor from 'next' or unix seconds")
    reasons = set(split_list(args["reason"])) if args.get("reason") else None
    if as_csv:
        rows = runs_rows(reader().redis, reader().prefix, spider or None, limit, before, reasons)
        return csv_response(csv_text(RUN_COLUMNS, rows), f"runs-{spider}" if spider else "runs")

    def compute():
        found, cursor = read_runs(reader().redis, reader().prefix, spider or None, limit, before, reasons)
        return json_body({"runs": found, "next": cursor})

    return cached(compute)


def runs_wrong_type():
    """For a runs route answered WRONGTYPE: which run history key has another type (or None)."""
    if request.endpoint not in ("api.runs", "api.runs_summary"):
        return None
    prefix = reader().prefix
    expected = [(run_meta_key(prefix, "totals"), "hash")]
    spider = request.view_args.get("name") or request.args.get("spider")
    if spider:
        expected.append((runs_key(prefix, spider), "zset"))
    return wrong_type(reader().redis, expected)


@bp.get("/runs/<node:name>/summary")
def runs_summary(name):
    """Run count, the baseline, finish reasons and per-day totals for the last 30 days of one spider;
    ``format=csv``: the per-day totals as CSV."""
    as_csv = wants_csv()

    def compute():
        now = redis_now(reader().redis.time())
        summary = read_runs_summary(reader().redis, reader().prefix, name, now)
        if not summary["runs"] and not summary["totals"] and name not in reader().spider_names():
            abort(404, "no spider by that name has runs or nodes")
        return summary

    if as_csv:
        return csv_response(csv_text(DAY_COLUMNS, days_rows(compute())), f"summary-{name}")
    return cached(lambda: json_body(compute()))


# ---------------------------------------------------------------------------- command line

def steady_memory():
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (``mallopt(M_MMAP_THRESHOLD)``); elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD in glibc's malloc.h


def main(argv=None):
    prog = "monitor_api.py"
    parser = Parser(prog=prog, description=__doc__.splitlines()[0], epilog=described(API),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to listen on (default: $MONITOR_API_HOST or 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on (default: $MONITOR_API_PORT or 5000)")
    try:
        args = parser.parse_args(argv)
        host = value("MONITOR_API_HOST", args.host)
        number = port("--port", args.port) if args.port else value("MONITOR_API_PORT")
        app = create_app({"MONITOR_API_HOST": host})
        steady_memory()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" on every busy second
        log_start(app)
        try:
            server = waitress.create_server(app, host=host, port=number, **server_options(app),
                                            ident="scrapy-cluster-monitor", max_request_body_size=WAITRESS_BODY,
                                            outbuf_overflow=WAITRESS_OUTBUF)
        except (OSError, ValueError, UnicodeError) as exc:
            raise ConfigError(f"cannot listen on {host}:{number}: {getattr(exc, 'strerror', None) or exc}") from None
    except ConfigError as exc:
        return exit_config_error(prog, exc)
    server.print_listen("Serving on http://{}:{}")
    server.run()
    return 0


def log_start(app):
    reader, gate = app.extensions["reader"], app.extensions["gate"]
    logger.info("Reading %s (prefix %r); %s%s", redact(str(reader.url)), reader.prefix,
                f"{gate.tokens.count()} token(s) accepted" if gate.token else "no token required",
                "; read-only" if gate.readonly else "")
    for line in unknown_settings():
        logger.warning(line)
    try:
        reader.redis.ping()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # it serves anyway (503s) and recovers
        logger.warning("Redis at %s does not answer yet (%s): routes answer 503 until it does",
                       redact(str(reader.url)), scrub(exc, reader.url))
    if not gate.token and not gate.loopback:
        logger.warning("Listening on %s without MONITOR_API_TOKEN: anyone who can reach it can read the metrics; "
                       "requests must name this address, localhost or a name in MONITOR_API_HOSTS as their Host, "
                       "and changes (control, silences) are refused", gate.listening)

if __name__ == "__main__":
    sys.exit(main())
