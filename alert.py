"""Alerts for a Scrapy cluster: rules over every node's snapshot, sent by mail, webhook and more, at least once.

``python alert.py`` evaluates the rules every ALERT_INTERVAL seconds (``--once`` for cron, ``--dry-run``
to print instead of send, ``--test-mail``, ``--help`` for every setting). Each rule and node is an alert
that goes inactive -> pending (condition true for less than ALERT_FOR) -> firing -> resolved, as in
Prometheus; a firing alert is sent at once and again every ALERT_REPEAT, its end is sent too, and all that
fires or resolves in one evaluation goes out as one message. State and undelivered messages live in Redis
under ``<prefix>:alert:``, so restarts, cron runs and several alert.py processes send each message once,
unless one dies between a send and its record (then it is sent again). A message refused for good, or
failing for longer than ALERT_GIVE_UP, moves to the dead letters. With no channel set (ALERT_TO,
ALERT_WEBHOOK_URL, ALERT_NOTIFY_URLS), notifications are printed on the console.

The rules are in monitor_rules.py, the channels in monitor_channels.py, the state in monitor_alert_state.py;
this file runs them: configuration, the evaluation loop, delivery and the silence commands.
"""

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import NamedTuple, Optional

import redis

from monitor_acting import SLOW_LUA, act_on_queues, audit_fields, issue_command
from monitor_alert_state import (
    Lock,
    Store,
    add_silence,
    alert_settings,
    delete_silence,
    heartbeat,
    merged,
    oldest_first,
    read_silences,
    silence_from,
)
from monitor_channels import (
    MAX_LINES,
    SEND_DEADLINE,
    Alertmanager,
    channels_for,
    one_line,
    permanent,
    printable,
    send_tests,
    subject,
    text_lines,
    within,
)
from monitor_contract import (
    REFUSAL_STEP,
    as_text,
    dumps,
    loads,
    redis_now,
    refusals_key,
    slow_delays,
    slow_key,
    status_key,
)
from monitor_digest import Digest, due_day, log_notes
from monitor_nodes import NodeReader, gc_paused, gc_tidy, read_snapshots, wrong_type
from monitor_read import QUEUE_WINDOW, forecast_nodes, memo_firsts, parse_histories, queue_histories, spiders_view
from monitor_redis import RedisWatch, node_figures
from monitor_rules import (
    RULE,
    SILENCE_MATCHERS,
    active_rules,
    evaluate,
    fmt,
    iso,
    needs_details,
    next_delay,
    refusal_shares,
    refusal_starts,
    run_alerts,
    span,
    with_details,
)
from monitor_settings import (
    ALERT,
    ConfigError,
    Outage,
    Parser,
    connect,
    duration,
    env,
    exit_config_error,
    ha_kind,
    key_prefix,
    readers_of,
    redact,
    unknown_settings,
    value,
)

logger = logging.getLogger(__name__)

# A failed delivery is retried 1, 2, 4, 8... evaluations later, but at least every BACKOFF_MAX seconds;
# the doubling stops after BACKOFF_STEPS, so no stored attempt count can overflow it.
BACKOFF_MAX = 900
BACKOFF_STEPS = 16
# The settings alert.py reads (monitor_settings.SETTINGS), in --help's order.
SETTINGS = readers_of(ALERT)
# The spider figures the spider-level rules read (besides node counts and the queue forecast): the queue's, and
# the crawl's totals that the finished rule sends.
SPIDER_RULE_FIELDS = ("queue_requests", "queue_start_urls", "pages", "items", "errors", "dead")
# A send needs the lock for SEND_DEADLINE and this many seconds more, else it renews the lock first.
LOCK_MARGIN = 5
# Mail settings: any of them set asks for mail, which needs ALERT_TO.
SMTP_VARS = ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USER", "SMTP_PASSWORD")


# ---------------------------------------------------------------------------- configuration

def build_parser():
    parser = Parser(
        prog="alert.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag defaults to its environment variable (shown in brackets), then to the default.\n"
               "SMTP_PASSWORD and ALERT_NOTIFY_URLS (comma-separated Apprise URLs, e.g. tgram://..., each a\n"
               "channel) are read from the environment only. With no ALERT_TO, ALERT_WEBHOOK_URL or\n"
               "ALERT_NOTIFY_URLS, notifications are printed here. Redis keys: <prefix>:alert:state, :stall,\n"
               ":outbox, :lock, :dead (dead letters), :dead_total, :silences, :heartbeat, :runs (the run rule's\n"
               "cursor), and <key>:aside for a key set aside as unusable.",
    )
    parser.add_argument("--once", action="store_true", help="evaluate once and exit (for cron)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be sent; send nothing, store nothing")
    parser.add_argument("--test-mail", action="store_true", help="send one test message and exit")
    add_silence_flags(parser)
    for s in SETTINGS:
        if s.flag:
            shown = f"{s.name}, default {_shown(s.default)}" if s.default is not None else s.name
            parser.add_argument(s.flag, dest=s.attr, metavar=s.name, help=f"{s.help} [{shown}]".replace("%", "%%"))
    return parser


