"""Alerts for a Scrapy cluster: rules over every node's snapshot, sent by mail and webhook, at least once.

``python alert.py`` evaluates the rules every ALERT_INTERVAL seconds (``--once`` for cron, ``--dry-run``
to print instead of send, ``--test-mail``, ``--help`` for every setting). Each rule and node is an alert
that goes inactive -> pending (condition true for less than ALERT_FOR) -> firing -> resolved, as in
Prometheus; a firing alert is sent at once and again every ALERT_REPEAT, its end is sent too, and all that
fires or resolves in one evaluation goes out as one message. State and undelivered messages live in Redis
under ``<prefix>:alert:``, so restarts, cron runs and several alert.py processes send each message once,
unless one dies between a send and its record (then it is sent again). A message refused for good, or
failing for longer than ALERT_GIVE_UP, moves to the dead letters. With no channel set, notifications are
printed on the console.

Alerts in the open: each record carries what ``GET /alerts`` shows, a heartbeat says an alerter runs,
silences (``--silence``, ``POST /silences``) hold back what matching alerts send, ALERT_ALERTMANAGER_URL
feeds Alertmanager, ALERT_WEBHOOK_FORMAT=alertmanager shapes the webhook's body as Alertmanager's, and
ALERT_NOTIFY_URLS adds Apprise channels (Telegram, Discord, Teams, DingTalk, Feishu, WeCom...).
"""

import argparse
import fnmatch
import hashlib
import html
import json
import logging
import math
import os
import signal
import smtplib
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Callable, NamedTuple, Optional
from urllib.parse import urlsplit

import redis

import insight
import monitors

logger = logging.getLogger(__name__)

SECURITY = ("none", "starttls", "ssl")
# One SMTP or HTTP operation (connect, a command, a read) gives up after this many seconds...
SEND_TIMEOUT = 10
# ...and a whole send after this many: well inside the lock it runs under, so its holder records the outcome.
SEND_DEADLINE = 40
# The evaluation lock outlives a crashed holder by this long; the holder renews it before every send.
LOCK_TTL_MS = 60_000
# A failed delivery is retried 1, 2, 4, 8... evaluations later, but at least every BACKOFF_MAX seconds;
# the doubling stops after BACKOFF_STEPS, so no stored attempt count can overflow it.
BACKOFF_MAX = 900
BACKOFF_STEPS = 16
# Dead letters kept in <prefix>:alert:dead, newest first: enough to read back a day of a broken channel.
DEAD_MAX = 1000
# A dead letter keeps this much of a malformed record's text.
DEAD_TEXT = 10_000
# A stored time or count beyond this is not one: the record holding it is malformed.
BOUND = 1e18
# Mail and the webhook's text list this many alerts at most (the webhook's `alerts` field has them all).
MAX_LINES = 100
# The subject names this many alerts of each kind, then says how many more.
SUBJECT_NAMES = 5
MIB = 1024 * 1024

RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
             "end return 0")
# Only while the lock is ours: set or delete ('' value) fields of one hash and keep dead letters in the
# capped list, counted. KEYS: lock, hash, dead list, dead counter. ARGV: token, cap, n, n field/value pairs,
# then the dead letters. Returns -1 when the lock is not ours, else the dead letters counted so far.
SETTLE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[2], ARGV[i])
  else redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
local total = tonumber(redis.call('GET', KEYS[4])) or 0
if #ARGV > 3 + 2 * n then
  for i = 4 + 2 * n, #ARGV do redis.call('LPUSH', KEYS[3], ARGV[i]) end
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
  total = total + #ARGV - 3 - 2 * n
  redis.call('SET', KEYS[4], total)
end
return total
"""


# ---------------------------------------------------------------------------- rules

def over(rule, snapshot, limit, stuck_since, now):
    """``snapshot[rule.field] / rule.scale`` while it is over the threshold."""
    value = monitors.number(snapshot.get(rule.field))
    if limit and value is not None and value / rule.scale > limit:
        return round(value / rule.scale, 1)
    return None


def down_for(rule, snapshot, limit, stuck_since, now):
    """Seconds since a stale node's last report."""
    if snapshot.get("state") == "stale":
        return monitors.age(snapshot, now)
    return None


def stalled_for(rule, snapshot, limit, stuck_since, now):
    """Seconds the node's pages have stood still with work queued, once that is the threshold."""
    if limit and stuck_since is not None and now - stuck_since >= limit:
        return round(now - stuck_since)
    return None


def limit_text(rule, snapshot, limit):
    return f" (limit {_fmt(limit)}{rule.unit})"


def reports_every(rule, snapshot, limit):
    return f" (reports every {_fmt(monitors.number(snapshot.get('interval')) or 0)} s)"


def limit_and_queue(rule, snapshot, limit):
    return f"{limit_text(rule, snapshot, limit)}, {_fmt(queued(snapshot))} requests queued"


# ---------------------------------------------------------------------------- rules: crawl insight

# Item field coverage is judged once a node has scraped this many items (fewer say little).
COVERAGE_MIN_ITEMS = 100


def low_coverage(rule, snapshot, limit, stuck_since, now):
    """The lowest coverage (%) among the fields the node was told to watch (MONITOR_ITEM_FIELDS: fields
    found on the first items may be optional), once it has scraped COVERAGE_MIN_ITEMS, while below the limit."""
    fields = snapshot.get("fields") if snapshot.get("fields_listed") is True else None
    if not (limit and fields and (monitors.number(snapshot.get("items")) or 0) >= COVERAGE_MIN_ITEMS):
        return None
    lowest = min(fields.values()) * 100
    return round(lowest, 1) if lowest < limit else None


def lowest_field(rule, snapshot, limit):
    fields = snapshot.get("fields") or {}
    name = min(fields, key=fields.get) if fields else "?"
    return f" for field {name!r} over {_fmt(snapshot.get('items'))} items{limit_text(rule, snapshot, limit)}"


def queue_growing(rule, view, limit, stuck_since, now):
    """A spider's queue growth (requests/min) while it has live nodes; how long it must last is the limit."""
    rate = monitors.number(view.get("queue_rate"))
    if limit and view.get("nodes_live") and rate is not None and rate > 0:
        return rate
    return None


def queue_detail(rule, view, limit):
    return f" for {_duration(limit)} or more, {_fmt(view.get('queue_requests'))} requests queued"


def limit_and_sample(rule, snapshot, limit):
    """The limit, and the node's newest error sample: what the errors are."""
    sample = insight.newest_error(snapshot)
    return limit_text(rule, snapshot, limit) + (f"; newest: {sample}" if sample else "")


def spider_views(r, nodes, prefix, now, cfg):
    """``{spider: cluster view with queue forecast}`` for the spider-level rules; empty when none is on
    (then their alerts resolve)."""
    if not any(rule.scope == "spider" for rule in active_rules(cfg)):
        return {}
    return monitors.spiders_view(nodes, r, prefix, now)


class Rule(NamedTuple):
    """One alert rule: adding a rule is adding a row to RULES."""
    name: str  # as ALERT_RULES and the messages name it
    alertname: str  # Prometheus-style
    severity: str  # critical or warning
    label: str  # what its figure is, in messages
    unit: str
    field: Optional[str] = None  # the snapshot field compared with the threshold...
    scale: float = 1  # ...after dividing it by this
    setting: Optional[str] = None  # the environment variable holding the threshold (0 turns the rule off)
    default: float = 0
    help: str = ""  # what the setting means, for --help
    kind: str = "number"  # how the setting is read: number or seconds
    check: Callable = over  # (rule, snapshot, limit, stuck_since, now) -> its figure while it holds, or None
    detail: Callable = limit_text  # (rule, snapshot, limit) -> what a firing message adds to the figure
    back: str = "back to normal"  # what a resolved message says
    needs_live: bool = True  # judged on reporting nodes only: silenced while down, over once closed
    scope: str = "node"  # or "spider": judged on the spider's cluster view, its alert keyed rule:<spider>
    hold: bool = False  # the threshold is how long the condition must hold (instead of ALERT_FOR)

    @property
    def attr(self):
        """The setting's attribute on the configuration: ALERT_CPU_PERCENT -> cpu_percent."""
        return self.setting[len("ALERT_"):].lower() if self.setting else None


