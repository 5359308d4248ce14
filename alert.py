"""Alerts for a Scrapy cluster: rules over every node's snapshot, sent by mail and webhook, once each.

``python alert.py`` evaluates the rules every ALERT_INTERVAL seconds (``--once`` for cron, ``--dry-run``
to print instead of send, ``--test-mail``, ``--help`` for every setting). Each rule and node is an alert
that goes inactive -> pending (condition true for less than ALERT_FOR) -> firing -> resolved, as in
Prometheus; a firing alert is sent at once and again every ALERT_REPEAT, its end is sent too, and all that
fires or resolves in one evaluation goes out as one message. State and undelivered messages live in Redis
under ``<prefix>:alert:``, so restarts, cron runs and several alert.py processes send each message once.
"""

import argparse
import html
import json
import logging
import math
import signal
import smtplib
import socket
import ssl
import sys
import threading
import time
import urllib.request
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import urlsplit

import redis

import monitors

logger = logging.getLogger(__name__)

RULES = ("down", "cpu", "memory", "stalled", "errors", "rss")
SECURITY = ("none", "starttls", "ssl")
# An SMTP or webhook call gives up after this many seconds, so one evaluation always ends.
SEND_TIMEOUT = 10
# A failed delivery is retried 1, 2, 4, 8... evaluations later, but at least every BACKOFF_MAX seconds.
BACKOFF_MAX = 900
# The evaluation lock outlives a crashed holder by this long; the holder renews it before every delivery.
LOCK_TTL_MS = 60_000
# Mail and the webhook's text list this many alerts at most (the webhook's `alerts` field has them all).
MAX_LINES = 100
# The subject names this many alerts of each kind, then says how many more.
SUBJECT_NAMES = 5
MIB = 1024 * 1024

RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
             "end return 0")