def _shown(default):
    return int(default) if isinstance(default, float) and default.is_integer() else default


def load_config(argv=None):
    """Flags over environment over defaults, checked: returns the parsed arguments or raises ConfigError."""
    args = build_parser().parse_args(argv)
    silencing = args.silence is not None
    args.silence_for, args.for_seconds = (args.for_seconds, None) if silencing else (None, args.for_seconds)
    given = set()
    for s in SETTINGS:
        raw = getattr(args, s.attr, None)
        if raw not in (None, "") or env(s.name) is not None:
            given.add(s.name)
        setattr(args, s.attr, value(s.name, raw))
    args.prefix = key_prefix(args.prefix, args.redis_url)  # {prefix} under a cluster URL
    check_channels(args)
    check_silence_flags(args)
    if args.smtp_port is None:
        args.smtp_port = 465 if args.smtp_security == "ssl" else 25
    if args.smtp_password and not args.smtp_user:
        raise ConfigError("SMTP_PASSWORD is set but SMTP_USER is not")
    if not args.to and (given & set(SMTP_VARS) or args.test_mail and not (args.webhook_url or args.notify_urls)):
        raise ConfigError("ALERT_TO is not set: mail needs at least one recipient")
    if not args.from_addr:
        user = args.smtp_user or ""
        args.from_addr = user if "@" in user else f"alerts@{socket.gethostname()}"
    return args


def check_channels(args):
    """ConfigError for an ALERT_NOTIFY_URLS entry Apprise cannot use (naming only its scheme)."""
    if args.notify_urls:
        import apprise  # here: only alert.py processes with ALERT_NOTIFY_URLS pay for it

        logging.getLogger("apprise").setLevel(logging.CRITICAL + 1)  # its lines can quote a URL's token
        for url in args.notify_urls:
            if apprise.Apprise.instantiate(url) is None:
                scheme = url.partition("://")[0][:20] if "://" in url else "(no scheme)"
                raise ConfigError(f"ALERT_NOTIFY_URLS: an Apprise URL of scheme {scheme!r} is not usable "
                                  "(unknown service, or missing parts)")


def add_silence_flags(parser):
    parser.add_argument("--silence", action="append", metavar="LABEL=VALUE",
                        help="add a silence for alerts matching these labels (node, spider, host, rule; "
                             "comma-separated or repeated) for --for (3600, 90m, 2h, 1d), print its id and exit")
    parser.add_argument("--comment", help="the silence's comment (with --silence)")
    parser.add_argument("--silences", action="store_true", help="list the active silences and exit")
    parser.add_argument("--unsilence", metavar="ID", help="delete a silence and exit")


def check_silence_flags(args):
    """The silence commands' flags, checked before anything connects: one command at a time, not with --once,
    --dry-run or --test-mail; --silence's matchers (LABEL=VALUE, known labels, each once, no empty one) and its
    --for duration; --unsilence's id."""
    given = [flag for flag, on in (("--silence", args.silence is not None), ("--silences", args.silences),
                                   ("--unsilence", args.unsilence is not None)) if on]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]} are separate commands: give one")
    loop = [flag for flag, on in (("--once", args.once), ("--dry-run", args.dry_run),
                                  ("--test-mail", args.test_mail)) if on]
    if given and loop:
        raise ConfigError(f"{given[0]} does not go with {loop[0]}: it changes the silences and exits")
    if args.comment is not None and args.silence is None:
        raise ConfigError("--comment goes with --silence")
    if args.unsilence is not None:
        sid = args.unsilence.strip()
        if not (sid and len(sid) <= 100 and sid.isprintable()):
            raise ConfigError("--unsilence needs a silence id (see --silences)")
        args.unsilence = sid
    if args.silence is not None:
        args.silence = silence_matchers(args.silence)
        if args.silence_for is None:
            raise ConfigError("--silence needs --for, e.g. --for 2h")
        args.silence_for = duration("--for", args.silence_for)


def silence_matchers(flags):
    """``{label: value}`` from --silence flags (``LABEL=VALUE``, comma-separated or repeated); ConfigError for an
    empty or malformed matcher, an unknown label or a label given twice."""
    matchers = {}
    for part in (part.strip() for flag in flags for part in flag.split(",")):
        label, eq, value = part.partition("=")
        label, value = label.strip(), value.strip()
        if not (eq and label and value):
            raise ConfigError("--silence takes LABEL=VALUE pairs, e.g. --silence spider=main_spider "
                              f"(not {part[:50]!r})")
        if label not in SILENCE_MATCHERS:
            raise ConfigError(f"--silence: unknown matcher {label[:50]!r}: matchers are {', '.join(SILENCE_MATCHERS)}")
        if label in matchers:
            raise ConfigError(f"--silence: {label} is given twice ({matchers[label][:50]!r} and {value[:50]!r})")
        matchers[label] = value
    return matchers