RULES = (
    Rule("down", "ScrapyNodeDown", "critical", "no report for", " s", check=down_for, detail=reports_every,
         back="reporting again", needs_live=False),
    Rule("cpu", "ScrapyHostCpuHigh", "warning", "host CPU", "%", field="cpu",
         setting="ALERT_CPU_PERCENT", default=80, help="host CPU %% over this"),
    Rule("memory", "ScrapyHostMemoryHigh", "warning", "host memory", "%", field="memory",
         setting="ALERT_MEMORY_PERCENT", default=90, help="host memory %% over this"),
    Rule("stalled", "ScrapyCrawlStalled", "warning", "pages not rising for", " s", check=stalled_for,
         detail=limit_and_queue, setting="ALERT_STALL_SECONDS", default=300, kind="seconds",
         help="pages not rising this long while the queue is not empty"),
    Rule("errors", "ScrapyErrorsHigh", "warning", "errors", "/min", field="errors_per_min", detail=limit_and_sample,
         setting="ALERT_ERRORS_PER_MIN", default=30, help="error log lines per minute over this"),
    Rule("rss", "ScrapyProcessRssHigh", "warning", "process RSS", " MiB", field="rss", scale=MIB,
         setting="ALERT_RSS_MB", default=2048, help="process memory (MiB) over this"),
    # Judged on run records, not snapshots: see ``run_alerts`` (one message per bad run, never resolved).
    Rule("run", "ScrapyRunFailed", "warning", "run", "", check=lambda *_: None, needs_live=False),
    Rule("coverage", "ScrapyItemFieldCoverageLow", "warning", "item field coverage", "%", check=low_coverage,
         detail=lowest_field, setting="ALERT_COVERAGE_MIN", default=90,
         help=f"a MONITOR_ITEM_FIELDS field in less than this %% of items, once {COVERAGE_MIN_ITEMS} are scraped"),
    Rule("latency", "ScrapyDownloadLatencyHigh", "warning", "download latency p95", " s", field="latency_p95",
         setting="ALERT_LATENCY_P95", default=10, help="download latency p95 (seconds) over this"),
    Rule("queue", "ScrapyQueueGrowing", "warning", "queue growing by", "/min", check=queue_growing,
         detail=queue_detail, setting="ALERT_QUEUE_GROWING", default=1800, kind="seconds", needs_live=False,
         help="the spider's queue growing this long while it has live nodes", back="queue no longer growing",
         scope="spider", hold=True),
)
RULE = {rule.name: rule for rule in RULES}
ORDER = {rule.name: i for i, rule in enumerate(RULES)}


def threshold(rule, cfg):
    return getattr(cfg, rule.attr) if rule.setting else None


def active_rules(cfg):
    """The rules to evaluate: those in ALERT_RULES whose threshold is not 0."""
    return [RULE[name] for name in cfg.rules if is_active(RULE[name], cfg)]


def is_active(rule, cfg):
    return rule.name in cfg.rules and (not rule.setting or bool(threshold(rule, cfg)))


def firing_summary(rule, value, snapshot, limit):
    """``host CPU 95% (limit 80%)``."""
    return f"{rule.label} {_fmt(value)}{rule.unit}{rule.detail(rule, snapshot, limit)}"


def resolved_summary(rule, snapshot, cfg):
    """Why an alert ended: ``back to normal: host CPU 12%``, ``node closed``..."""
    if not snapshot:
        return "node gone from the status hash"
    if snapshot.get("state") == "closed":
        return "node closed"
    if not is_active(rule, cfg):
        return "rule turned off"
    figure = monitors.number(snapshot.get(rule.field)) if rule.field else None
    if figure is None:
        return rule.back
    return f"{rule.back}: {rule.label} {_fmt(figure / rule.scale)}{rule.unit}"


def queued(snapshot):
    """Requests plus start URLs waiting in the node's scrapy-redis queue; None when it has no such queue."""
    sizes = [monitors.number(snapshot.get(f)) for f in ("queue_requests", "queue_start_urls")]
    sizes = [s for s in sizes if s is not None]
    return sum(sizes) if sizes else None


# ---------------------------------------------------------------------------- settings

# Finish reasons of a run that ended well, unless ALERT_OK_REASONS says otherwise.
OK_REASONS = ("finished", "shutdown", "stopped", "drained")

# (environment variable, flag, attribute, default, kind, help). ``--help`` is built from this table; each
# rule's threshold comes from its row in RULES.
SETTINGS = (
    ("REDIS_URL", "--redis-url", "redis_url", monitors.DEFAULT_REDIS_URL, str, "Redis the nodes report to"),
    ("MONITOR_KEY_PREFIX", "--prefix", "prefix", monitors.DEFAULT_PREFIX, str, "key prefix of the cluster"),
    ("ALERT_RULES", "--rules", "rules", ",".join(RULE), "rules", "comma-separated rules to evaluate"),
) + tuple(
    (rule.setting, "--" + rule.attr.replace("_", "-"), rule.attr, rule.default, rule.kind,
     f"{rule.name}: {rule.help}; 0 = off") for rule in RULES if rule.setting
) + (
    ("ALERT_OK_REASONS", "--ok-reasons", "ok_reasons", ",".join(OK_REASONS), "list",
     "run: finish reasons of a good run, comma-separated; shell patterns allowed (closespider_*)"),
    ("ALERT_RUN_ITEMS_RATIO", "--run-items-ratio", "run_items_ratio", 0.5, "number",
     "run: a run with items below this ratio of its baseline is bad; 0 = never"),
    ("MONITOR_LOST_AFTER", "--lost-after", "lost_after", monitors.DEFAULT_LOST_AFTER, "seconds",
     "seconds a node is silent without closing before its run is recorded lost; 0 = never"),
    ("MONITOR_RUNS_KEEP", "--runs-keep", "runs_keep", monitors.DEFAULT_RUNS_KEEP, int, "run records kept per spider"),
    ("ALERT_INTERVAL", "--interval", "interval", 60, "seconds>0", "seconds between evaluations"),
    ("ALERT_FOR", "--for", "for_seconds", 120, "seconds", "seconds a condition must hold before it fires"),
    ("ALERT_REPEAT", "--repeat", "repeat", 14400, "seconds", "seconds before a still-firing alert is sent again"),
    ("ALERT_GIVE_UP", "--give-up", "give_up", 86400, "seconds>0",
     "seconds a failing message is retried before it becomes a dead letter"),
    ("ALERT_TO", "--to", "to", None, "list", "comma-separated mail recipients; setting it turns mail on"),
    ("ALERT_FROM", "--from", "from_addr", None, str,
     "sender (default: SMTP_USER if it is an address, else alerts@<hostname>)"),
    ("ALERT_WEBHOOK_URL", "--webhook-url", "webhook_url", None, str,
     "POST each message as JSON here (Slack-compatible)"),
    ("SMTP_HOST", "--smtp-host", "smtp_host", "localhost", str, "mail server"),
    ("SMTP_PORT", "--smtp-port", "smtp_port", None, int, "mail server port (default 25, 465 with ssl)"),
    ("SMTP_SECURITY", "--smtp-security", "smtp_security", "none", "security", "none, starttls or ssl"),
    ("SMTP_USER", "--smtp-user", "smtp_user", None, str, "log in as this user (no login when unset)"),
    ("SMTP_PASSWORD", None, "smtp_password", None, str, "password for SMTP_USER (environment only)"),
)
# Alerts in the open: Alertmanager, the webhook's body, Apprise (ALERT_NOTIFY_URLS: environment only, its
# URLs carry tokens).
SETTINGS += (
    ("ALERT_ALERTMANAGER_URL", "--alertmanager-url", "alertmanager_url", None, str,
     "Alertmanager's base URL: the active alerts are posted to its /api/v2/alerts each evaluation"),
    ("ALERT_WEBHOOK_FORMAT", "--webhook-format", "webhook_format", "slack", "format",
     "the webhook's body: slack (Slack-compatible) or alertmanager (Alertmanager's webhook body)"),
    ("ALERT_NOTIFY_URLS", None, "notify_urls", None, "list",
     "comma-separated Apprise URLs (tgram://, discord://, ...), one channel each (environment only)"),
)
SMTP_VARS = ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USER", "SMTP_PASSWORD")


def build_parser():
    parser = monitors.Parser(
        prog="alert.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag defaults to its environment variable (shown in brackets), then to the default.\n"
               "SMTP_PASSWORD and ALERT_NOTIFY_URLS (comma-separated Apprise URLs, e.g. tgram://..., each a\n"
               "channel) are read from the environment only. With no ALERT_TO, ALERT_WEBHOOK_URL or ALERT_NOTIFY_URLS,\n"
               "notifications are printed here. Redis keys: <prefix>:alert:state, :stall, :outbox, :lock,\n"
               ":dead (dead letters), :dead_total, :silences, :heartbeat.",
    )
    parser.add_argument("--once", action="store_true", help="evaluate once and exit (for cron)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be sent; send nothing, store nothing")
    parser.add_argument("--test-mail", action="store_true", help="send one test message and exit")
    add_silence_flags(parser)
    for name, flag, attr, default, kind, text in SETTINGS:
        if flag:
            shown = f"{name}, default {default}" if default is not None else name
            parser.add_argument(flag, dest=attr, metavar=name, help=f"{text} [{shown}]")
    return parser


