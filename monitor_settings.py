"""Every setting of every script, declared once: its name, type, default, range, help and who reads it.

Each script reads its settings through ``value`` (the extension offers its Scrapy setting of the same name
first); ``--help`` and the README's environment table come from SETTINGS, and a test checks both. An empty
environment variable counts as unset. A value a script cannot run with is a ConfigError naming the setting:
the scripts print it on one line and exit 2, the extension logs it and turns itself off. Redis URL settings
also take Sentinel and Cluster URLs: ``connect`` opens every kind (``plain_connect`` plain ones), and the URLs'
secrets stay out of logs (``redact``, ``scrub``; an outage is logged once: ``Outage``).
"""

import argparse
import datetime
import difflib
import logging
import math
import os
import re
import sys
import threading
import time
import zoneinfo
from typing import NamedTuple, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

# Who reads a setting: the Scrapy extension (crawler machines), the API, the alerter, the demo, and the
# demo crawler's own Scrapy project (settings.py).
CRAWLER, API, ALERT, DEMO, PROJECT = "crawler", "api", "alert", "demo", "project"
# Flag words, as Scrapy's getbool and the README take them, in any case.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# A setting in seconds beyond a year is a typo (1e308 would overflow every sum and sleep).
MAX_SECONDS = 365 * 86400
# A whole-number setting has at most this many digits: anything longer is a typo.
MAX_WHOLE = 10 ** 9 - 1
# Units of a duration such as ``2h`` or ``90m`` (silences).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)([smhd]?)\Z")
# The alert rules, in evaluation order (monitor_rules.RULES has one row each; a test checks they agree).
RULE_NAMES = ("down", "cpu", "memory", "stalled", "errors", "rss", "run", "coverage", "latency", "queue",
              "domain_refusing", "finished", "redis_memory",
              "redis_evictions")
# What ALERT_ACTIONS may make a rule do: a fleet command on the alert's target, or ``slow`` its domain.
ACTION_COMMANDS = ("pause", "resume", "stop", "drain", "slow")
# Finish reasons of a run that ended well, unless ALERT_OK_REASONS says otherwise.
OK_REASONS = ("finished", "shutdown", "stopped", "drained")


class ConfigError(ValueError):
    """A setting a script cannot run with: its ``main`` prints it on one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes raise ConfigError, so every script reports all bad input the same way."""

    def error(self, message):
        raise ConfigError(message)