# ---------------------------------------------------------------------------- delivery

class Delivery:
    """Sends the outbox, oldest first per channel. A message refused for good, or failing for ALERT_GIVE_UP,
    becomes a dead letter; a failing one is retried with backoff, its channel's later messages waiting
    behind it, so they arrive in order."""

    def __init__(self, cfg, store, lock, channels):
        self.cfg, self.store, self.lock, self.channels = cfg, store, lock, channels
        self.secrets = (cfg.webhook_url, cfg.redis_url)

    def run(self, now, entries=None, release=False):
        """Send what is due of the outbox (``entries`` as ``Store.outbox`` returns them, read here when None).
        Each send's outcome is settled in one step, which renews the lock (so a send right after needs no renewal
        of its own), or with ``release`` releases it after the last message to send (as planned: a failed one
        leaves that to the caller)."""
        due = self.due(self.store.outbox(now) if entries is None else entries, now)
        last = due[-1][0] if release and due else None
        failed = set()  # channels whose send failed now: their later messages wait behind it
        for field, entry, channel in due:
            if channel is None:
                gone = self.dead(field, entry, f"channel {entry['channel']!r} is no longer configured", now)
                if not self.store.settle("outbox", {field: None}, [gone], release=field == last):
                    return self.lost()
                continue
            if channel.name in failed:
                continue
            if not self.lock.held_for(SEND_DEADLINE + LOCK_MARGIN) and not self.lock.renew():
                return self.lost()
            update, dead = self.attempt(channel, field, entry, now)
            if not self.store.settle("outbox", {field: update}, dead, release=field == last and not update):
                return self.lost()
            if update:
                failed.add(channel.name)

    def due(self, entries, now):
        """``[(field, entry, its channel or None)]`` of the outbox entries to settle now, in order: a channel sends
        in order, so its messages behind one not yet due wait; a message to a channel no longer configured is
        due (as a dead letter)."""
        blocked, out = set(), []
        for field, entry in entries:
            channel = self.channels.get(entry["channel"])
            if channel is not None and (channel.name in blocked or entry["next_try"] > now):
                blocked.add(channel.name)
            else:
                out.append((field, entry, channel))
        return out

    def lost(self):
        logger.warning("Alert: lost the evaluation lock; delivery stops here, the lock's holder goes on")

    def attempt(self, channel, field, entry, now):
        """Send one message: ``(its outbox entry from now on or None, dead letters)``."""
        count = len(entry["alerts"])
        try:
            refused = within(SEND_DEADLINE, channel.send, entry["alerts"], self.cfg.prefix, entry.get("to"))
        except Exception as exc:  # noqa: BLE001 - any failure is either permanent or retried
            reason = one_line(exc, *self.secrets)
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
                                    f"{channel.describe()} failing for {span(now - entry['created'])} "
                                    f"({attempts:g} attempts): {reason}", now)]
        # Due again 1, 2, 4... evaluations later: half an interval early absorbs timer jitter.
        wait = min(self.cfg.interval * 2 ** min(attempts - 1, BACKOFF_STEPS), BACKOFF_MAX)
        logger.warning("Alert: %s failed (attempt %d, next try in %ds, %d alert(s) kept): %s",
                       channel.describe(), attempts, round(wait), len(entry["alerts"]), reason)
        return {**entry, "attempts": attempts, "next_try": now + max(wait - self.cfg.interval / 2, 0)}, []

    def dead(self, field, entry, reason, now):
        """A dead letter for an outbox entry; it keeps the first MAX_LINES alerts, as its text would."""
        alerts = entry["alerts"]
        return {"at": now, "key": self.store.key["outbox"], "field": as_text(field),
                "reason": f"{len(alerts)} alert(s) not sent: {reason}",
                "value": {**entry, "alerts": alerts[:MAX_LINES], "alert_count": len(alerts)}}


# ---------------------------------------------------------------------------- the alerter

class WrongTypeError(Exception):
    """The status key holds another Redis type than a hash: named, never taken for an outage."""


class Outcome(NamedTuple):
    """What one evaluation decided (``Alerter.evaluate_once``): changes to store and notifications to send."""

    state_changes: dict
    stall_changes: dict
    notes: list
    runs_cursor: Optional[int]
    spiders: Optional[dict] = None  # the spider views judged (with their per-domain refusals)