def load_config(argv=None):
    """Flags over environment over defaults, checked: returns the parsed arguments or raises ConfigError."""
    args = build_parser().parse_args(argv)
    given = set()
    args.silence_for, args.for_seconds = (args.for_seconds, None) if args.silence else (None, args.for_seconds)
    for name, flag, attr, default, kind, _ in SETTINGS:
        raw = getattr(args, attr, None)
        raw = monitors.env(name) if raw is None or raw == "" else raw
        if raw is not None:
            given.add(name)
        setattr(args, attr, _convert(name, raw, default, kind))
    check_redis_url(args.redis_url)
    check_open_settings(args)
    if args.smtp_port is None:
        args.smtp_port = 465 if args.smtp_security == "ssl" else 25
    if args.runs_keep <= 0:
        raise monitors.ConfigError(f"MONITOR_RUNS_KEEP must be a whole number above 0, not {args.runs_keep}")
    if not 0 < args.smtp_port < 65536:
        raise monitors.ConfigError(f"SMTP_PORT must be a port number, not {args.smtp_port}")
    if args.smtp_password and not args.smtp_user:
        raise monitors.ConfigError("SMTP_PASSWORD is set but SMTP_USER is not")
    if args.webhook_url:
        check_webhook_url(args.webhook_url)
    if not args.to and (given & set(SMTP_VARS) or args.test_mail and not (args.webhook_url or args.notify_urls)):
        raise monitors.ConfigError("ALERT_TO is not set: mail needs at least one recipient")
    if not args.from_addr:
        user = args.smtp_user or ""
        args.from_addr = user if "@" in user else f"alerts@{socket.gethostname()}"
    return args


def _convert(name, raw, default, kind):
    if raw is None:
        if not isinstance(default, str):
            return default
        raw = default  # a default written as text (ALERT_RULES) is parsed like the setting
    raw = str(raw).strip()
    if kind in ("seconds", "seconds>0"):
        return monitors.seconds(name, raw, above=kind == "seconds>0")
    if kind in ("number", int):
        try:
            value = float(raw) if kind == "number" else int(raw)
        except ValueError:
            raise monitors.ConfigError(f"{name} must be a number, not {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise monitors.ConfigError(f"{name} must be a number 0 or more, not {raw!r}")
        return value
    if kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind == "rules":
        rules = [part.strip().lower() for part in raw.split(",") if part.strip()]
        unknown = [rule for rule in rules if rule not in RULE]
        if unknown:
            raise monitors.ConfigError(f"{name}: unknown rule {unknown[0]!r} (rules: {', '.join(RULE)})")
        return rules
    if kind == "security":
        if raw.lower() not in SECURITY:
            raise monitors.ConfigError(f"{name} must be one of {', '.join(SECURITY)}, not {raw!r}")
        return raw.lower()
    return raw


def check_redis_url(url):
    """ConfigError unless redis-py can build a connection from ``url`` (scheme, port, options)."""
    try:
        monitors.connect(url)
    except ValueError as exc:
        raise monitors.ConfigError(f"REDIS_URL: {exc}") from None


def check_webhook_url(url, name="ALERT_WEBHOOK_URL"):
    """ConfigError unless ``url`` is http(s) with a host, a valid port and no blank or control character.
    The message never quotes the URL: its path is often its secret."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        ok = False
    if not ok or any(c.isspace() or not c.isprintable() for c in url):
        raise monitors.ConfigError(
            f"{name} must be an http:// or https:// URL with a host, a valid port and no spaces")


# ---------------------------------------------------------------------------- evaluation

def track_stall(snapshot, previous, now):
    """The stall tracker of one node, ``[pages, since]``: since when its pages stood still with work queued.

    None (nothing to remember) unless the node is live, running, has requests waiting and its own last
    interval saw no new page; so a healthy cluster stores no trackers at all.
    """
    if snapshot.get("state") != "live" or snapshot.get("status") != "running" or not queued(snapshot):
        return None
    if (monitors.number(snapshot.get("pages_per_min")) or 0) > 0:
        return None
    pages = monitors.number(snapshot.get("pages"))
    if previous and previous[0] == pages:
        return previous
    return [pages, now]


# The figure of a rule whose node is down: no news about it until the node reports again.
SILENCED = object()


def step(record, value, now, cfg, hold=None):
    """One alert's transition. ``value``: the rule's figure when its condition holds, None when not,
    ``SILENCED`` while its node is down; ``hold``: seconds pending before firing (default ALERT_FOR).
    Returns ``(new record or None, "firing"/"resolved"/None)``."""
    if value is SILENCED:
        # Its node is down: a pending alert is forgotten, a firing one waits (no repeat, no resolve).
        return (record if record and record["state"] == "firing" else None), None
    if value is None:
        if record and record["state"] == "firing":
            return None, "resolved"
        return None, None
    if not record:
        record = {"state": "pending", "since": now}
    if record["state"] == "pending":
        if now - record["since"] < (cfg.for_seconds if hold is None else hold):
            return record, None
        return {**record, "state": "firing", "fired": now, "sent": now, "value": value}, "firing"
    if now - record["sent"] >= cfg.repeat:
        return {**record, "sent": now, "value": value}, "firing"
    return record, None


def figure(rule, snapshot, limit, stuck_since, now):
    """The rule's figure on one node while its condition holds, else None; SILENCED while the node is down."""
    if rule.needs_live:
        state = snapshot.get("state")
        if state == "stale":
            return SILENCED
        if state == "closed":
            return None
    return rule.check(rule, snapshot, limit, stuck_since, now)


def evaluate(nodes, state, stall, now, cfg, silences=None, spiders=None):
    """One evaluation over ``{node: snapshot with state}``, the stored alerts and stall trackers, and
    ``spiders`` (``spider_views``; None leaves the spider-level alerts as they are).

    Returns ``(state changes, stall changes, notifications)``; a change of None deletes the field.
    ``silences`` (``{id: silence}``, as ``monitors.read_silences`` returns) hold back what matching alerts
    send (see ``in_the_open``).
    Pure: no Redis, no clock, so tests can drive it with any ``now``.
    """
    state_changes, stall_changes, notes = {}, {}, []
    rules = active_rules(cfg)
    limits = {rule.name: threshold(rule, cfg) for rule in rules}
    silences = monitors.SilenceIndex(silences or {})
    spider_rules = [rule for rule in rules if rule.scope == "spider"]
    rules = [rule for rule in rules if rule.scope == "node"]
    track = RULE["stalled"] in rules
    records_of = {}  # {node: {rule: record}}: few nodes have any, so most nodes cost no key lookups
    spider_records = {}  # {"rule:spider": record} of the spider-level rules
    for key, record in state.items():
        rule, _, node = key.partition(":")
        if RULE[rule].scope == "spider":
            spider_records[key] = record
        else:
            records_of.setdefault(node, {})[rule] = record

    def apply(rule, node, snapshot, record, value):
        new, event = step(record, value, now, cfg, limits.get(rule.name) if rule.hold else None)
        new, event = in_the_open(rule, node, snapshot, record, new, event, value, limits.get(rule.name), silences,
                                 now)
        if new != record:
            state_changes[f"{rule.name}:{node}"] = new
        if event:
            notes.append(notification(event, rule, node, snapshot, new or record, now, cfg))

    for node, snapshot in nodes.items():
        tracker = track_stall(snapshot, stall.get(node), now) if track else None
        if tracker != stall.get(node):
            stall_changes[node] = tracker
        records = records_of.pop(node, {})
        for rule in rules:
            value = figure(rule, snapshot, limits[rule.name], tracker[1] if tracker else None, now)
            record = records.pop(rule.name, None)
            if record is not None or value is not None:
                apply(rule, node, snapshot, record, value)
        for name, record in records.items():  # rules turned off since
            apply(RULE[name], node, snapshot, record, None)
    for node, records in records_of.items():  # nodes gone from the status hash
        for name, record in records.items():
            apply(RULE[name], node, None, record, None)
    for node in set(stall) - set(nodes):
        stall_changes[node] = None
    for spider, view in (spiders or {}).items():
        for rule in spider_rules:
            value = rule.check(rule, view, limits[rule.name], None, now)
            record = spider_records.pop(f"{rule.name}:{spider}", None)
            if record is not None or value is not None:
                apply(rule, spider, view, record, value)
    for key, record in spider_records.items() if spiders is not None else ():  # spiders gone, rules off
        name, _, spider = key.partition(":")
        apply(RULE[name], spider, spiders.get(spider), record, None)
    notes.sort(key=lambda a: (a["status"], ORDER[a["rule"]], a["node"]))
    return state_changes, stall_changes, notes


def notification(event, rule, node, snapshot, record, now, cfg):
    """What a message says of one alert (``record``: its firing record): a dict, the webhook's ``alerts``."""
    snapshot = snapshot or {}
    limit = threshold(rule, cfg)
    if event == "firing":
        summary = firing_summary(rule, record["value"], snapshot, limit)
    else:
        summary = f"{resolved_summary(rule, snapshot, cfg)} after {_duration(now - record['fired'])}"
    return {
        "status": event, "rule": rule.name, "alertname": rule.alertname, "severity": rule.severity,
        "node": node, "spider": snapshot.get("spider"), "host": snapshot.get("host"),
        "value": record.get("value"), "threshold": limit, "summary": summary,
        "repeat": event == "firing" and record["sent"] > record["fired"],
        "starts_at": _iso(record["fired"]), "ends_at": _iso(now) if event == "resolved" else None,
    }


def _fmt(number):
    if number is None:
        return "?"
    return str(int(number)) if float(number).is_integer() else f"{number:.1f}"


def _iso(ts):
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, ValueError, OSError):  # a stored time beyond the calendar
        return "?"