def exit_config_error(prog, exc):
    """Print a ConfigError as ``prog: error: ...`` on one line; the exit status for it, 2."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


class Setting(NamedTuple):
    """One setting. ``kind`` names its parser (PARSERS); ``low``/``high`` bound numbers; ``flag`` is alert.py's
    command-line flag and ``attr`` its attribute on alert.py's configuration; ``env`` False: a Scrapy setting
    only, never read from the environment."""

    name: str
    kind: str
    default: object
    readers: tuple
    help: str
    low: float = 0
    high: Optional[float] = None
    choices: tuple = ()
    flag: Optional[str] = None
    attr: Optional[str] = None
    env: bool = True


def _alert(name, kind, default, text, flag=True, attr=None, readers=(ALERT,), **bounds):
    """A setting alert.py reads, with its command-line flag (``flag=False``: environment only)."""
    attr = attr or name.split("_", 1)[1].lower()
    return Setting(name, kind, default, readers, text, flag=("--" + attr.replace("_", "-")) if flag is True
                   else flag or None, attr=attr, **bounds)


SETTINGS = (
    # Everywhere
    _alert("REDIS_URL", "redis_url", "redis://localhost:6379/0", "Redis the nodes report to (scrapy-redis's "
           "queue too, for the demo crawler)", flag="--redis-url", attr="redis_url",
           readers=(CRAWLER, API, ALERT, DEMO, PROJECT)),
    _alert("MONITOR_KEY_PREFIX", "text", "scrapy", "prefix of the monitor's Redis keys", flag="--prefix",
           attr="prefix", readers=(CRAWLER, API, ALERT, DEMO)),
    # The extension, on crawler machines
    Setting("MONITOR_ENABLED", "flag", True, (CRAWLER,), "0 turns the monitor off"),
    Setting("MONITOR_REDIS_URL", "redis_url", None, (CRAWLER,),
            "Redis for the metrics only, when it is not the crawl's (default: REDIS_URL)"),
    Setting("MONITOR_INTERVAL", "seconds", 10.0, (CRAWLER, DEMO), "seconds between a node's reports", 1, 86400),
    Setting("MONITOR_NODE_ID", "text", None, (CRAWLER,), "the node's id (default: <spider>:<hostname>:<pid>)"),
    Setting("MONITOR_CONTROL", "flag", True, (CRAWLER,), "0 turns fleet control off on the node"),
    Setting("MONITOR_TOP_DOMAINS", "whole", 20, (CRAWLER,), "domains reported one by one (the rest as 'other')",
            0, 100),
    Setting("MONITOR_ITEM_FIELDS", "list", None, (CRAWLER,),
            "comma-separated item fields whose coverage is reported (default: the first 30 seen)"),
    Setting("MONITOR_VERSION", "text", None, (CRAWLER,), "the spider's version, marked on its charts when it "
            "changes and used to compare runs like for like (default: the spider's version attribute, else a hash "
            "of its source file)"),
    _alert("MONITOR_RUNS_KEEP", "whole", 1000, "run records kept per spider", readers=(CRAWLER, API, ALERT),
           low=1, high=MAX_WHOLE),
    Setting("SCHEDULER", "text", "", (CRAWLER,), "Scrapy's scheduler: a scrapy_redis one has queues to report",
            env=False),
    Setting("SCHEDULER_QUEUE_KEY", "text", "%(spider)s:requests", (CRAWLER,), "scrapy-redis's request queue key",
            env=False),
    Setting("SCHEDULER_DUPEFILTER_KEY", "text", "%(spider)s:dupefilter", (CRAWLER,),
            "scrapy-redis's dupefilter key", env=False),
    Setting("REDIS_START_URLS_AS_SET", "flag", False, (CRAWLER,),
            "scrapy-redis keeps start URLs in a set (published with the key names)", env=False),
    Setting("REDIS_START_URLS_AS_ZSET", "flag", False, (CRAWLER,),
            "scrapy-redis keeps start URLs in a sorted set (published with the key names)", env=False),
    Setting("MONITOR_DEAD_KEEP", "whole", 10000, (CRAWLER,),
            "dead letters (requests failed for good) kept per spider, never by TTL; 0 records none", 0, 1000000),
    # Readers' housekeeping (the API and the alerter)
    _alert("MONITOR_LOST_AFTER", "seconds", 600.0, "seconds a node may be silent without closing before its "
           "run is recorded lost; 0 = never", readers=(API, ALERT)),
    _alert("MONITOR_FINISHED_AFTER", "seconds", 60.0, "seconds a spider's queues must be empty and its live nodes "
           "idle before its crawl is finished", readers=(API, ALERT), low=1),
    Setting("MONITOR_RETENTION", "seconds", 86400.0, (API,),
            "seconds a silent node is kept before it is pruned with its history; 0 keeps them forever"),
    # The API
    Setting("MONITOR_API_HOST", "text", "127.0.0.1", (API, DEMO), "address the API listens on; --host overrides it"),
    Setting("MONITOR_API_PORT", "port", 5000, (API, DEMO), "port the API listens on; --port overrides it"),
    Setting("MONITOR_API_TOKEN", "token", None, (API, DEMO),
            "when set, every route but /health needs 'Authorization: Bearer <token>' or ?token="),
    Setting("MONITOR_API_TOKENS_FILE", "text", None, (API,),
            "a file of 'name role secret' lines (role viewer, operator or admin; secret sha256:<hex> of the token, "
            "or the token), re-read within 5 s of a change"),
    Setting("MONITOR_API_TRUST_LOOPBACK", "flag", True, (API,),
            "0: a tokenless request from this machine may not change data either (set it when a reverse proxy on "
            "this host forwards outside requests)"),
    Setting("MONITOR_API_HOSTS", "list", None, (API,),
            "comma-separated Host names accepted without a token, besides the listening address, localhost and "
            "loopback addresses (others get 400: no DNS rebinding)"),
    Setting("MONITOR_CORS_ORIGINS", "list", "null", (API,),
            "comma-separated origins allowed to read the API from a browser, '*' for any (null: a dashboard "
            "opened as a file; any page can then read a tokenless API)"),
    Setting("MONITOR_API_READONLY", "flag", False, (API,), "1 turns every route that changes data (control, "
            "silences) off"),
    Setting("MONITOR_API_CACHE", "seconds", 1.0, (API,), "seconds a response may be reused; 0 for never", 0, 3600),
    Setting("MONITOR_EVENTS_CLIENTS", "whole", 256, (API,), "GET /events streams open at once at most (each holds "
            "one server thread, kept apart from the other routes' 16); 0 turns /events off", 0, 10000),
    Setting("MONITOR_EVENTS_KEEP", "whole", 10000, (API,), "changes kept in memory for a stream that reconnects "
            "with Last-Event-ID (older: it gets 'reset')", 100, 1000000),
    Setting("MONITOR_EVENTS_DROP", "seconds", 60.0, (API,), "seconds a stream's client may leave sent events unread "
            "before the stream is dropped", 1, 3600),
    Setting("MONITOR_PROMETHEUS_DETAIL", "choice", "spider", (API,), "/prometheus's default level: spider (per "
            "node a core of 12 series, the rest per spider or host) or node (every series per node); ?detail= "
            "overrides it", choices=("spider", "node")),
    Setting("MONITOR_PROMETHEUS_NODE_LABEL", "choice", "id", (API,), "/prometheus's node label: id (the node "
            "id) or nopid (the id without a trailing :<pid>, so a restarted crawler keeps its series); "
            "?node_label= overrides it", choices=("id", "nopid")),
    # The alerter
    _alert("ALERT_RULES", "rules", ",".join(RULE_NAMES), "comma-separated rules to evaluate", choices=RULE_NAMES),
    _alert("ALERT_CPU_PERCENT", "number", 80.0, "cpu: host CPU % over this; 0 = off"),
    _alert("ALERT_MEMORY_PERCENT", "number", 90.0, "memory: host memory % over this; 0 = off"),
    _alert("ALERT_STALL_SECONDS", "seconds", 300.0,
           "stalled: pages not rising this long while the queue is not empty; 0 = off"),
    _alert("ALERT_ERRORS_PER_MIN", "number", 30.0, "errors: error log lines per minute over this; 0 = off"),
    _alert("ALERT_RSS_MB", "number", 2048.0, "rss: process memory (MiB) over this; 0 = off"),
    _alert("ALERT_COVERAGE_MIN", "number", 90.0, "coverage: a MONITOR_ITEM_FIELDS field in less than this % of "
           "items, once 100 are scraped; 0 = off"),
    _alert("ALERT_LATENCY_P95", "number", 10.0, "latency: download latency p95 (seconds) over this; 0 = off"),
    _alert("ALERT_REDIS_MEMORY", "number", 0.9, "redis_memory: Redis's used memory over this share of its limit "
           "(maxmemory, else the machine's memory), 0 to 1; 0 = off", high=1),
    _alert("ALERT_QUEUE_GROWING", "seconds", 1800.0,
           "queue: the spider's queue growing this long while it has live nodes; 0 = off"),
    _alert("ALERT_OK_REASONS", "list", ",".join(OK_REASONS),
           "run: finish reasons of a good run, comma-separated; shell patterns allowed (closespider_*)"),
    _alert("ALERT_RUN_ITEMS_RATIO", "number", 0.5, "run: a run with items below this ratio of its baseline is "
           "bad; 0 = never"),
    _alert("ALERT_FINISHED_ACTION", "choice", "none", "what the fleet does once a spider's crawl is finished: none, "
           "drain or stop", choices=("none", "drain", "stop")),
    _alert("ALERT_ACTIONS", "actions", None, "comma-separated rule=command pairs run once per firing alert on its "
           "target, e.g. errors=pause,memory=stop (commands: pause, resume, stop, drain, slow)"),
    _alert("ALERT_DOMAIN_REFUSALS", "number", 0.2, "domain_refusing: a domain's share of 429/503 answers over "
           "this (after 50 responses); 0 = off", high=1),
    _alert("MONITOR_SLOW_MAX", "seconds", 60.0, "slow: the most a domain's cluster-wide delay doubles to", low=1),
    _alert("ALERT_INTERVAL", "seconds", 60.0, "seconds between evaluations", readers=(ALERT, DEMO)),
    _alert("ALERT_FOR", "seconds", 120.0, "seconds a condition must hold before it fires", attr="for_seconds",
           flag="--for", readers=(ALERT, DEMO)),
    _alert("ALERT_REPEAT", "seconds", 14400.0, "seconds before a still-firing alert is sent again"),
    _alert("ALERT_GIVE_UP", "seconds", 86400.0, "seconds a failing message is retried before it becomes a dead "
           "letter"),
    _alert("ALERT_TO", "list", None, "comma-separated mail recipients; setting it turns mail on"),
    _alert("ALERT_FROM", "text", None, "sender (default: SMTP_USER if it is an address, else alerts@<hostname>)",
           attr="from_addr", flag="--from"),
    _alert("ALERT_WEBHOOK_URL", "http_url", None, "POST each message as JSON here (Slack-compatible)"),
    _alert("ALERT_WEBHOOK_FORMAT", "choice", "slack", "the webhook's body: slack (Slack-compatible) or "
           "alertmanager (Alertmanager's webhook body)", choices=("slack", "alertmanager")),
    _alert("ALERT_ALERTMANAGER_URL", "http_url", None,
           "Alertmanager's base URL: the active alerts are posted to its /api/v2/alerts each evaluation"),
    _alert("ALERT_NOTIFY_URLS", "list", None, "comma-separated Apprise URLs (tgram://, discord://, ...), one "
           "channel each (environment only: they carry tokens)", flag=False),
    _alert("ALERT_DIGEST_AT", "clock", None, "HH:MM: send a daily digest at this time of ALERT_DIGEST_TZ, once a "
           "day per channel whatever the number of alerters (default: no digest)", attr="digest_at"),
    _alert("ALERT_DIGEST_TZ", "zone", "UTC", "the time zone of ALERT_DIGEST_AT (an IANA name: Europe/Paris)",
           attr="digest_tz"),
    _alert("SMTP_HOST", "text", "localhost", "mail server", attr="smtp_host"),
    _alert("SMTP_PORT", "port", None, "mail server port (default 25, 465 with ssl)", attr="smtp_port"),
    _alert("SMTP_SECURITY", "choice", "none", "none, starttls or ssl", attr="smtp_security",
           choices=("none", "starttls", "ssl")),
    _alert("SMTP_USER", "text", None, "log in as this user (no login when unset)", attr="smtp_user"),
    _alert("SMTP_PASSWORD", "text", None, "password for SMTP_USER (environment only)", attr="smtp_password",
           flag=False),
    # The demo crawler's Scrapy project (settings.py)
    Setting("ROBOTSTXT_OBEY", "flag", True, (PROJECT,), "the demo crawler obeys robots.txt"),
    Setting("CONCURRENT_REQUESTS", "whole", 16, (PROJECT,), "the demo crawler's concurrent requests", 1, 10000),
    Setting("MAX_IDLE_TIME_BEFORE_CLOSE", "whole", 0, (PROJECT,),
            "seconds the demo crawler waits on an empty queue before it closes; 0 = never", 0, MAX_WHOLE),
)
SETTING = {s.name: s for s in SETTINGS}


def readers_of(script):
    """The settings ``script`` reads, in table order."""
    return [s for s in SETTINGS if script in s.readers]


# ---------------------------------------------------------------------------- one parser per type

def seconds(name, raw, low=0.0, high=MAX_SECONDS, open_low=False):
    """``raw`` as a finite number of seconds from ``low`` (exclusive with ``open_low``) to ``high``."""
    value = _float(raw)
    low_ok = value > low if open_low else value >= low
    if not (math.isfinite(value) and low_ok and value <= high):
        bound = f"more than {low:g}" if open_low else f"{low:g} or more"
        raise ConfigError(f"{name} must be a number of seconds, {bound} and at most {high:.0f}, not {_shown(raw)}")
    return value


def number(name, raw, low=0.0, high=None):
    """``raw`` as a finite number from ``low`` up to ``high`` (no bound when None)."""
    value = _float(raw)
    if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
        top = f" and at most {high:g}" if high is not None else ""
        raise ConfigError(f"{name} must be a number {low:g} or more{top}, not {_shown(raw)}")
    return value


def whole(name, raw, low=0, high=MAX_WHOLE):
    """``raw`` as a whole number written with digits only (no sign, no underscore), from ``low`` to ``high``."""
    text = str(raw).strip()
    if isinstance(raw, bool) or not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {_shown(raw)}")
    return int(text)


def flag(name, raw):
    """``raw`` as True or False: 1/true/yes/on or 0/false/no/off, in any case; anything else is refused."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ConfigError(f"{name} must be one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, not {_shown(raw)}")


CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])\Z")


def clock(name, raw):
    """``HH:MM`` (24-hour) as ``(hours, minutes)``."""
    found = CLOCK.match(str(raw).strip())
    if not found:
        raise ConfigError(f"{name} must be a time of day as HH:MM (00:00 to 23:59), not {_shown(raw)}")
    return int(found.group(1)), int(found.group(2))


def zone(name, raw):
    """An IANA time zone name (``UTC``, ``Europe/Paris``) as a ZoneInfo."""
    text = str(raw).strip()
    if text.upper() == "UTC":
        return datetime.timezone.utc  # needs no time zone database
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be a time zone name such as UTC or Europe/Paris, not {_shown(raw)}") from None


def split_list(raw):
    """A comma-separated text (or a list, from Scrapy settings) as its non-empty parts, stripped."""
    parts = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
    return [str(part).strip() for part in parts if str(part).strip()]


def choice(name, raw, choices):
    text = str(raw).strip().lower()
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {_shown(raw)}")
    return text


def port(name, raw):
    """``raw`` as a TCP port number, 1 to 65535."""
    try:
        return whole(name, raw, 1, 65535)
    except ConfigError:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {_shown(raw)}") from None


# ---------------------------------------------------------------------------- Redis URLs

# A metrics write gives up after this long: a slow Redis must never hold up a crawl.
REDIS_TIMEOUT = 1.0