def spider_views(r, nodes, prefix, now, cfg, histories=None, memo=None):
    """``{spider: cluster view with queue forecast}`` for the spider-level rules; empty when none is on
    (then their alerts resolve). ``histories``: the forecasts' histories read already (``queue_forecasts``);
    ``memo``: ``spiders_view``'s, kept between evaluations."""
    if not any(rule.scope == "spider" for rule in active_rules(cfg)):
        return {}
    return spiders_view(nodes, r, prefix, now, cfg.finished_after, fields=SPIDER_RULE_FIELDS, memo=memo,
                        histories=histories)


class Alerter:
    """Evaluates the rules against Redis under the lock, queues what they send and delivers the queue.
    With ``dry_run`` it evaluates the same way, keeps its state in memory and prints what it would send."""

    def __init__(self, cfg, client=None, channels=None, dry_run=False, out=None):
        self.cfg = cfg
        self.r = client or connect(cfg.redis_url)
        self.out = out or sys.stdout
        self.channels = channels_for(cfg, self.out) if channels is None else channels
        self.lock = Lock(self.r, cfg.prefix)
        self.store = Store(self.r, cfg.prefix, None if dry_run else self.lock)
        self.delivery = Delivery(cfg, self.store, self.lock, self.channels)
        self.dry_run = DryRun(self) if dry_run else None
        self.reader = NodeReader(self.r, cfg.prefix, 0, 0 if dry_run else cfg.lost_after, cfg.runs_keep, slim=True)
        self.spider_memo = {}  # spiders_view's: a spider whose nodes did not change is not combined again
        self.unreachable = Outage(logger, logging.ERROR)
        self.broken = Outage(logger, logging.ERROR)
        self.refused = Outage(logger, logging.ERROR)
        self.malformed = 0
        self.alertmanager = Alertmanager(cfg) if cfg.alertmanager_url else None
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.redis_watch = RedisWatch(self.r, cfg.prefix, ha_kind(cfg.redis_url) == "cluster")
        self.evicted = {}  # master address -> its evicted_keys at the previous evaluation
        self.answering_since = None  # Redis's time it answered again after an outage or failover seen here
        self.recovering = False
        self.settings = alert_settings(cfg)
        self.digest = Digest(self.r, cfg, self.channels) if cfg.digest_at and not dry_run else None
        self.actions = dict(cfg.actions or {})
        if cfg.finished_action != "none":
            self.actions.setdefault("finished", cfg.finished_action)
        self.clock = None  # Redis's clock less this machine's at the last evaluation: the refusal buckets to read
        self.queued_buckets = []  # the starts of the refusal buckets queued on the evaluation's read
        self.forecast = ([], 0)  # (nodes, rows) whose histories the queue forecasts read last time
        self.window = max(cfg.for_seconds or 0, cfg.interval)

    def tick(self, now=None):
        """One evaluation and delivery; whatever goes wrong is logged and the next tick tries again.
        True when the evaluation ran."""
        url, once = self.cfg.redis_url, self.cfg.once

        def then(until):
            return "exiting (--once)" if once else f"no evaluation until it {until}"

        try:
            self.run_once(now)
        except redis.WatchError:
            logger.warning("Alert: lost the evaluation lock to another alert.py; nothing written")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.recovering = True  # a failover too breaks the connection: down is judged anew once back
            self.unreachable.failed("Alert: cannot reach Redis at %s (%s); " + then("answers"),
                                    redact(url), one_line(exc, url))
            return False
        except WrongTypeError as exc:
            self.broken.failed("Alert: %s; " + then("is fixed"), exc)
            return False
        except redis.ResponseError as exc:  # NOPERM, OOM, LOADING, a database the server does not have...
            self.refused.failed("Alert: Redis at %s refused the evaluation (%s); " + then("accepts"),
                                redact(url), one_line(exc, url))
            return False
        except Exception:  # noqa: BLE001 - the alerter must outlive any bug or odd data
            logger.exception("Alert: evaluation failed; %s", "exiting (--once)" if once else
                             f"trying again in {fmt(self.cfg.interval)}s")
            return False
        self.unreachable.ok("Alert: Redis at %s is back", redact(url))
        self.broken.ok("Alert: %s is readable again", status_key(self.cfg.prefix))
        self.refused.ok("Alert: Redis at %s accepts the evaluation again", redact(url))
        return True

    def run_once(self, now=None):
        """Evaluate and deliver due messages; returns this evaluation's notifications, or None when another
        alert.py holds the lock (it does the work). The clock is Redis's, unless ``now`` is given (tests)."""
        if self.dry_run:
            return self.dry_run.run(*self.read_nodes(now))
        replies = self.lock_and_read(now)
        if replies is None:
            logger.debug("Alert: another alert.py is evaluating; skipping")
            return None
        try:
            replies, extra = replies[:self.reader.queued + Store.QUEUED], replies[self.reader.queued + Store.QUEUED:]
            try:
                nodes, now = self.read_nodes(now, replies[:self.reader.queued])
                self.clock = now - time.time()
                if self.recovering:
                    self.answering_since, self.recovering = now, False
            except WrongTypeError:
                self.delivery.run(time.time() if now is None else now)  # what is queued still goes out
                raise
            reading = self.store.parse(replies[self.reader.queued:], now)
            with gc_paused():
                outcome = self.evaluate_once(nodes, now, reading, self.extras(extra, now))
            deliver = bool(reading.outbox or outcome.notes and self.channels)
            digest = self.digest and due_day(now, self.cfg.digest_at, self.cfg.digest_tz) is not None
            written = self.record(outcome, reading, now, release=not (deliver or digest))
            if deliver:
                messages = None if reading.messages is None else oldest_first(
                    reading.messages + [(field.encode(), loads(text)) for field, text in written.items()])
                self.delivery.run(now, messages, release=not digest)
            if digest and self.lock.renew():
                self.digest.run(now)
            return outcome.notes
        finally:
            self.lock.release()

    def lock_and_read(self, now=None):
        """Take the evaluation lock and read everything the evaluation needs, in one round trip: the replies
        (the node reader's, the store's, then ``queue_extras``'), or None when another alert.py holds the lock.
        ``now``: the evaluation's time when given (tests), else Redis's clock as the last evaluation saw it."""
        with self.r.pipeline(transaction=False) as pipe:
            token = self.lock.queue(pipe)
            self.reader.queue(pipe)
            self.store.queue(pipe)
            self.queue_extras(pipe, now)
            took, *replies = pipe.execute(raise_on_error=False)
        if isinstance(took, Exception):
            raise took
        if self.lock.took(took, token):
            return replies
        if not self.lock.acquire():  # held, or a lock that never expires set aside: then ours now
            return None
        with self.r.pipeline(transaction=False) as pipe:  # read again now that the lock is ours
            self.reader.queue(pipe)
            self.store.queue(pipe)
            self.queue_extras(pipe, now)
            return pipe.execute(raise_on_error=False)

    def queue_extras(self, pipe, now=None):
        """Queue on the evaluation's read what else it needs: the queue forecasts' histories of the nodes they
        read last time (the same ones, unless a node came or went), the refusal buckets of the window ending at
        ``now`` (else at Redis's time as the last evaluation saw its clock, a bucket more each side; none at
        first: ``add_refusals`` reads them), and INFO for the Redis rules on one server (on a cluster each master's
        INFO is one more round trip, see ``redis_views``). ``extras`` parses the replies."""
        nodes, rows = self.forecast
        queue_histories(pipe, nodes, QUEUE_WINDOW / 60, self.cfg.prefix, rows)
        self.queued_buckets = []
        if RULE["domain_refusing"] in active_rules(self.cfg) and (now is not None or self.clock is not None):
            self.queued_buckets = refusal_starts(now, self.window) if now is not None else refusal_starts(
                time.time() + self.clock, self.window, REFUSAL_STEP)
        self.queue_buckets(pipe, self.queued_buckets)
        if self.info_in_read():
            pipe.execute_command("INFO")

    def info_in_read(self):
        """Whether INFO goes with the evaluation's read: a Redis rule is on and Redis is one server (not a
        cluster, whose masters each answer their own INFO; not Sentinel, whose master is named by a sentinel)."""
        if self.redis_watch.cluster or not any(rule.scope == "redis" for rule in active_rules(self.cfg)):
            return False  # a cluster client has no connection pool of its own
        pool = self.r.connection_pool
        return not hasattr(pool, "get_master_address") and hasattr(pool, "connection_kwargs")

    def extras(self, replies, now):
        """``(histories read as queue_forecasts takes them, INFO reply or None, {refusal bucket start: its hash})``
        from ``queue_extras``' replies."""
        nodes, rows = self.forecast
        histories = (rows, parse_histories(nodes, replies[:len(nodes)], QUEUE_WINDOW / 60, now))
        read = len(nodes) + len(self.queued_buckets)
        return histories, (replies[read] if len(replies) > read else None), \
            bucket_hashes(self.queued_buckets, replies[len(nodes):read])

    def read_nodes(self, now=None, replies=None):
        """``({node: snapshot with state}, now)``: states judged on Redis's clock, or at ``now`` if given;
        from ``replies`` to the reader's queued commands when given."""
        try:
            nodes, bad, now = self.reader.read(now) if replies is None else self.reader.parse(replies, now)
        except redis.ResponseError as exc:
            key = status_key(self.cfg.prefix)
            if "WRONGTYPE" not in str(exc):
                raise
            raise WrongTypeError(wrong_type(self.r, [(key, "hash")]) or f"{key}: {exc}") from None
        if bad != self.malformed:
            logger.warning("Alert: %d malformed snapshot(s) in %s ignored", bad, status_key(self.cfg.prefix))
            self.malformed = bad
        return nodes, now

    def evaluate_once(self, nodes, now, reading, extras=(None, None, None)):
        """The one evaluation, for the real loop and the dry run alike: every rule over the nodes and spiders,
        then the runs recorded since the cursor. ``extras``: what the evaluation's read brought besides
        (``extras``). Returns an Outcome; stores and sends nothing."""
        histories, info, buckets = extras
        spiders = spider_views(self.r, nodes, self.cfg.prefix, now, self.cfg, histories, self.spider_memo)
        if spiders:  # each spider's forecast node, found by the views
            chosen, rows = forecast_nodes(nodes, memo_firsts(self.spider_memo))
            self.forecast = (sorted(chosen.values()), rows)
        self.add_refusals(now, spiders, buckets or {})
        state_changes, stall_changes, notes = evaluate(nodes, reading.state, reading.stall, now, self.cfg,
                                                       reading.silences, spiders, self.answering_since,
                                                       self.redis_views(info))
        if needs_details(notes):  # the nodes were read slim: a message's error sample is read now
            with_details(notes, state_changes, read_snapshots(self.r, self.cfg.prefix, needs_details(notes), now,
                                                              full=True))
        run_notes, cursor = run_alerts(reading.recent, reading.runs_cursor, self.cfg)
        return Outcome(state_changes, stall_changes, notes + run_notes, cursor, spiders)

    def add_refusals(self, now, spiders, buckets):
        """Each spider view gains ``refusals``: its domains' share of 429/503 answers over the window (ALERT_FOR, at
        least one ALERT_INTERVAL, at most REFUSAL_KEEP), from the refusal buckets the nodes added to (``buckets``:
        those read already, by start; the others are read here)."""
        if not spiders or RULE["domain_refusing"] not in active_rules(self.cfg):
            return
        starts = refusal_starts(now, self.window)
        missing = [start for start in starts if start not in buckets]
        if missing:
            with self.r.pipeline(transaction=False) as pipe:
                self.queue_buckets(pipe, missing)
                buckets = {**buckets, **bucket_hashes(missing, pipe.execute(raise_on_error=False))}
        shares = refusal_shares(buckets.get(start, {}) for start in starts)
        for spider, view in spiders.items():
            view["refusals"] = shares.get(spider, {})

    def queue_buckets(self, pipe, starts):
        """Queue the read of the refusal buckets starting at ``starts`` (``bucket_hashes`` takes the replies)."""
        for start in starts:
            pipe.hgetall(refusals_key(self.cfg.prefix, start))

    def slow_changes(self, spiders, state, now):
        """The ``slow`` action (ALERT_ACTIONS domain_refusing=slow): ``[(domain, old delay, new delay, its stored
        JSON or '', share)]`` for the domains whose cluster-wide delay changes now (``next_delay``)."""
        if self.actions.get("domain_refusing") != "slow" or not spiders:
            return []
        totals, allowed = {}, set()
        for spider, view in spiders.items():
            record = state.get(f"domain_refusing:{spider}") or {}
            firing = record.get("state") == "firing" and not record.get("silenced")
            for name, d in (view.get("refusals") or {}).items():
                seen, refused = totals.get(name, (0, 0.0))
                totals[name] = (seen + d["responses"], refused + d["share"] * d["responses"])
                if firing and d["responses"] >= 1 and d["share"] > self.cfg.domain_refusals:
                    allowed.add(name)
        current = {}
        for field, raw in self.r.hgetall(slow_key(self.cfg.prefix)).items():
            name = as_text(field)
            if name in slow_delays({field: raw}):
                current[name] = json_or_empty(raw)
        out = []
        for name in sorted(set(totals) | set(current)):
            seen, refused = totals.get(name, (0, 0.0))
            share = refused / seen if seen else 0.0
            old = current.get(name, {})
            delay, changed = old.get("delay"), old.get("changed", 0)
            new, when = next_delay(delay, changed if isinstance(changed, (int, float)) else 0, share, seen,
                                   self.cfg.domain_refusals, name in allowed, now, self.window, self.cfg.slow_max)
            if new != delay:
                stored = dumps({"delay": new, "changed": round(when, 3), "by": "domain_refusing"}) if new else ""
                out.append((name, delay, new, stored, share))
        return out

    def redis_views(self, info=None):
        """``{master address: INFO figures + evicted}`` for the Redis rules, ``evicted`` being the keys evicted
        since the previous evaluation (0 at the first); None when INFO is refused (renamed away); empty when no Redis
        rule is on (then INFO is not read). ``info``: the one server's INFO reply, read with the evaluation's
        (``queue_extras``); else INFO is read here, a round trip per master."""
        if not any(rule.scope == "redis" for rule in active_rules(self.cfg)):
            return {}
        try:
            if isinstance(info, Exception):
                raise info
            infos = self.redis_watch.infos(info)
        except redis.ResponseError:
            return None
        views = {}
        for name, info in infos.items():
            views[name] = view = node_figures(info)
            total = view["evicted_keys"] if isinstance(view["evicted_keys"], int) else 0
            view["evicted"] = max(total - self.evicted.get(name, total), 0)
            self.evicted[name] = total
        return views

    def record(self, outcome, reading, now, release=False):
        """Store an evaluation's outcome with the heartbeat and queue its messages, one per channel, in one
        write (which releases the lock with ``release``). Returns the messages queued: ``{field: JSON}``."""
        entries = {}
        for name in self.channels if outcome.notes else ():
            entries[f"{now:.3f}:{uuid.uuid4().hex[:8]}:{name}"] = dumps(
                {"channel": name, "created": now, "attempts": 0, "next_try": now, "alerts": outcome.notes})
        cursor = outcome.runs_cursor if outcome.runs_cursor != reading.runs_cursor else None  # written if moved
        self.store.write(outcome.state_changes, outcome.stall_changes, entries, cursor,
                         heartbeat(now, self.cfg.interval, self.who, self.settings), reading.expired, release)
        if self.alertmanager:
            self.alertmanager.sync(merged(reading.state, outcome.state_changes), outcome.notes, now)
        if outcome.notes:
            logger.info("Alert: %s", subject(outcome.notes, self.cfg.prefix))
            if self.digest:
                log_notes(self.r, self.cfg.prefix, outcome.notes, now)
        self.slow(outcome.spiders, merged(reading.state, outcome.state_changes), now)
        for command, target, note in self.due_actions(outcome.notes):
            try:
                entry = issue_command(self.r, self.cfg.prefix, command, target, who="alerter", via=note["rule"],
                                      comment=note["summary"][:500])
            except redis.RedisError as exc:
                logger.error("Alert: could not %s %s for rule %s: %s", command, target, note["rule"],
                             one_line(exc, self.cfg.redis_url))
                continue
            logger.info("Alert: rule %s: %s %s (command %d)", note["rule"], command, target, entry["id"])
        return entries

    def slow(self, spiders, state, now):
        """Store the cluster-wide delays that change now (``slow_changes``), each logged in the control log as
        ``slow`` of ``domain:<name>`` by the alerter, and audited."""
        for name, old, new, stored, share in self.slow_changes(spiders, state, now):
            target, via = f"domain:{name}", "domain_refusing"
            comment = f"delay {fmt(old or 0)} s -> {fmt(new or 0)} s; 429/503 share {fmt(share * 100)}%"
            entry = {"command": "slow", "target": target, "who": "alerter", "from": "", "via": via, "comment": comment}
            audit = audit_fields("alerter", "control.slow", target, comment, via)
            try:
                act_on_queues(self.r, self.cfg.prefix, SLOW_LUA, [slow_key(self.cfg.prefix)],
                              [name, stored, dumps(new)], entry, audit)
            except redis.RedisError as exc:
                logger.error("Alert: could not slow %s: %s", name, one_line(exc, self.cfg.redis_url))
                continue
            logger.info("Alert: rule domain_refusing: %s %s", name, comment)

    def due_actions(self, notes):
        """``[(command, target, note)]``: ALERT_ACTIONS (and ALERT_FINISHED_ACTION) of the alerts that started
        firing in this evaluation (never a repeat; a silenced alert sends nothing, so it acts on nothing), on the
        alert's node, or its spider for a spider-level rule."""
        out = []
        for note in notes:
            command = self.actions.get(note["rule"])
            if command and command != "slow" and note["status"] == "firing" and not note["repeat"]:
                scope = RULE[note["rule"]].scope if note["rule"] in RULE else "node"
                out.append((command, f"{scope}:{note['node']}", note))
        return out