def _duration(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------- run alerts

def bad_run(record, cfg):
    """Why a run ended badly (lost, a finish reason not in ALERT_OK_REASONS, items below
    ALERT_RUN_ITEMS_RATIO of its baseline), or None."""
    reason = record.get("finish_reason")
    if reason == "lost":
        return "lost: no report for MONITOR_LOST_AFTER, never closed"
    if not any(fnmatch.fnmatchcase(str(reason), ok) for ok in cfg.ok_reasons):
        return f"ended {reason}"
    ratio = monitors.number((record.get("compare") or {}).get("items"))
    if cfg.run_items_ratio and ratio is not None and ratio < cfg.run_items_ratio:
        return f"items {_fmt(round(ratio * 100))}% of usual (limit {_fmt(cfg.run_items_ratio * 100)}%)"
    return None


def run_alerts(recent, cursor, cfg):
    """``(notifications, new cursor)`` for the runs of ``recent`` (``[(seq, record)]``, as
    ``monitors.recent_runs`` gives them) recorded after ``cursor``, one per bad run. Without a cursor (the
    first evaluation) nothing is sent: the cursor starts at the newest run. Pure, as ``evaluate`` is."""
    newest = max([seq for seq, _ in recent] + [cursor or 0])
    if cursor is None or RULE["run"] not in active_rules(cfg):
        return [], newest
    notes = []
    for seq, record in sorted(recent, key=lambda pair: pair[0]):
        why = bad_run(record, cfg) if seq > cursor else None
        if why:
            counts = ", ".join(f"{_fmt(monitors.number(record.get(f)))} {f}" for f in ("pages", "items", "errors"))
            notes.append({
                "status": "firing", "rule": "run", "alertname": RULE["run"].alertname,
                "severity": RULE["run"].severity, "node": str(record.get("node")), "spider": record["spider"],
                "host": record.get("host"), "value": record.get("finish_reason"), "threshold": None,
                "summary": f"run {why}; {counts} in {_duration(monitors.number(record.get('duration'), 0))}",
                "repeat": False, "starts_at": _iso(record["end_time"]), "ends_at": None})
    return notes, newest


# ---------------------------------------------------------------------------- records in Redis

def _num(value):
    """A finite, bounded number (not a bool): what a stored time or count must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -BOUND < value < BOUND


def record_problem(field, record):
    """Why an alert record (field ``rule:node``) cannot be used, or None."""
    if field.partition(":")[0] not in RULE:
        return f"unknown rule {field.partition(':')[0]!r}"
    if not isinstance(record, dict) or record.get("state") not in ("pending", "firing"):
        return "not a pending or firing alert"
    times = ("since",) if record["state"] == "pending" else ("since", "fired", "sent")
    if not all(_num(record.get(name)) for name in times):
        return f"needs numbers {', '.join(times)}"
    return None


def tracker_problem(field, tracker):
    """Why a stall tracker cannot be used, or None."""
    if (isinstance(tracker, list) and len(tracker) == 2 and (tracker[0] is None or _num(tracker[0]))
            and _num(tracker[1])):
        return None
    return "not [pages, since]"


def entry_problem(field, entry):
    """Why an outbox entry cannot be sent, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("channel"), str):
        return "not a message with a channel"
    if not all(_num(entry.get(name)) for name in ("created", "attempts", "next_try")) or entry["attempts"] < 0:
        return "needs numbers created, attempts, next_try"
    alerts = entry.get("alerts")
    if not (isinstance(alerts, list) and alerts and all(
            isinstance(a, dict) and a.get("status") in ("firing", "resolved")
            and all(isinstance(a.get(k), str) for k in ("rule", "node", "summary", "starts_at"))
            for a in alerts)):
        return "alerts must be a list of notifications"
    to = entry.get("to")
    if to is not None and not (isinstance(to, list) and to and all(isinstance(t, str) for t in to)):
        return "to must be a list of addresses"
    return None


def _load(raw):
    """Strict JSON (no NaN or Infinity), or raises ValueError."""
    try:
        return json.loads(raw, parse_constant=monitors.not_json)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _dump(value):
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------------- messages

def subject(alerts, prefix):
    """``[scrapy] FIRING 2: cpu on a, down on b; RESOLVED 1: memory on c``: how many, and which."""
    parts = []
    for status in ("firing", "resolved"):
        mine = [a for a in alerts if a["status"] == status]
        if mine:
            names = ", ".join(f"{a['rule']} on {_printable(a['node'])}" for a in mine[:SUBJECT_NAMES])
            more = f" and {len(mine) - SUBJECT_NAMES} more" if len(mine) > SUBJECT_NAMES else ""
            parts.append(f"{status.upper()} {len(mine)}: {names}{more}")
    return f"[{_printable(prefix)}] {'; '.join(parts)}"