# (environment variable, flag, attribute, default, kind, help). ``--help`` is built from this table.
SETTINGS = (
    ("REDIS_URL", "--redis-url", "redis_url", monitors.DEFAULT_REDIS_URL, str, "Redis the nodes report to"),
    ("MONITOR_KEY_PREFIX", "--prefix", "prefix", monitors.DEFAULT_PREFIX, str, "key prefix of the cluster"),
    ("ALERT_RULES", "--rules", "rules", ",".join(RULES), "rules", "comma-separated rules to evaluate"),
    ("ALERT_CPU_PERCENT", "--cpu-percent", "cpu_percent", 80, float, "cpu: host CPU %% over this; 0 = off"),
    ("ALERT_MEMORY_PERCENT", "--memory-percent", "memory_percent", 90, float,
     "memory: host memory %% over this; 0 = off"),
    ("ALERT_STALL_SECONDS", "--stall-seconds", "stall_seconds", 300, float,
     "stalled: pages not rising this long while the queue is not empty; 0 = off"),
    ("ALERT_ERRORS_PER_MIN", "--errors-per-min", "errors_per_min", 30, float,
     "errors: error log lines per minute over this; 0 = off"),
    ("ALERT_RSS_MB", "--rss-mb", "rss_mb", 2048, float, "rss: process memory (MiB) over this; 0 = off"),
    ("ALERT_INTERVAL", "--interval", "interval", 60, float, "seconds between evaluations"),
    ("ALERT_FOR", "--for", "for_seconds", 120, float, "seconds a condition must hold before it fires"),
    ("ALERT_REPEAT", "--repeat", "repeat", 14400, float, "seconds before a still-firing alert is sent again"),
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
SMTP_VARS = ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USER", "SMTP_PASSWORD")


class ConfigError(Exception):
    """A setting that alert.py cannot run with; main() prints it on one line and exits 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_parser():
    parser = Parser(
        prog="alert.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag defaults to its environment variable (shown in brackets), then to the default.\n"
               "SMTP_PASSWORD is read from the environment only. Redis keys: <prefix>:alert:state, "
               ":stall, :outbox, :lock.",
    )
    parser.add_argument("--once", action="store_true", help="evaluate once and exit (for cron)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be sent; send nothing, store nothing")
    parser.add_argument("--test-mail", action="store_true", help="send one test message and exit")
    for name, flag, attr, default, kind, text in SETTINGS:
        if flag:
            shown = f"{name}, default {default}" if default is not None else name
            parser.add_argument(flag, dest=attr, metavar=name, help=f"{text} [{shown}]")
    return parser


def load_config(argv=None):
    """Flags over environment over defaults, checked: returns the parsed arguments or raises ConfigError."""
    args = build_parser().parse_args(argv)
    given = set()
    for name, flag, attr, default, kind, _ in SETTINGS:
        raw = getattr(args, attr, None)
        raw = monitors.env(name) if raw is None or raw == "" else raw
        if raw is not None:
            given.add(name)
        setattr(args, attr, _convert(name, raw, default, kind))
    if args.smtp_port is None:
        args.smtp_port = 465 if args.smtp_security == "ssl" else 25
    if not 0 < args.smtp_port < 65536:
        raise ConfigError(f"SMTP_PORT must be a port number, not {args.smtp_port}")
    if args.interval <= 0:
        raise ConfigError("ALERT_INTERVAL must be more than 0")
    if args.smtp_password and not args.smtp_user:
        raise ConfigError("SMTP_PASSWORD is set but SMTP_USER is not")
    if args.webhook_url and urlsplit(args.webhook_url).scheme not in ("http", "https"):
        raise ConfigError("ALERT_WEBHOOK_URL must be an http:// or https:// URL")
    if not args.to and (given & set(SMTP_VARS) or args.test_mail and not args.webhook_url):
        raise ConfigError("ALERT_TO is not set: mail needs at least one recipient")
    if not args.to and not args.webhook_url and not args.dry_run:
        raise ConfigError("nothing to send to: set ALERT_TO (mail) and/or ALERT_WEBHOOK_URL, "
                          "or use --dry-run")
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
    if kind in (float, int):
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a number 0 or more, not {raw!r}")
        return value
    if kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind == "rules":
        rules = [part.strip().lower() for part in raw.split(",") if part.strip()]
        unknown = [rule for rule in rules if rule not in RULES]
        if unknown:
            raise ConfigError(f"{name}: unknown rule {unknown[0]!r} (rules: {', '.join(RULES)})")
        return rules
    if kind == "security":
        if raw.lower() not in SECURITY:
            raise ConfigError(f"{name} must be one of {', '.join(SECURITY)}, not {raw!r}")
        return raw.lower()
    return raw


# ---------------------------------------------------------------------------- rules

def queued(snapshot):
    """Requests plus start URLs waiting in the node's scrapy-redis queue; None when it has no such queue."""
    sizes = [monitors.number(snapshot.get(f)) for f in ("queue_requests", "queue_start_urls")]
    sizes = [s for s in sizes if s is not None]
    return sum(sizes) if sizes else None


def over(field, threshold, scale):
    """A rule that holds while ``snapshot[field] / scale`` is over the threshold setting (0 turns it off)."""
    def check(snapshot, cfg, stuck_since, now):
        limit = getattr(cfg, threshold)
        value = monitors.number(snapshot.get(field))
        if limit and value is not None and value / scale > limit:
            return round(value / scale, 1)
        return None
    return check


def stalled(snapshot, cfg, stuck_since, now):
    """Seconds the node's pages have stood still with work queued, once that is ALERT_STALL_SECONDS."""
    if cfg.stall_seconds and stuck_since is not None and now - stuck_since >= cfg.stall_seconds:
        return round(now - stuck_since)
    return None


# The snapshot field (and its scale) behind each threshold rule.
FIGURES = {"cpu": ("cpu", 1), "memory": ("memory", 1), "errors": ("errors_per_min", 1), "rss": ("rss", MIB)}
# The setting that holds each rule's threshold.
THRESHOLDS = {"cpu": "cpu_percent", "memory": "memory_percent", "stalled": "stall_seconds",
              "errors": "errors_per_min", "rss": "rss_mb"}
CHECKS = {rule: over(field, THRESHOLDS[rule], scale) for rule, (field, scale) in FIGURES.items()}
CHECKS["stalled"] = stalled
UNITS = {"cpu": "%", "memory": "%", "stalled": " s", "errors": "/min", "rss": " MiB", "down": " s"}
LABELS = {"cpu": "host CPU", "memory": "host memory", "stalled": "pages not rising for",
          "errors": "errors", "rss": "process RSS", "down": "no report for"}


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


def step(record, value, now, cfg):
    """One alert's transition. ``value``: the rule's figure when its condition holds, None when not,
    ``SILENCED`` while its node is down. Returns ``(new record or None, "firing"/"resolved"/None)``."""
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
        if now - record["since"] < cfg.for_seconds:
            return record, None
        return {**record, "state": "firing", "fired": now, "sent": now, "value": value}, "firing"
    if now - record["sent"] >= cfg.repeat:
        return {**record, "sent": now, "value": value}, "firing"
    return record, None


def active_rules(cfg):
    """The rules to evaluate: those in ALERT_RULES whose threshold is not 0."""
    return [rule for rule in cfg.rules if rule not in THRESHOLDS or getattr(cfg, THRESHOLDS[rule])]


def evaluate(nodes, state, stall, now, cfg):
    """One evaluation over ``{node: snapshot with state}``, the stored alerts and stall trackers.

    Returns ``(state changes, stall changes, notifications)``; a change of None deletes the field.
    Pure: no Redis, no clock, so tests can drive it with any ``now``.
    """
    state_changes, stall_changes, notes = {}, {}, []
    rules = active_rules(cfg)
    records_of = {}  # {node: {rule: record}}: few nodes have any, so most nodes cost no key lookups
    for key, record in state.items():
        rule, _, node = key.partition(":")
        records_of.setdefault(node, {})[rule] = record

    def apply(rule, node, snapshot, record, value):
        key = f"{rule}:{node}"
        new, event = step(record, value, now, cfg)
        if new != record:
            state_changes[key] = new
        if event:
            notes.append(notification(event, rule, node, snapshot, record, new, value, now, cfg))

    for node, snapshot in nodes.items():
        node_now = snapshot.get("state")
        tracker = track_stall(snapshot, stall.get(node), now) if "stalled" in rules else None
        if tracker != stall.get(node):
            stall_changes[node] = tracker
        records = records_of.pop(node, {})
        for rule in rules:
            if rule == "down":
                value = round(now - (monitors.number(snapshot.get("timestamp")) or 0)) if node_now == "stale" else None
            elif node_now == "stale":
                value = SILENCED
            elif node_now == "closed":
                value = None
            else:
                value = CHECKS[rule](snapshot, cfg, tracker[1] if tracker else None, now)
            record = records.pop(rule, None)
            if record is not None or value is not None:
                apply(rule, node, snapshot, record, value)
        for rule, record in records.items():  # rules turned off since
            apply(rule, node, snapshot, record, None)
    for node, records in records_of.items():  # nodes gone from the status hash
        for rule, record in records.items():
            apply(rule, node, None, record, None)
    for node in set(stall) - set(nodes):
        stall_changes[node] = None
    notes.sort(key=lambda a: (a["status"], RULES.index(a["rule"]) if a["rule"] in RULES else 0, a["node"]))
    return state_changes, stall_changes, notes


def notification(event, rule, node, snapshot, old, new, value, now, cfg):
    """What a message says of one alert: a JSON-ready dict (the webhook's ``alerts`` items)."""
    snapshot = snapshot or {}
    threshold = getattr(cfg, THRESHOLDS[rule]) if rule in THRESHOLDS else None
    if event == "firing":
        summary = f"{LABELS[rule]} {_fmt(value)}{UNITS[rule]}"
        if rule == "down":
            summary += f" (reports every {_fmt(monitors.number(snapshot.get('interval')) or 0)} s)"
        elif threshold is not None:
            summary += f" (limit {_fmt(threshold)}{UNITS[rule]})"
        if rule == "stalled":
            summary += f", {_fmt(queued(snapshot))} requests queued"
        record = new
    else:
        record = old
        if not snapshot:
            summary = "node gone from the status hash"
        elif snapshot.get("state") == "closed":
            summary = "node closed"
        elif rule not in active_rules(cfg):
            summary = "rule turned off"
        elif rule == "down":
            summary = "reporting again"
        else:
            summary = "back to normal"
            field, scale = FIGURES.get(rule, (None, 1))
            figure = monitors.number(snapshot.get(field)) if field else None
            if figure is not None:
                summary += f": {LABELS[rule]} {_fmt(figure / scale)}{UNITS[rule]}"
        summary += f" after {_duration(now - record['fired'])}"
    return {
        "status": event, "rule": rule, "node": node,
        "spider": snapshot.get("spider"), "host": snapshot.get("host"),
        "value": value if event == "firing" else record.get("value"), "threshold": threshold,
        "summary": summary, "repeat": event == "firing" and bool(old and old["state"] == "firing"),
        "starts_at": _iso(record["fired"]), "ends_at": _iso(now) if event == "resolved" else None,
    }


def _fmt(number):
    if number is None:
        return "?"
    return str(int(number)) if float(number).is_integer() else f"{number:.1f}"


def _iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _duration(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
        again = " (still firing)" if a["repeat"] else ""
        name = _printable(a["node"])
        lines.append(f"{a['status'].upper():8} {a['rule']:7} {name}: {a['summary']}, {when}{again}")
    if len(alerts) > MAX_LINES:
        lines.append(f"... and {len(alerts) - MAX_LINES} more")
    return lines


def html_table(alerts):
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            a["status"].upper() + (" (again)" if a["repeat"] else ""), a["rule"], a["node"], a["summary"],
            a["starts_at"])) + "</tr>"
        for a in alerts[:MAX_LINES])
    more = f"<p>... and {len(alerts) - MAX_LINES} more</p>" if len(alerts) > MAX_LINES else ""
    return ("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">"
            "<tr><th>status</th><th>rule</th><th>node</th><th>details</th><th>fired</th></tr>"
            f"{rows}</table>{more}")