class DryRun:
    """--dry-run: evaluates as the real thing does (``Alerter.evaluate_once``), prints what it would send;
    sends and stores nothing: its state lives in memory between evaluations."""

    def __init__(self, alerter):
        self.alerter = alerter
        self.memory = None  # (state, stall, runs cursor) after the last evaluation, instead of in Redis
        self.last_summary = None  # a loop prints a summary line when it changes

    def run(self, nodes, now):
        alerter, out = self.alerter, self.alerter.out
        reading = alerter.store.read(now)
        if self.memory is not None:
            reading = reading._replace(state=self.memory[0], stall=self.memory[1], runs_cursor=self.memory[2])
        outcome = alerter.evaluate_once(nodes, now, reading)
        notes = outcome.notes
        self.memory = (merged(reading.state, outcome.state_changes), merged(reading.stall, outcome.stall_changes),
                       outcome.runs_cursor)
        firing = sum(r["state"] == "firing" for r in self.memory[0].values())
        summary = (f"{len(nodes)} node(s), {firing} firing, {len(self.memory[0]) - firing} pending, "
                   f"{alerter.store.queued()} message(s) waiting in {alerter.store.key['outbox']}")
        if notes or summary != self.last_summary:
            print(f"dry run at {iso(now)}: {summary}", file=out)
            if not notes:
                print("nothing would be sent", file=out)
        self.last_summary = summary
        for channel in alerter.channels.values() if notes else ():
            print(f"would send to {channel.describe()}:\n  subject: {subject(notes, alerter.cfg.prefix)}", file=out)
            for line in text_lines(notes):
                print(f"  {line}", file=out)
        for command, target, note in alerter.due_actions(notes):
            print(f"would {command} {target} (rule {note['rule']}, as alerter)", file=out)
        for name, old, new, _, share in alerter.slow_changes(outcome.spiders, self.memory[0], now):
            print(f"would slow domain:{name}: delay {fmt(old or 0)} s -> {fmt(new or 0)} s (429/503 share "
                  f"{fmt(share * 100)}%)", file=out)
        out.flush()
        return notes