def _printable(text):
    """Node ids are data: no line break or control character may reach a mail header or a line of text."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def headline(alerts, prefix):
    firing = sum(a["status"] == "firing" for a in alerts)
    return f"{firing} firing, {len(alerts) - firing} resolved, nodes of {monitors.status_key(prefix)}:"


def text_lines(alerts):
    lines = []
    for a in alerts[:MAX_LINES]:
        when = f"since {a['starts_at']}" if a["status"] == "firing" else f"fired {a['starts_at']}"
        again = " (still firing)" if a.get("repeat") else ""
        name = _printable(a["node"])
        lines.append(f"{a['status'].upper():8} {a['rule']:7} {name}: {_printable(a['summary'])}, {when}{again}")
    if len(alerts) > MAX_LINES:
        lines.append(f"... and {len(alerts) - MAX_LINES} more")
    return lines


def html_table(alerts):
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            a["status"].upper() + (" (again)" if a.get("repeat") else ""), a["rule"], a["node"], a["summary"],
            a["starts_at"])) + "</tr>"
        for a in alerts[:MAX_LINES])
    more = f"<p>... and {len(alerts) - MAX_LINES} more</p>" if len(alerts) > MAX_LINES else ""
    return ("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">"
            "<tr><th>status</th><th>rule</th><th>node</th><th>details</th><th>fired</th></tr>"
            f"{rows}</table>{more}")


# ---------------------------------------------------------------------------- channels
# Each has ``name``, ``describe()``, ``send(alerts, prefix, recipients=None)`` returning the recipients
# refused as ``{address: (code, reply)}`` (raising when the whole message failed) and ``send_test(prefix)``.

class Mail:
    """Sends messages through SMTP (stdlib smtplib): UTF-8 plain text plus a small HTML table."""

    name = "mail"

    def __init__(self, cfg):
        self.cfg = cfg

    def describe(self):
        return f"mail to {', '.join(self.cfg.to)} via {self.cfg.smtp_host}:{self.cfg.smtp_port}"

    def send(self, alerts, prefix, recipients=None):
        text = "\n".join([headline(alerts, prefix), ""] + text_lines(alerts)) + "\n"
        page = f"<p>{html.escape(headline(alerts, prefix))}</p>{html_table(alerts)}"
        return self.deliver(self.message(subject(alerts, prefix), text, f"<html><body>{page}</body></html>"),
                            recipients or self.cfg.to)

    def send_test(self, prefix):
        msg = self.message(f"[{_printable(prefix)}] test message from alert.py",
                           f"alert.py can send mail to {', '.join(self.cfg.to)} (sent {_iso(time.time())}).\n")
        refused = self.deliver(msg, self.cfg.to)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def message(self, subject_line, text, html_part=None):
        msg = EmailMessage()
        msg["Subject"] = subject_line
        msg["From"] = self.cfg.from_addr
        msg["To"] = ", ".join(self.cfg.to)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=socket.gethostname())
        msg.set_content(text, charset="utf-8")
        if html_part:
            msg.add_alternative(html_part, subtype="html", charset="utf-8")
        return msg

    def deliver(self, msg, recipients):
        """Send ``msg`` to ``recipients``; returns those refused. The accepted ones have it then, unless all
        were refused: then nobody has it, and each refused recipient is returned."""
        cfg = self.cfg
        if cfg.smtp_security == "ssl":
            server = smtplib.SMTP_SSL(cfg.smtp_host, cfg.smtp_port, timeout=SEND_TIMEOUT,
                                      context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=SEND_TIMEOUT)
        with server:
            if cfg.smtp_security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if cfg.smtp_user:
                server.login(cfg.smtp_user, cfg.smtp_password or "")
            try:
                refused = server.send_message(msg, to_addrs=recipients)
            except smtplib.SMTPRecipientsRefused as exc:  # no DATA was sent: nobody has it
                refused = {to: exc.recipients.get(to, (451, b"not sent: other recipients refused"))
                           for to in recipients}
        return {to: (code, monitors.as_text(reply)) for to, (code, reply) in refused.items()}


class Webhook:
    """POSTs each message as JSON: a Slack-compatible ``text`` plus the structured ``alerts``."""

    name = "webhook"

    def __init__(self, cfg):
        self.url = cfg.webhook_url
        self.format = cfg.webhook_format

    def describe(self):
        return f"webhook {monitors.safe_url(self.url)}"

    def send(self, alerts, prefix, recipients=None):
        if self.format == "alertmanager":
            self.post(alertmanager_webhook_body(alerts, prefix))
            return {}
        text = "\n".join([subject(alerts, prefix)] + text_lines(alerts))
        # Slack reads <...> as links and & as an entity: its docs ask for these three escaped.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.post({"text": text, "prefix": prefix,
                   "firing": sum(a["status"] == "firing" for a in alerts),
                   "resolved": sum(a["status"] == "resolved" for a in alerts), "alerts": alerts})
        return {}

    def send_test(self, prefix):
        self.post({"text": f"[{prefix}] test message from alert.py", "alerts": [], "prefix": prefix,
                   "firing": 0, "resolved": 0})

    def post(self, body):
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json; charset=utf-8",
                     "User-Agent": "scrapy-cluster-monitor"})
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
            response.read()


class Console:
    """Prints each message: what alert.py does when no channel is configured."""

    name = "console"

    def __init__(self, out):
        self.out = out

    def describe(self):
        return "the console only (no channel: set ALERT_TO or ALERT_WEBHOOK_URL)"

    def send(self, alerts, prefix, recipients=None):
        print("\n  ".join([f"{_iso(time.time())} {subject(alerts, prefix)}"] + text_lines(alerts)),
              file=self.out, flush=True)
        return {}

    def send_test(self, prefix):
        print(f"[{_printable(prefix)}] test message from alert.py", file=self.out, flush=True)


def channels_for(cfg, out):
    channels = ([Mail(cfg)] if cfg.to else []) + ([Webhook(cfg)] if cfg.webhook_url else []) + notify_channels(cfg)
    return {channel.name: channel for channel in channels or [Console(out)]}


def permanent(exc):
    """A refusal of the message itself, which no retry changes: a webhook's 4xx (but 408 and 429), or an SMTP
    5xx to its sender or its data. Timeouts, refused connections, login and TLS failures, a webhook's 5xx
    and SMTP 4xx are transient."""
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 429)
    if isinstance(exc, (smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return exc.smtp_code >= 500
    return False


def within(seconds, send, *args):
    """``send(*args)`` with an overall deadline: its result, or its exception, or TimeoutError when it runs
    longer (it goes on in the background and may still arrive, so a retry can send it twice)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = send(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="alert-send", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def send_tests(channels, prefix, secrets=()):
    """Send one test message through every channel; returns how many failed."""
    failures = 0
    for channel in channels:
        try:
            within(SEND_DEADLINE, channel.send_test, prefix)
        except Exception as exc:  # noqa: BLE001 - reported, counted
            failures += 1
            logger.error("Alert: test message by %s failed: %s", channel.describe(), _one_line(exc, *secrets))
        else:
            logger.info("Alert: test message sent by %s", channel.describe())
    return failures


def _one_line(exc, *urls):
    """An exception on one line, without the URLs or passwords it may quote."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return monitors.scrub(f"{exc.__class__.__name__}: {text}", *urls)[:300]


# ---------------------------------------------------------------------------- state in Redis

class WrongType(Exception):
    """The status key holds another Redis type than a hash: named, never taken for an outage."""


def move_aside(r, prefix, name, why):
    """Rename an alert key alert.py cannot use to ``<name>:aside``, logged with its key, and start it afresh."""
    key, aside = monitors.alert_key(prefix, name), monitors.alert_key(prefix, f"{name}:aside")
    try:
        r.rename(key, aside)
    except redis.ResponseError:  # gone meanwhile
        return
    logger.error("Alert: %s %s: moved to %s, starting afresh", key, why, aside)


class Lock:
    """The evaluation lock: one alert.py at a time evaluates and delivers; it expires if its holder dies."""

    def __init__(self, r, prefix):
        self.r, self.prefix = r, prefix
        self.key = monitors.alert_key(prefix, "lock")
        self.token = None

    def acquire(self):
        for _ in range(2):
            token = uuid.uuid4().hex
            if self.r.set(self.key, token, nx=True, px=LOCK_TTL_MS):
                self.token = token
                return True
            if self.r.pttl(self.key) != -1:  # a live lock, or gone just now
                return False
            move_aside(self.r, self.prefix, "lock", "never expires, so no alert.py wrote it")
        return False

    def renew(self):
        return bool(self.r.eval(RENEW_LUA, 1, self.key, self.token, LOCK_TTL_MS))

    def release(self):
        try:
            self.r.eval(RELEASE_LUA, 1, self.key, self.token)
        except redis.RedisError:
            pass  # it expires by itself
        self.token = None


class Store:
    """The alerter's keys: alert state and stall trackers (hashes of JSON), the outbox (a hash of messages
    to send) and the dead letters (a capped list, and their count). Read-only without a lock (dry run)."""

    TYPES = {"state": "hash", "stall": "hash", "outbox": "hash", "dead": "list", "dead_total": "string",
             "silences": "hash", "heartbeat": "string", "runs": "string"}

    def __init__(self, r, prefix, lock=None):
        self.r, self.prefix, self.lock = r, prefix, lock
        self.key = {name: monitors.alert_key(prefix, name) for name in self.TYPES}

    def read(self, now):
        """``(state, stall)``, checked: a key of the wrong type is moved aside, a malformed field set aside."""
        with self.r.pipeline(transaction=False) as pipe:
            for name in self.TYPES:
                pipe.type(self.key[name])
            pipe.hgetall(self.key["state"])
            pipe.hgetall(self.key["stall"])
            *kinds, raw_state, raw_stall = pipe.execute(raise_on_error=False)
        for name, kind in zip(self.TYPES, kinds):
            if monitors.as_text(kind) not in ("none", self.TYPES[name]):
                if self.lock:
                    move_aside(self.r, self.prefix, name, f"is a {monitors.as_text(kind)}, not a {self.TYPES[name]}")
                else:
                    logger.error("Alert: %s is a %s, not a %s", self.key[name], monitors.as_text(kind), self.TYPES[name])
        state = self._checked("state", raw_state, record_problem, now)
        stall = self._checked("stall", raw_stall, tracker_problem, now)
        return state, stall

    def runs_cursor(self):
        """The seq of the last run the run rule judged (see ``run_alerts``), or None before the first."""
        raw = self.r.get(self.key["runs"])
        return int(raw) if raw is not None and monitors.as_text(raw).isdigit() else None

    def outbox(self, now):
        """The messages to send, oldest first: ``[(field, entry)]``; malformed ones are set aside."""
        raw = self.r.hgetall(self.key["outbox"])
        entries = self._checked("outbox", raw, entry_problem, now, keep_fields=True)
        return sorted(entries.values(), key=lambda item: (item[1]["created"], item[0]))

    def queued(self):
        try:
            return self.r.hlen(self.key["outbox"])
        except redis.ResponseError:
            return "?"

    def _checked(self, name, raw, problem_of, now, keep_fields=False):
        """Decode a hash's JSON fields; those with a problem go to the dead letters (kept, logged)."""
        good, dead = {}, []
        for field, value in (raw.items() if isinstance(raw, dict) else ()):
            text = monitors.as_text(field)
            try:
                decoded = _load(value)
                why = problem_of(text, decoded)
            except ValueError as exc:
                why = f"not JSON ({exc})"
            if why is None:
                good[text] = (field, decoded) if keep_fields else decoded
            else:
                dead.append((field, {"at": now, "key": self.key[name], "field": text,
                                     "reason": f"malformed record in {self.key[name]} field {text!r}: {why}",
                                     "value": monitors.as_text(value)[:DEAD_TEXT]}))
        if dead:
            self.settle(name, {field: None for field, _ in dead}, [letter for _, letter in dead])
        return good

    def write(self, state_changes, stall_changes, entries, runs_cursor=None):
        """Write an evaluation's outcome, only while this process holds the lock (WatchError otherwise)."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(self.lock.key)
            if monitors.as_text(pipe.get(self.lock.key)) != self.lock.token:
                raise redis.WatchError("evaluation lock expired")
            pipe.multi()
            _write_hash(pipe, self.key["state"], state_changes)
            _write_hash(pipe, self.key["stall"], stall_changes)
            if entries:
                pipe.hset(self.key["outbox"], mapping=entries)
            if runs_cursor is not None:  # with the messages it queued: each run is judged once
                pipe.set(self.key["runs"], runs_cursor)
            pipe.execute()

    def settle(self, name, changes, dead):
        """Set (a value) or delete (None) fields of one hash and keep ``dead`` letters, in one step and only
        while the lock is ours; logs each dead letter. False when the lock was lost."""
        if self.lock is None:
            for letter in dead:
                logger.warning("Alert: %s (dry run: left in place)", letter["reason"])
            return True
        pairs = [item for field, value in changes.items() for item in (field, "" if value is None else _dump(value))]
        total = self.r.eval(SETTLE_LUA, 4, self.lock.key, self.key[name], self.key["dead"], self.key["dead_total"],
                            self.lock.token, DEAD_MAX, len(changes), *pairs, *map(_dump, dead))
        if total < 0:
            return False
        for letter in dead:
            logger.error("Alert: dead letter: %s; kept in %s (%d so far)", letter["reason"], self.key["dead"],
                         total)
        return True


def _write_hash(pipe, key, changes):
    gone = [field for field, value in changes.items() if value is None]
    kept = {field: _dump(value) for field, value in changes.items() if value is not None}
    if gone:
        pipe.hdel(key, *gone)
    if kept:
        pipe.hset(key, mapping=kept)


def _merged(old, changes):
    out = dict(old)
    for field, value in changes.items():
        if value is None:
            out.pop(field, None)
        else:
            out[field] = value
    return out


# ---------------------------------------------------------------------------- delivery

class Delivery:
    """Sends the outbox, oldest first per channel. A message refused for good, or failing for ALERT_GIVE_UP,
    becomes a dead letter; a failing one is retried with backoff, its channel's later messages waiting
    behind it, so they arrive in order."""

    def __init__(self, cfg, store, lock, channels):
        self.cfg, self.store, self.lock, self.channels = cfg, store, lock, channels
        self.secrets = (cfg.webhook_url, cfg.redis_url)

    def run(self, now):
        blocked = set()
        for field, entry in self.store.outbox(now):
            channel = self.channels.get(entry["channel"])
            if channel is None:
                gone = self.dead(field, entry, f"channel {entry['channel']!r} is no longer configured", now)
                if not self.store.settle("outbox", {field: None}, [gone]):
                    return self.lost()
                continue
            if channel.name in blocked or entry["next_try"] > now:
                blocked.add(channel.name)  # a channel sends in order: the rest wait behind this one
                continue
            if not self.lock.renew():
                return self.lost()
            update, dead = self.attempt(channel, field, entry, now)
            if not self.store.settle("outbox", {field: update}, dead):
                return self.lost()
            if update:
                blocked.add(channel.name)

    def lost(self):
        logger.warning("Alert: lost the evaluation lock; delivery stops here, the lock's holder goes on")

    def attempt(self, channel, field, entry, now):
        """Send one message: ``(its outbox entry from now on or None, dead letters)``."""
        count = len(entry["alerts"])
        try:
            refused = within(SEND_DEADLINE, channel.send, entry["alerts"], self.cfg.prefix, entry.get("to"))
        except Exception as exc:  # noqa: BLE001 - any failure is either permanent or retried
            reason = _one_line(exc, *self.secrets)
            if permanent(exc):
                return None, [self.dead(field, entry, f"{channel.describe()} refused it: {reason}", now)]
            return self.retry(channel, field, entry, reason, now)
        if not refused:
            logger.info("Alert: sent %s (%d alert(s))", channel.describe(), count)
            return None, []
        said = "; ".join(f"{to}: {code} {' '.join(reply.split())}" for to, (code, reply) in refused.items())
        logger.warning("Alert: %s: recipients refused (%s)", channel.describe(), said)
        dead, later = [], [to for to, (code, _) in refused.items() if code < 500]
        never = [to for to, (code, _) in refused.items() if code >= 500]
        if never:
            dead.append(self.dead(field, {**entry, "to": never},
                                  f"{channel.describe()} refused recipients {', '.join(never)}: {said}", now))
        if not later:
            return None, dead
        update, more = self.retry(channel, field, {**entry, "to": later}, f"recipients refused: {said}", now)
        return update, dead + more

    def retry(self, channel, field, entry, reason, now):
        attempts = entry["attempts"] + 1
        if now - entry["created"] >= self.cfg.give_up:
            return None, [self.dead(field, {**entry, "attempts": attempts},
                                    f"{channel.describe()} failing for {_duration(now - entry['created'])} "
                                    f"({attempts:g} attempts): {reason}", now)]
        # Due again 1, 2, 4... evaluations later: half an interval early absorbs timer jitter.
        wait = min(self.cfg.interval * 2 ** min(attempts - 1, BACKOFF_STEPS), BACKOFF_MAX)
        logger.warning("Alert: %s failed (attempt %d, next try in %ds, %d alert(s) kept): %s",
                       channel.describe(), attempts, round(wait), len(entry["alerts"]), reason)
        return {**entry, "attempts": attempts, "next_try": now + max(wait - self.cfg.interval / 2, 0)}, []

    def dead(self, field, entry, reason, now):
        """A dead letter for an outbox entry; it keeps the first MAX_LINES alerts, as its text would."""
        alerts = entry["alerts"]
        return {"at": now, "key": self.store.key["outbox"], "field": monitors.as_text(field),
                "reason": f"{len(alerts)} alert(s) not sent: {reason}",
                "value": {**entry, "alerts": alerts[:MAX_LINES], "alert_count": len(alerts)}}


# ---------------------------------------------------------------------------- the alerter

class DryRun:
    """--dry-run: evaluates as the real thing does, prints what it would send; sends and stores nothing."""

    def __init__(self, cfg, store, channels, out):
        self.cfg, self.store, self.channels, self.out = cfg, store, channels, out
        self.memory = None  # (state, stall) after the last evaluation, instead of in Redis
        self.runs_cursor = None
        self.last_summary = None  # a loop prints a summary line when it changes

    def run(self, nodes, now):
        if self.memory is None:
            self.runs_cursor = self.store.runs_cursor()
        state, stall = self.store.read(now) if self.memory is None else self.memory
        silences = monitors.read_silences(self.store.r, self.cfg.prefix, now, tidy=False)
        spiders = spider_views(self.store.r, nodes, self.cfg.prefix, now, self.cfg)
        state_changes, stall_changes, notes = evaluate(nodes, state, stall, now, self.cfg, silences, spiders)
        run_notes, self.runs_cursor = run_alerts(monitors.recent_runs(self.store.r, self.cfg.prefix),
                                                 self.runs_cursor, self.cfg)
        notes += run_notes
        self.memory = (_merged(state, state_changes), _merged(stall, stall_changes))
        firing = sum(r["state"] == "firing" for r in self.memory[0].values())
        summary = (f"{len(nodes)} node(s), {firing} firing, {len(self.memory[0]) - firing} pending, "
                   f"{self.store.queued()} message(s) waiting in {self.store.key['outbox']}")
        if notes or summary != self.last_summary:
            print(f"dry run at {_iso(now)}: {summary}", file=self.out)
            if not notes:
                print("nothing would be sent", file=self.out)
        self.last_summary = summary
        for channel in self.channels.values() if notes else ():
            print(f"would send to {channel.describe()}:\n  subject: {subject(notes, self.cfg.prefix)}",
                  file=self.out)
            for line in text_lines(notes):
                print(f"  {line}", file=self.out)
        self.out.flush()
        return notes


class Alerter:
    """Evaluates the rules against Redis under the lock, queues what they send and delivers the queue."""

    def __init__(self, cfg, client=None, channels=None, dry_run=False, out=None):
        self.cfg = cfg
        self.r = client or monitors.connect(cfg.redis_url)
        out = out or sys.stdout
        self.channels = channels_for(cfg, out) if channels is None else channels
        self.lock = Lock(self.r, cfg.prefix)
        self.store = Store(self.r, cfg.prefix, None if dry_run else self.lock)
        self.delivery = Delivery(cfg, self.store, self.lock, self.channels)
        self.dry_run = DryRun(cfg, self.store, self.channels, out) if dry_run else None
        self.reader = monitors.NodeReader(self.r, cfg.prefix, 0, 0 if dry_run else cfg.lost_after, cfg.runs_keep)
        self.unreachable = monitors.Outage(logger, logging.ERROR)
        self.broken = monitors.Outage(logger, logging.ERROR)
        self.malformed = 0
        self.alertmanager = Alertmanager(cfg) if cfg.alertmanager_url else None
        self.who = f"{socket.gethostname()}:{os.getpid()}"

    def tick(self, now=None):
        """One evaluation and delivery; whatever goes wrong is logged and the next tick tries again.
        True when the evaluation ran."""
        url = self.cfg.redis_url
        try:
            self.run_once(now)
        except redis.WatchError:
            logger.warning("Alert: lost the evaluation lock to another alert.py; nothing written")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.unreachable.failed("Alert: cannot reach Redis at %s (%s); no evaluation until it answers",
                                    monitors.redact(url), _one_line(exc, url))
            return False
        except WrongType as exc:
            self.broken.failed("Alert: %s; no evaluation until it is fixed", exc)
            return False
        except Exception:  # noqa: BLE001 - the alerter must outlive any bug or odd data
            logger.exception("Alert: evaluation failed; trying again in %ss", _fmt(self.cfg.interval))
            return False
        self.unreachable.ok("Alert: Redis at %s is back", monitors.redact(url))
        self.broken.ok("Alert: %s is readable again", monitors.status_key(self.cfg.prefix))
        return True

    def run_once(self, now=None):
        """Evaluate and deliver due messages; returns this evaluation's notifications, or None when another
        alert.py holds the lock (it does the work). The clock is Redis's, unless ``now`` is given (tests)."""
        if self.dry_run:
            return self.dry_run.run(*self.read_nodes(now))
        if not self.lock.acquire():
            logger.debug("Alert: another alert.py is evaluating; skipping")
            return None
        try:
            try:
                nodes, now = self.read_nodes(now)
                monitors.write_heartbeat(self.r, self.cfg.prefix, now, self.cfg.interval, self.who)
            except WrongType:
                self.delivery.run(time.time() if now is None else now)  # what is queued still goes out
                raise
            notes = self.evaluate(nodes, now)
            self.delivery.run(now)
            return notes
        finally:
            self.lock.release()

    def read_nodes(self, now=None):
        """``({node: snapshot with state}, now)``: states judged on Redis's clock, or at ``now`` if given."""
        try:
            nodes, bad, now = self.reader.read(now)
        except redis.ResponseError as exc:
            key = monitors.status_key(self.cfg.prefix)
            if "WRONGTYPE" not in str(exc):
                raise
            raise WrongType(monitors.wrong_type(self.r, [(key, "hash")]) or f"{key}: {exc}") from None
        if bad != self.malformed:
            logger.warning("Alert: %d malformed snapshot(s) in %s ignored", bad, monitors.status_key(self.cfg.prefix))
            self.malformed = bad
        return nodes, now

    def evaluate(self, nodes, now):
        state, stall = self.store.read(now)
        silences = monitors.read_silences(self.r, self.cfg.prefix, now)
        spiders = spider_views(self.r, nodes, self.cfg.prefix, now, self.cfg)
        state_changes, stall_changes, notes = evaluate(nodes, state, stall, now, self.cfg, silences, spiders)
        run_notes, cursor = run_alerts(monitors.recent_runs(self.r, self.cfg.prefix), self.store.runs_cursor(), self.cfg)
        notes += run_notes
        entries = {}
        for name in self.channels if notes else ():
            entries[f"{now:.3f}:{uuid.uuid4().hex[:8]}:{name}"] = _dump(
                {"channel": name, "created": now, "attempts": 0, "next_try": now, "alerts": notes})
        self.store.write(state_changes, stall_changes, entries, cursor)
        if self.alertmanager:
            self.alertmanager.sync(_merged(state, state_changes), notes, now)
        if notes:
            logger.info("Alert: %s", subject(notes, self.cfg.prefix))
        return notes