def plain_connect(url: str, timeout: float = REDIS_TIMEOUT) -> redis.Redis:
    """A Redis client that fails fast: short socket timeouts and no retries with backoff.

    Clients connect lazily; the URL is checked here, so a malformed one or an option redis-py does not
    know raises ValueError (naming no password) at start rather than an error on every later call. A Sentinel
    or Cluster URL is ``connect``'s."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            driver_info=None,  # no CLIENT SETINFO round trips on connect
        )
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    except (ValueError, TypeError) as exc:
        reason = str(exc)
        unknown = re.search(r"unexpected keyword argument '([^']*)'", reason)
        reason = f"unknown option {unknown.group(1)!r}" if unknown else scrub(reason, url)
        raise ValueError(f"{redact(url)} is not a usable Redis URL ({reason})") from None
    return client


# Query options whose value is a secret (redis-py reads ?password=; webhooks put tokens in queries).
SECRET_OPTIONS = frozenset(("password", "pass", "pw", "token", "secret", "key", "apikey", "api_key",
                            "access_token", "auth", "sig", "signature"))


def redact(url: str) -> str:
    """The URL with any password (``user:pw@``, ``:pw@``, ``?password=``) masked, fit for a log line."""
    try:
        parts = urlsplit(str(url))
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = f"{userinfo.split(':', 1)[0]}:***"
            netloc = f"{userinfo}@{hostport}"
        query = parts.query
        if query:
            query = urlencode([(k, "***" if k.lower() in SECRET_OPTIONS else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
        url = str(url)
        head, sep, rest = url.partition(parts.netloc) if parts.netloc else ("", "", url)
        if query:
            rest = rest.replace(parts.query, query, 1)
        return head + (netloc if sep else "") + rest
    except ValueError:
        return "<unparsable URL>"


def safe_url(url):
    """Scheme and host only: a webhook's path and query are often its secret (Slack, Teams, Discord)."""
    try:
        parts = urlsplit(str(url))
        if "+" in parts.scheme:  # redis+sentinel://, redis+cluster://: host:port[,host:port...]
            return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}/..."
    except ValueError:
        return "<unparsable URL>"