def bucket_hashes(starts, replies):
    """``{start: hash}`` of the refusal buckets read (``Alerter.queue_buckets``): a bucket of another type, whose
    reply is an error, counts nothing."""
    return {start: reply for start, reply in zip(starts, replies) if isinstance(reply, dict)}


def json_or_empty(raw):
    """A stored JSON object, or {} when it is not one."""
    try:
        value = loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------- silences from the command line

def silences_command(cfg):
    """--silence, --silences, --unsilence: 0 done, 1 Redis failed, 2 bad input or no such silence."""
    r = connect(cfg.redis_url)
    try:
        now = redis_now(r.time())
        who = f"alert.py on {socket.gethostname()}"
        if cfg.silence is not None:
            try:
                silence = silence_from({"matchers": cfg.silence, "duration": cfg.silence_for,
                                        "comment": cfg.comment or ""}, now, who)
                sid = add_silence(r, cfg.prefix, silence)
            except ValueError as exc:
                return exit_config_error("alert.py", exc)
            print(f"{sid} until {iso(silence['until'])}")
        elif cfg.unsilence is not None:
            if not delete_silence(r, cfg.prefix, cfg.unsilence, who):
                print(f"alert.py: error: no silence {cfg.unsilence[:50]!r} (see --silences)", file=sys.stderr)
                return 2
            print(f"deleted {cfg.unsilence}")
        else:
            found = read_silences(r, cfg.prefix, now)
            for sid, s in found.items():
                matchers = ",".join(f"{k}={v}" for k, v in s["matchers"].items())
                comment = f": {s['comment']}" if s.get("comment") else ""
                print(printable(f"{sid} {matchers} until {iso(s['until'])} by {s.get('who')}{comment}"))
            if not found:
                print("no active silences")
    except redis.RedisError as exc:
        print(f"alert.py: error: Redis at {redact(cfg.redis_url)}: {one_line(exc, cfg.redis_url)}",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        return exit_config_error("alert.py", exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    alerter = Alerter(cfg, dry_run=cfg.dry_run)
    channels = "; ".join(c.describe() for c in alerter.channels.values())
    if cfg.silence is not None or cfg.silences or cfg.unsilence is not None:
        return silences_command(cfg)
    if cfg.test_mail:
        if cfg.dry_run:
            print(f"would send a test message by {channels}")
            return 0
        return 1 if send_tests(alerter.channels.values(), cfg.prefix, alerter.delivery.secrets) else 0
    logger.info("Alert: watching %s at %s %s (rules: %s; %s)",
                status_key(cfg.prefix), redact(cfg.redis_url), "once" if cfg.once else f"every {fmt(cfg.interval)}s",
                ",".join(cfg.rules) or "none", "dry run: nothing is sent" if cfg.dry_run else channels)
    for line in unknown_settings():
        logger.warning("Alert: %s", line)
    if not (cfg.to or cfg.webhook_url or cfg.notify_urls or cfg.dry_run):
        logger.warning("Alert: no channel configured (ALERT_TO, ALERT_WEBHOOK_URL, ALERT_NOTIFY_URLS): %s",
                       "each notification is printed here; alerts are posted to Alertmanager" if cfg.alertmanager_url
                       else "nothing is sent, each notification is printed here")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while True:
            started = time.monotonic()
            ok = alerter.tick()
            if cfg.once:
                return 0 if ok else 1
            gc_tidy(within=cfg.interval)  # between evaluations, rather than in the next one
            if stop.wait(max(cfg.interval - (time.monotonic() - started), 0)):
                return 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