# ---------------------------------------------------------------------------- alerts in the open
# What /alerts shows of each record, silences, Alertmanager (its API and its webhook body) and Apprise.

# Alertmanager takes a firing alert as resolved when it is not posted again before its endsAt: like
# Prometheus, say it ends this many evaluations from now, so each evaluation's re-post keeps it firing.
ALERTMANAGER_RESEND = 4
# What Alertmanager's webhook says for the end of an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"
FORMATS = ("slack", "alertmanager")


def in_the_open(rule, node, snapshot, record, new, event, value, limit, silences, now):
    """One step's outcome ``(new record, event)`` with silences applied and what /alerts shows stored in the
    record (alertname, severity, threshold, spider, host, value, summary, silenced). A silenced alert keeps
    its state and sends nothing; a firing never sent (``notified`` false) is sent once no silence matches
    it; its resolution is sent only if its firing was."""
    snapshot = snapshot or {}
    base = new or record or {}
    labels = {"node": node, "rule": rule.name, "spider": snapshot.get("spider", base.get("spider")),
              "host": snapshot.get("host", base.get("host"))}
    sid = silences.match(labels) if silences else None
    if event == "resolved":
        return new, None if sid or not record.get("notified", True) else event
    if new is None:
        return None, event
    new = {**new, "alertname": rule.alertname, "severity": rule.severity, "threshold": limit,
           "spider": labels["spider"], "host": labels["host"], "silenced": sid}
    if value is not None and value is not SILENCED:
        new["value"] = value
    if new["state"] != "firing":
        return new, event
    if event == "firing" and sid:
        if not record or record["state"] == "pending":
            new["notified"] = False  # fired under a silence: sent when it ends, if still firing
        event = None
    elif event == "firing":
        new["notified"] = True
    elif sid is None and not new.get("notified", True) and value is not SILENCED:
        new.update(sent=now, notified=True)  # its silence ended while it still fires
        event = "firing"
    if "value" in new:
        new["summary"] = firing_summary(rule, new["value"], snapshot, limit)
    return new, event