# A URL quoted in a message: scheme://, then anything up to a blank, a quote or an angle bracket.
QUOTED_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s<>\"']+")


def scrub(text: object, *urls: str) -> str:
    """``text`` (an error message, a log record) with each of ``urls`` cut to scheme and host, and every
    other URL it quotes ``redact``-ed: no password, no secret query option."""
    text = str(text)
    for url in urls:
        if url:
            text = text.replace(str(url), safe_url(url))
    return QUOTED_URL.sub(lambda m: redact(m.group(0)), text)


class Outage:
    """Logs a lost service once per outage, and once when it answers again, never once per attempt."""

    def __init__(self, log, level=logging.WARNING):
        self.log = log
        self.level = level
        self.down = False

    def failed(self, message, *args):
        """The service failed: log ``message`` if this starts an outage. Returns True if it did."""
        started = not self.down
        if started:
            self.log.log(self.level, message, *args)
        self.down = True
        return started

    def ok(self, message, *args):
        """The service answered: log ``message`` if an outage ends here."""
        if self.down:
            self.log.info(message, *args)
        self.down = False


def connect(url: str, timeout: float = REDIS_TIMEOUT, retry: Optional[Retry] = None,
            cluster_class=redis.cluster.RedisCluster) -> redis.Redis:
    """``plain_connect`` (a fail-fast client: short timeouts, no retries, the URL checked at once, ValueError
    naming no password) for every Redis URL a setting takes: also ``redis+sentinel://``, the master of a Sentinel
    service (found again after a failover), and ``redis+cluster://``, a Redis Cluster client (``rediss+`` for
    TLS); see ``ha_url``. ``retry`` replaces the default of none (main_spider's queue waits through a failover)."""
    try:
        kind, nodes, path, options = ha_url(url)
        if kind is None:
            return plain_connect(url, timeout)
        plain_connect(options, timeout)  # its credentials and options, checked as a redis:// URL's
    except ValueError as exc:
        reason = str(exc).rpartition(" is not a usable Redis URL ")[2] or f"({exc})"
        raise ValueError(f"{redact(url)} is not a usable Redis URL {reason}") from None
    fast = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry or Retry(NoBackoff(), 0))
    kwargs = {**fast, **redis.connection.parse_url(options)}  # the URL's options win, as for redis://
    tls = kwargs.pop("connection_class", None) is redis.SSLConnection
    for name in ("host", "port", "db", "path"):
        kwargs.pop(name, None)
    if kind == "sentinel":
        service, _, db = path.partition("/")
        sentinel = redis.sentinel.Sentinel(nodes, sentinel_kwargs={**fast, "ssl": tls})
        return sentinel.master_for(service, db=int(db or 0), ssl=tls, **kwargs)
    return LazyCluster(lambda: cluster_class(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes], ssl=tls, **kwargs))