class Mail:
    """Sends messages through SMTP (stdlib smtplib): UTF-8 plain text plus a small HTML table."""

    name = "mail"

    def __init__(self, cfg):
        self.cfg = cfg

    def describe(self):
        return f"mail to {', '.join(self.cfg.to)} via {self.cfg.smtp_host}:{self.cfg.smtp_port}"

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

    def send(self, alerts, prefix):
        text = "\n".join([headline(alerts, prefix), ""] + text_lines(alerts)) + "\n"
        page = f"<p>{html.escape(headline(alerts, prefix))}</p>{html_table(alerts)}"
        self.deliver(self.message(subject(alerts, prefix), text, f"<html><body>{page}</body></html>"))

    def deliver(self, msg):
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
            server.send_message(msg)


class Webhook:
    """POSTs each message as JSON: a Slack-compatible ``text`` plus the structured ``alerts``."""

    name = "webhook"

    def __init__(self, cfg):
        self.url = cfg.webhook_url

    def describe(self):
        return f"webhook {_safe_url(self.url)}"

    def send(self, alerts, prefix):
        text = "\n".join([subject(alerts, prefix)] + text_lines(alerts))
        # Slack reads <...> as links and & as an entity: its docs ask for these three escaped.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        body = {"text": text, "prefix": prefix,
                "firing": sum(a["status"] == "firing" for a in alerts),
                "resolved": sum(a["status"] == "resolved" for a in alerts), "alerts": alerts}
        self.post(body)

    def post(self, body):
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json; charset=utf-8",
                     "User-Agent": "scrapy-cluster-monitor"})
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
            response.read()