def alertmanager_alert(a, ends_at):
    """One alert as Alertmanager's API takes it, from a notification (or a firing record made one)."""
    labels = {"alertname": a["alertname"], "severity": a["severity"], "node": a["node"], "spider": a.get("spider"),
              "host": a.get("host")}
    return {"labels": {k: str(v) for k, v in labels.items() if v},
            "annotations": {"summary": f"{a['alertname']} on {a['node']}: {a['summary']}",
                            "description": f"{a['rule']} alert on node {a['node']} (spider {a.get('spider')}, "
                                           f"host {a.get('host')}): {a['summary']}"},
            "startsAt": a["starts_at"], "endsAt": ends_at}


def alertmanager_webhook_body(alerts, prefix):
    """ALERT_WEBHOOK_FORMAT=alertmanager: Alertmanager's webhook body (version 4) for one message."""
    out = []
    for a in alerts:
        one = alertmanager_alert(a, a["ends_at"] or ZERO_TIME)
        key = json.dumps(one["labels"], sort_keys=True).encode()
        out.append({"status": a["status"], **one, "generatorURL": "",
                    "fingerprint": hashlib.sha256(key).hexdigest()[:16]})
    common = [set(a["labels"].items()) for a in out]
    notes = [set(a["annotations"].items()) for a in out]
    return {"version": "4", "groupKey": f"{{}}:{{prefix={json.dumps(prefix)}}}", "truncatedAlerts": 0,
            "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
            "receiver": "scrapy-cluster-monitor", "groupLabels": {},
            "commonLabels": dict(set.intersection(*common)) if common else {},
            "commonAnnotations": dict(set.intersection(*notes)) if notes else {},
            "externalURL": "", "alerts": out}