# The URL schemes of highly available Redis: scheme -> (kind, the plain scheme its options are read as).
HA_SCHEMES = {"redis+sentinel": ("sentinel", "redis"), "rediss+sentinel": ("sentinel", "rediss"),
              "redis+cluster": ("cluster", "redis"), "rediss+cluster": ("cluster", "rediss")}


def ha_kind(url) -> Optional[str]:
    """``"sentinel"``, ``"cluster"`` or None (a plain Redis URL) by the URL's scheme."""
    scheme = str(url).partition("://")[0].lower()
    return HA_SCHEMES.get(scheme, (None,))[0]


def ha_url(url):
    """``(kind, [(host, port), ...], path, plain URL)`` of a Redis URL: kind None for a plain one (the rest
    unused); for ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` the sentinels
    and ``service[/db]``; for ``redis+cluster://...`` the seed nodes. The plain URL carries the credentials and
    options (``?socket_timeout=``) for redis-py to read. ValueError (quoting no secret) if malformed."""
    url = str(url)
    kind = ha_kind(url)
    if kind is None:
        return None, [], "", url
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        node = urlsplit(f"//{item}")
        if not node.hostname:
            raise ValueError(f"a {kind} URL needs host:port[,host:port...]")
        nodes.append((node.hostname, node.port or (26379 if kind == "sentinel" else 6379)))
    path = parts.path.strip("/")
    if kind == "sentinel" and not re.fullmatch(r"[^/]+(/\d+)?", path):
        raise ValueError("a sentinel URL needs /service_name[/db] after its hosts")
    if kind == "cluster" and path not in ("", "0"):
        raise ValueError("a cluster URL has no database: a Redis Cluster has only db 0")
    host, port = nodes[0]
    host = f"[{host}]" if ":" in host else host
    plain = f"{HA_SCHEMES[parts.scheme.lower()][1]}://{userinfo}{at}{host}:{port}/0"
    return kind, nodes, path, plain + (f"?{parts.query}" if parts.query else "")