def _safe_url(url):
    """Scheme and host only: a webhook's path is often its secret (Slack, Teams)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/..."


def channels_for(cfg):
    out = {}
    if cfg.to:
        out["mail"] = Mail(cfg)
    if cfg.webhook_url:
        out["webhook"] = Webhook(cfg)
    return out


# ---------------------------------------------------------------------------- the evaluator

class Alerter:
    """Evaluates the rules against Redis and delivers what they send, with state kept in Redis."""

    def __init__(self, cfg, client=None, channels=None, dry_run=False, out=None):
        self.cfg = cfg
        self.r = client or monitors.connect(cfg.redis_url)
        self.channels = channels_for(cfg) if channels is None else channels
        self.dry_run = dry_run
        self.out = out or sys.stdout
        p = cfg.prefix
        self.keys = {name: f"{p}:alert:{name}" for name in ("state", "stall", "outbox", "lock")}
        self.redis_down = False
        self.malformed = 0
        self.memory = None  # --dry-run keeps its state here instead of in Redis
        self.last_summary = None  # --dry-run prints a summary line when it changes

    def tick(self, now=None):
        """One evaluation and delivery; Redis errors are logged once per outage. True when Redis answered."""
        try:
            self.run_once(time.time() if now is None else now)
        except redis.WatchError:
            logger.warning("Alert: lost the evaluation lock to another alert.py; nothing written")
        except redis.RedisError as exc:
            if not self.redis_down:
                logger.error("Alert: cannot reach Redis at %s (%s); no evaluation until it answers",
                             monitors.redact(self.cfg.redis_url), exc)
            self.redis_down = True
            return False
        if self.redis_down:
            logger.info("Alert: Redis at %s is back", monitors.redact(self.cfg.redis_url))
        self.redis_down = False
        return True

    def run_once(self, now):
        """Evaluate at ``now`` and deliver due messages; returns this evaluation's notifications, or None
        when another alert.py holds the lock (it does the work)."""
        if self.dry_run:
            return self._dry_run(now)
        token = uuid.uuid4().hex
        if not self.r.set(self.keys["lock"], token, nx=True, px=LOCK_TTL_MS):
            logger.debug("Alert: another alert.py is evaluating; skipping")
            return None
        try:
            notes = self._evaluate(now, token)
            self._deliver(now, token)
            return notes
        finally:
            try:
                self.r.eval(RELEASE_LUA, 1, self.keys["lock"], token)
            except redis.RedisError:
                pass  # it expires by itself

    def _read(self, now):
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(monitors.status_key(self.cfg.prefix))
            pipe.hgetall(self.keys["state"])
            pipe.hgetall(self.keys["stall"])
            raw_nodes, raw_state, raw_stall = pipe.execute()
        nodes, bad = monitors.parse_nodes(raw_nodes, now)
        if bad != self.malformed:
            logger.warning("Alert: %d malformed snapshot(s) in %s ignored", bad,
                           monitors.status_key(self.cfg.prefix))
            self.malformed = bad
        return nodes, _decode_hash(raw_state, dict), _decode_hash(raw_stall, list)

    def _evaluate(self, now, token):
        nodes, state, stall = self._read(now)
        state_changes, stall_changes, notes = evaluate(nodes, state, stall, now, self.cfg)
        entries = {}
        if notes:
            for name in self.channels:
                entry_id = f"{now:.3f}:{uuid.uuid4().hex[:8]}:{name}"
                entries[entry_id] = json.dumps({"channel": name, "created": now, "attempts": 0,
                                                "next_try": now, "alerts": notes})
        with self.r.pipeline(transaction=True) as pipe:
            # Written only while this process still holds the lock: WATCH fails the write otherwise.
            pipe.watch(self.keys["lock"])
            if pipe.get(self.keys["lock"]) not in (token, token.encode()):
                raise redis.WatchError("evaluation lock expired")
            pipe.multi()
            _write_hash(pipe, self.keys["state"], state_changes)
            _write_hash(pipe, self.keys["stall"], stall_changes)
            if entries:
                pipe.hset(self.keys["outbox"], mapping=entries)
            pipe.execute()
        if notes:
            logger.info("Alert: %s", subject(notes, self.cfg.prefix))
        return notes

    def _deliver(self, now, token):
        """Send the outbox, oldest first per channel; a failed message waits longer each time, and the
        channel's later messages wait behind it, so they arrive in order."""
        raw = self.r.hgetall(self.keys["outbox"])
        entries = sorted(_decode_hash(raw, dict).items(), key=lambda kv: (kv[1].get("created", 0), kv[0]))
        blocked = set()
        for entry_id, entry in entries:
            channel = self.channels.get(entry.get("channel"))
            if channel is None:
                logger.warning("Alert: dropping a queued %s message: that channel is no longer configured",
                               entry.get("channel"))
                self.r.hdel(self.keys["outbox"], entry_id)
                continue
            if channel.name in blocked:
                continue
            if entry.get("next_try", 0) > now:  # a channel sends in order: the rest wait behind this one
                blocked.add(channel.name)
                continue
            if not self.r.eval(RENEW_LUA, 1, self.keys["lock"], token, LOCK_TTL_MS):
                logger.warning("Alert: lost the evaluation lock; delivery stops here")
                return
            try:
                channel.send(entry["alerts"], self.cfg.prefix)
            except Exception as exc:  # noqa: BLE001 - any failure means: keep it and try again later
                blocked.add(channel.name)
                entry["attempts"] = entry.get("attempts", 0) + 1
                # Due again 1, 2, 4... evaluations later: half an interval early absorbs timer jitter.
                wait = min(self.cfg.interval * 2 ** (entry["attempts"] - 1), BACKOFF_MAX)
                entry["next_try"] = now + max(wait - self.cfg.interval / 2, 0)
                self.r.hset(self.keys["outbox"], entry_id, json.dumps(entry))
                logger.warning("Alert: %s failed (attempt %d, next try in %ds, %d alert(s) kept): %s",
                               channel.describe(), entry["attempts"], round(wait), len(entry["alerts"]),
                               _one_line(exc))
                continue
            self.r.hdel(self.keys["outbox"], entry_id)
            logger.info("Alert: sent %s (%d alert(s))", channel.describe(), len(entry["alerts"]))

    def _dry_run(self, now):
        if self.memory is None:
            nodes, state, stall = self._read(now)
        else:
            nodes = self._read(now)[0]
            state, stall = self.memory
        state_changes, stall_changes, notes = evaluate(nodes, state, stall, now, self.cfg)
        self.memory = (_merged(state, state_changes), _merged(stall, stall_changes))
        firing = sum(r["state"] == "firing" for r in self.memory[0].values())
        pending = len(self.memory[0]) - firing
        queued_count = self.r.hlen(self.keys["outbox"])
        summary = (f"{len(nodes)} node(s), {firing} firing, {pending} pending, "
                   f"{queued_count} message(s) waiting in {self.keys['outbox']}")
        if notes or summary != self.last_summary:  # a loop prints only what changed
            print(f"dry run at {_iso(now)}: {summary}", file=self.out)
            if not notes:
                print("nothing would be sent", file=self.out)
        self.last_summary = summary
        for name, channel in (self.channels or {"(no channel)": None}).items():
            if notes:
                where = channel.describe() if channel else "nowhere (set ALERT_TO or ALERT_WEBHOOK_URL)"
                print(f"would send to {where}:\n  subject: {subject(notes, self.cfg.prefix)}", file=self.out)
                for line in text_lines(notes):
                    print(f"  {line}", file=self.out)
        self.out.flush()
        return notes

    def test_message(self):
        """Send one test message through every channel; returns how many failed."""
        failures = 0
        now = time.time()
        for channel in self.channels.values():
            try:
                if isinstance(channel, Mail):
                    channel.deliver(channel.message(
                        f"[{self.cfg.prefix}] test message from alert.py",
                        f"alert.py can send mail to {', '.join(self.cfg.to)} (sent {_iso(now)}).\n"))
                else:
                    channel.post({"text": f"[{self.cfg.prefix}] test message from alert.py", "alerts": [],
                                  "prefix": self.cfg.prefix, "firing": 0, "resolved": 0})
            except Exception as exc:  # noqa: BLE001
                failures += 1
                logger.error("Alert: test message by %s failed: %s", channel.describe(), _one_line(exc))
            else:
                logger.info("Alert: test message sent by %s", channel.describe())
        return failures


def _decode_hash(raw, kind):
    out = {}
    for field, value in raw.items():
        try:
            decoded = json.loads(value)
        except ValueError:
            continue
        if isinstance(decoded, kind):
            out[field.decode("utf-8", "replace") if isinstance(field, bytes) else field] = decoded
    return out


def _write_hash(pipe, key, changes):
    gone = [field for field, value in changes.items() if value is None]
    kept = {field: json.dumps(value, separators=(",", ":"))
            for field, value in changes.items() if value is not None}
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


def _one_line(exc):
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:300]


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"alert.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    alerter = Alerter(cfg, dry_run=cfg.dry_run)
    if cfg.test_mail:
        if cfg.dry_run:
            channels = "; ".join(c.describe() for c in alerter.channels.values())
            print(f"would send a test message by {channels}")
            return 0
        return 1 if alerter.test_message() else 0
    logger.info("Alert: watching %s at %s every %ss (rules: %s; %s)",
                monitors.status_key(cfg.prefix), monitors.redact(cfg.redis_url), _fmt(cfg.interval),
                ",".join(cfg.rules) or "none",
                "dry run: nothing is sent" if cfg.dry_run else "; ".join(c.describe() for c in alerter.channels.values()))
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