class Alertmanager(Webhook):
    """ALERT_ALERTMANAGER_URL: each evaluation posts every firing alert that was sent (not silenced) and what
    resolved, to /api/v2/alerts, so Alertmanager's own grouping, inhibition, silences and receivers apply.
    Not through the outbox: the next evaluation posts the current state again."""

    name = "alertmanager"

    def __init__(self, cfg):
        self.url = cfg.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        self.interval = cfg.interval
        self.outage = monitors.Outage(logger)

    def sync(self, state, notes, now):
        alerts = [alertmanager_alert(a, a["ends_at"]) for a in notes if a["status"] == "resolved"]
        ends = _iso(now + ALERTMANAGER_RESEND * self.interval)
        for field, record in state.items():
            if record["state"] == "firing" and record.get("notified", True) and not record.get("silenced"):
                rule, _, node = field.partition(":")
                a = {**record, "rule": rule, "node": node, "starts_at": _iso(record["fired"]),
                     "alertname": RULE[rule].alertname, "severity": RULE[rule].severity,
                     "summary": record.get("summary", "")}
                alerts.append(alertmanager_alert(a, ends))
        if not alerts:
            return
        try:
            within(SEND_DEADLINE, self.post, alerts)
        except Exception as exc:  # noqa: BLE001 - the next evaluation posts again
            self.outage.failed("Alert: cannot post to %s (%s); posting again each evaluation", self.describe(),
                               _one_line(exc, self.url))
            return
        self.outage.ok("Alert: %s takes alerts again", self.describe())

    def describe(self):
        return f"Alertmanager {monitors.safe_url(self.url)}"


class Notify:
    """One Apprise URL (ALERT_NOTIFY_URLS): Telegram, Discord, Teams, DingTalk, Feishu, WeCom, ntfy, Matrix...
    Its URL is never logged (tokens sit in its host and path): only its scheme."""

    def __init__(self, url):
        import apprise  # here: only alert.py processes with ALERT_NOTIFY_URLS pay for it

        self.url = url
        self.scheme = url.partition("://")[0].lower()
        # Stable across restarts (the outbox names it) and says nothing of the URL.
        self.name = f"notify:{self.scheme}:{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        self.apprise = apprise.Apprise()
        self.apprise.add(url)

    def describe(self):
        return f"Apprise {self.scheme}://..."

    def send(self, alerts, prefix, recipients=None):
        self.notify(subject(alerts, prefix), "\n".join([headline(alerts, prefix)] + text_lines(alerts)))
        return {}

    def send_test(self, prefix):
        self.notify(f"[{_printable(prefix)}] test message from alert.py", "alert.py can send here.")

    def notify(self, title, body):
        if not self.apprise.notify(title=title, body=body):
            raise ConnectionError(f"{self.describe()} did not take the notification")


def notify_channels(cfg):
    return [Notify(url) for url in cfg.notify_urls or ()]


def check_open_settings(args):
    """ConfigError for a bad ALERT_ALERTMANAGER_URL, ALERT_WEBHOOK_FORMAT or ALERT_NOTIFY_URLS entry (naming
    only its scheme); the silence flags' matchers and duration checked."""
    if args.alertmanager_url:
        check_webhook_url(args.alertmanager_url, "ALERT_ALERTMANAGER_URL")
    args.webhook_format = str(args.webhook_format).strip().lower()
    if args.webhook_format not in FORMATS:
        raise monitors.ConfigError(f"ALERT_WEBHOOK_FORMAT must be one of {', '.join(FORMATS)}, "
                                   f"not {args.webhook_format[:50]!r}")
    if args.notify_urls:
        import apprise
        logging.getLogger("apprise").setLevel(logging.CRITICAL + 1)  # its lines can quote a URL's token
        for url in args.notify_urls:
            if apprise.Apprise.instantiate(url) is None:
                scheme = url.partition("://")[0][:20] if "://" in url else "(no scheme)"
                raise monitors.ConfigError(f"ALERT_NOTIFY_URLS: an Apprise URL of scheme {scheme!r} is not usable "
                                           "(unknown service, or missing parts)")
    if args.silence:
        pairs = [part.strip() for flag in args.silence for part in flag.split(",") if part.strip()]
        if not all("=" in part for part in pairs):
            raise monitors.ConfigError("--silence takes LABEL=VALUE pairs, e.g. --silence spider=main_spider")
        args.silence = dict(part.split("=", 1) for part in pairs)
        if args.silence_for is None:
            raise monitors.ConfigError("--silence needs --for, e.g. --for 2h")
        args.silence_for = monitors.duration("--for", args.silence_for)


def add_silence_flags(parser):
    parser.add_argument("--silence", action="append", metavar="LABEL=VALUE",
                        help="add a silence for alerts matching these labels (node, spider, host, rule; "
                             "comma-separated or repeated) for --for (3600, 90m, 2h, 1d), print its id and exit")
    parser.add_argument("--comment", default="", help="the silence's comment")
    parser.add_argument("--silences", action="store_true", help="list the active silences and exit")
    parser.add_argument("--unsilence", metavar="ID", help="delete a silence and exit")


def silences_command(cfg):
    """--silence, --silences, --unsilence: 0 done, 1 Redis failed, 2 bad input."""
    r = monitors.connect(cfg.redis_url)
    try:
        now = monitors.redis_now(r.time())
        if cfg.silence:
            who = f"alert.py on {socket.gethostname()}"
            try:
                silence = monitors.silence_from({"matchers": cfg.silence, "duration": cfg.silence_for,
                                                 "comment": cfg.comment}, now, who)
                sid = monitors.add_silence(r, cfg.prefix, silence)
            except ValueError as exc:
                return monitors.exit_config_error("alert.py", exc)
            print(f"{sid} until {_iso(silence['until'])}")
        elif cfg.unsilence:
            if not monitors.delete_silence(r, cfg.prefix, cfg.unsilence):
                print(f"alert.py: error: no silence {cfg.unsilence[:50]!r}", file=sys.stderr)
                return 1
            print(f"deleted {cfg.unsilence}")
        else:
            found = monitors.read_silences(r, cfg.prefix, now)
            for sid, s in found.items():
                matchers = ",".join(f"{k}={v}" for k, v in s["matchers"].items())
                comment = f": {s['comment']}" if s.get("comment") else ""
                print(_printable(f"{sid} {matchers} until {_iso(s['until'])} by {s.get('who')}{comment}"))
            if not found:
                print("no active silences")
    except redis.RedisError as exc:
        print(f"alert.py: error: Redis at {monitors.redact(cfg.redis_url)}: {_one_line(exc, cfg.redis_url)}",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    try:
        cfg = load_config(argv)
    except monitors.ConfigError as exc:
        return monitors.exit_config_error("alert.py", exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    alerter = Alerter(cfg, dry_run=cfg.dry_run)
    channels = "; ".join(c.describe() for c in alerter.channels.values())
    if cfg.silence or cfg.silences or cfg.unsilence:
        return silences_command(cfg)
    if cfg.test_mail:
        if cfg.dry_run:
            print(f"would send a test message by {channels}")
            return 0
        return 1 if send_tests(alerter.channels.values(), cfg.prefix, alerter.delivery.secrets) else 0
    logger.info("Alert: watching %s at %s every %ss (rules: %s; %s)",
                monitors.status_key(cfg.prefix), monitors.redact(cfg.redis_url), _fmt(cfg.interval),
                ",".join(cfg.rules) or "none", "dry run: nothing is sent" if cfg.dry_run else channels)
    if not (cfg.to or cfg.webhook_url or cfg.notify_urls or cfg.dry_run):
        logger.warning("Alert: no channel configured (ALERT_TO, ALERT_WEBHOOK_URL): nothing is sent, "
                       "each notification is printed here")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while True:
            started = time.monotonic()
            ok = alerter.tick()
            if cfg.once:
                return 0 if ok else 1
            if stop.wait(max(cfg.interval - (time.monotonic() - started), 0)):
                return 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