class LazyCluster:
    """A RedisCluster made on first use (its constructor talks to the seeds, so a cluster down at start is an
    outage like any other, not a crash); a failure to make it is a ``redis.ConnectionError``."""

    def __init__(self, make):
        self._make = make
        self._client = None
        self._lock = threading.Lock()

    def cluster(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._make()
                    except redis.exceptions.RedisClusterException as exc:
                        raise redis.ConnectionError(str(exc)) from None
        return self._client

    def __getattr__(self, name):
        return getattr(self.cluster(), name)


def key_prefix(prefix: str, url) -> str:
    """The prefix the monitor's keys are built from: under a cluster URL ``{<prefix>}``, a hash tag that puts
    every key of the monitor in one slot (so each Lua script and MULTI works there); else ``prefix``."""
    if ha_kind(url) == "cluster" and not re.search(r"\{[^}]+\}", prefix):
        return f"{{{prefix}}}"
    return prefix


def redis_url(name, raw):
    """``raw`` if redis-py can build a connection from it (scheme, port, options), checked without connecting;
    a Sentinel or Cluster URL is also ``probe``d."""
    try:
        connect(str(raw))
        probe(str(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return str(raw)


def probe(url, timeout: float = REDIS_TIMEOUT) -> None:
    """ValueError when a Sentinel or Cluster URL names what is not there: a service no answering sentinel
    knows, or a seed node that answers but is not in cluster mode. Silent when nothing answers (an outage,
    handled as one) and for a plain URL. Asks at most ``timeout`` seconds in all, roughly."""
    kind, nodes, path, options = ha_url(url)
    if kind is None:
        return
    given = redis.Redis.from_url(options).connection_pool.connection_kwargs
    kwargs = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                  ssl=options.startswith("rediss:"), driver_info=None)
    if kind == "cluster":  # a sentinel has no password of the master's
        kwargs.update(username=given.get("username"), password=given.get("password"))
    service, answered, deadline = path.partition("/")[0], [], time.monotonic() + 2 * timeout
    for host, port in nodes:
        if time.monotonic() > deadline:
            break
        node = redis.Redis(**{**kwargs, "host": host, "port": port})
        try:
            if kind == "sentinel":
                if node.sentinel_get_master_addr_by_name(service):
                    return
                answered.append(f"{host}:{port}")
            elif node.info("cluster").get("cluster_enabled"):
                return
            else:
                raise ValueError(f"{redact(url)}: {host}:{port} is a Redis without cluster mode; use redis://")
        except redis.RedisError:
            continue
        finally:
            node.close()
    if answered:
        raise ValueError(f"{redact(url)}: no sentinel knows a service {service[:100]!r} "
                         f"(asked {', '.join(answered)})")


def http_url(name, raw):
    """``raw`` if it is http(s) with a host, a valid port and no blank or control character. The message never
    quotes the URL: its path is often its secret."""
    url = str(raw)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        ok = False
    if not ok or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, a valid port and no spaces")
    return url


def token(name, raw):
    text = str(raw)
    if not (text.isascii() and text.isprintable() and text == text.strip()):
        raise ConfigError(f"{name} must be printable ASCII without leading or trailing spaces "
                          "(it travels in an HTTP header)")
    return text


def duration(name, raw, maximum=30 * 86400):
    """``raw`` (a number, or text written ``3600``, ``90.5``, ``90m``, ``2h``, ``1d``: plain decimal digits and one
    unit, no exponent, sign or underscore) as seconds, at least 1 and at most ``maximum``."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    else:
        written = DURATION.match(str(raw).strip().lower())
        value = float(written[1]) * DURATION_UNITS[written[2] or "s"] if written else math.nan
    if not (math.isfinite(value) and 1 <= value <= maximum):
        raise ConfigError(f"{name} must be a duration such as 3600, 90m, 2h or 1d, at least 1 second and at most "
                          f"{maximum / 86400:g} days, not {str(raw)[:50]!r}")
    return value


def rules(name, raw, choices):
    found = [part.lower() for part in split_list(raw)]
    unknown = [rule for rule in found if rule not in choices]
    if unknown:
        raise ConfigError(f"{name}: unknown rule {unknown[0][:50]!r} (rules: {', '.join(choices)})")
    return found


def actions(name, raw, rule_names):
    """``{rule: command}`` from ``rule=command,...``; ConfigError naming an unknown rule or command."""
    found = {}
    for part in split_list(raw):
        rule, eq, command = (x.strip().lower() for x in part.partition("="))
        if not (eq and rule and command):
            raise ConfigError(f"{name} takes rule=command pairs, e.g. errors=pause (not {part[:50]!r})")
        if rule not in rule_names:
            raise ConfigError(f"{name}: unknown rule {rule[:50]!r} (rules: {', '.join(rule_names)})")
        if command not in ACTION_COMMANDS:
            raise ConfigError(f"{name}: unknown command {command[:50]!r} for {rule} "
                              f"(commands: {', '.join(ACTION_COMMANDS)})")
        found[rule] = command
    return found


def _float(raw):
    """``raw`` as a float, or nan (refused by every caller): a bool, or a text Python reads but people do not
    write for a setting (``1_000``)."""
    text = str(raw).strip()
    if isinstance(raw, bool) or "_" in text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _shown(raw):
    return repr(raw if isinstance(raw, (int, float)) else str(raw)[:50])


PARSERS = {
    "seconds": lambda s, raw: seconds(s.name, raw, s.low, MAX_SECONDS if s.high is None else s.high,
                                      s.attr in OPEN_LOW),
    "number": lambda s, raw: number(s.name, raw, s.low, s.high),
    "whole": lambda s, raw: whole(s.name, raw, int(s.low), MAX_WHOLE if s.high is None else int(s.high)),
    "flag": lambda s, raw: flag(s.name, raw),
    "list": lambda s, raw: split_list(raw),
    "choice": lambda s, raw: choice(s.name, raw, s.choices),
    "rules": lambda s, raw: rules(s.name, raw, s.choices),
    "actions": lambda s, raw: actions(s.name, raw, RULE_NAMES),
    "port": lambda s, raw: port(s.name, raw),
    "redis_url": lambda s, raw: redis_url(s.name, raw),
    "http_url": lambda s, raw: http_url(s.name, raw),
    "token": lambda s, raw: token(s.name, raw),
    "text": lambda s, raw: str(raw).strip(),
    "clock": lambda s, raw: clock(s.name, raw),
    "zone": lambda s, raw: zone(s.name, raw),
}
# Settings in seconds (by attribute) that must be more than their low bound, not equal to it.
OPEN_LOW = frozenset(("interval", "give_up"))


# ---------------------------------------------------------------------------- reading

def env(name: str) -> Optional[str]:
    """The environment variable of a declared setting, None when unset or empty (KeyError for a name not in
    SETTINGS: every setting a script reads is declared)."""
    if not SETTING[name].env:
        raise KeyError(f"{name} is a Scrapy setting, not an environment variable")
    value = os.environ.get(name, "")
    return value if value != "" else None


# Environment variables of these families that are no setting are most likely misspelt ones (REDIS_ is left out:
# other tools read their own REDIS_ variables).
FAMILIES = ("MONITOR_", "ALERT_", "SMTP_")


def unknown_settings(environ=None) -> list[str]:
    """One line for each environment variable of the toolkit's families (FAMILIES) that is no setting, with the
    closest setting's name: a misspelt setting would otherwise be ignored without a word."""
    lines, names = [], [s.name for s in SETTINGS if s.env]
    for name in sorted(os.environ if environ is None else environ):
        if not name.startswith(FAMILIES) or name in SETTING:
            continue
        close = [n for n in names if n.startswith(name)] or difflib.get_close_matches(name, names, n=1, cutoff=0.8)
        lines.append(f"{name} is not a setting and is ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return lines


def value(name: str, raw: object = None, label: Optional[str] = None) -> object:
    """A setting's value: ``raw`` (a flag, a Scrapy setting, an app config entry) when given and not empty,
    else its environment variable, else its default; parsed by its kind (ConfigError naming it, or ``label``:
    the flag it came from). A default of None stays None."""
    setting = SETTING[name]._replace(name=label or name)
    if raw is None or raw == "":
        raw = env(name) if setting.env else None
    if raw is None:
        raw = setting.default
        if raw is None:
            return None
    return PARSERS[setting.kind](setting, raw)


def described(script, width=27):
    """``--help``'s environment section for ``script``: one line per setting it reads, with its default."""
    lines = []
    for s in readers_of(script):
        if s.env:
            default = "unset" if s.default in (None, "") else s.default
            if isinstance(default, bool):
                default = int(default)
            elif isinstance(default, float) and default.is_integer():
                default = int(default)
            lines.append(f"  {s.name:{width}} {s.help} (default {default})")
    return "environment:\n" + "\n".join(lines)
