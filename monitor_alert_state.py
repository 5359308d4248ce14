"""The alerter's state in Redis, in one home: records, outbox, dead letters, silences, heartbeat, lock.

Alert records and stall trackers, the outbox of messages to send, dead letters, silences, the heartbeat,
the evaluation lock and the run rule's cursor.

alert.py keeps it (``Lock``, ``Store``: one pipelined read and one transactional write per evaluation); the API
reads alerts (``read_alerts``) and adds or deletes silences through the same functions.
"""

import logging
import time
import uuid
from typing import NamedTuple, Optional

import redis

from monitor_acting import (
    ADD_SILENCE_LUA,
    AUDIT_KEEP,
    DELETE_SILENCE_LUA,
    IDEMPOTENCY_TTL,
    audit_fields,
    audit_key,
    audit_keys,
)
from monitor_contract import (
    alert_key,
    as_text,
    dumps,
    events_channel,
    is_bounded,
    is_number,
    is_text,
    loads,
    notify,
    number,
    redis_now,
    run_meta_key,
)
from monitor_nodes import read_snapshots
from monitor_records import parse_recent
from monitor_rules import RULE, RULES, SILENCE_MATCHERS, SilenceIndex, live_value
from monitor_settings import SETTING, ConfigError, duration
from monitor_settings import value as setting_value

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- silences

# A silence longer than this is a typo: at most 30 days.
MAX_SILENCE = 30 * 86400
# Matcher values and comments longer than this are not names.
MAX_SILENCE_TEXT = 500
# At most this many silences at once: each evaluation checks every alert against each.
MAX_SILENCES = 1000
# The fields of a silence as POST /silences takes it.
SILENCE_FIELDS = ("matchers", "duration", "until", "comment")


def silence_from(body, now, who):
    """A silence checked from ``{"matchers": {...}, "duration" | "until", "comment"}``: a dict to store, or
    ValueError saying what is wrong. ``until`` is unix seconds; ``duration`` seconds or ``2h``-style."""
    if not isinstance(body, dict):
        raise ValueError('send a JSON object: {"matchers": {"spider": "..."}, "duration": 3600, "comment": "..."}')
    unknown = sorted(set(body) - set(SILENCE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {str(unknown[0])[:50]!r}: use {', '.join(SILENCE_FIELDS)}")
    matchers = body.get("matchers")
    if not isinstance(matchers, dict) or not matchers:
        raise ValueError(f"matchers must be a non-empty object with any of {', '.join(SILENCE_MATCHERS)}")
    for key, value in matchers.items():
        if key not in SILENCE_MATCHERS:
            raise ValueError(f"unknown matcher {str(key)[:50]!r}: matchers are {', '.join(SILENCE_MATCHERS)}")
        if not (isinstance(value, str) and value and len(value) <= MAX_SILENCE_TEXT and is_text(value)):
            raise ValueError(f"matcher {key} must be a non-empty string of at most {MAX_SILENCE_TEXT} characters")
    if ("duration" in body) == ("until" in body):
        raise ValueError("give either duration (seconds, or like 2h) or until (unix seconds)")
    if "until" in body:
        until = body["until"]
        if not (is_number(until) and now < until <= now + MAX_SILENCE):
            raise ValueError(f"until must be unix seconds in the next {MAX_SILENCE // 86400} days")
    else:
        raw = body["duration"]
        if not (is_number(raw) or isinstance(raw, str)):
            raise ValueError("duration must be seconds or a text like 2h")
        try:
            until = now + duration("duration", raw)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    comment = body.get("comment", "")
    if not (isinstance(comment, str) and len(comment) <= MAX_SILENCE_TEXT and is_text(comment)):
        raise ValueError(f"comment must be a string of at most {MAX_SILENCE_TEXT} characters")
    return {"matchers": dict(matchers), "until": round(until, 3), "comment": comment, "who": who,
            "created": round(now, 3)}


def add_silence(r, prefix, silence):
    """Store a checked silence (``silence_from``); returns its id. ValueError when MAX_SILENCES are active."""
    return store_silence(r, prefix, silence)[0]["id"]


def store_silence(r, prefix, silence, audit=None, idempotency=""):
    """Store a checked silence under the MAX_SILENCES cap and audit it, in one script (ADD_SILENCE_LUA).
    ``audit``: the audit entry (``audit_fields``; default: by the silence's ``who``, on the command line);
    ``idempotency``: a key from ``idempotency_key`` or ''. Returns ``({"id", "until"}, repeated)``; ValueError
    when the cap is reached."""
    sid = uuid.uuid4().hex[:16]
    audit = audit or audit_fields(silence["who"], "silence.add", dumps(silence["matchers"]), silence["comment"],
                                  "command line")
    keys = (alert_key(prefix, "silences"), *audit_keys(prefix), idempotency or audit_key(prefix, "seq"))
    kind, raw = r.eval(ADD_SILENCE_LUA, len(keys), *keys, sid, dumps(silence), MAX_SILENCES, silence["created"],
                       dumps(audit), AUDIT_KEEP, idempotency, IDEMPOTENCY_TTL,
                       dumps({"id": sid, "until": silence["until"]}))
    if as_text(kind) == "full":
        raise ValueError(f"{MAX_SILENCES} silences are active: delete some first")
    if as_text(kind) == "new":
        notify(r, prefix, "alerts")  # what is silenced changed
    return loads(raw, bounded=False), as_text(kind) == "repeat"


def delete_silence(r, prefix, sid, who="unknown"):
    """Delete one silence and audit it as ``who``'s, in one script; whether it existed."""
    return remove_silence(r, prefix, sid, audit_fields(who, "silence.delete", sid, via="command line"))[0] is not None


def remove_silence(r, prefix, sid, audit=None, idempotency=""):
    """``({"id", "deleted": true} or None when there is no such silence, repeated)``."""
    audit = audit or audit_fields("unknown", "silence.delete", sid)
    keys = (alert_key(prefix, "silences"), *audit_keys(prefix), idempotency or audit_key(prefix, "seq"))
    kind, raw = r.eval(DELETE_SILENCE_LUA, len(keys), *keys, sid, dumps(audit), AUDIT_KEEP, idempotency,
                       IDEMPOTENCY_TTL, dumps({"id": sid, "deleted": True}))
    if as_text(kind) == "missing":
        return None, False
    if as_text(kind) == "new":
        notify(r, prefix, "alerts")
    return loads(raw, bounded=False), as_text(kind) == "repeat"


def parse_silences(raw, now):
    """``({id: silence}, expired ids)`` from an HGETALL of the silences hash; malformed entries are skipped."""
    active, expired = {}, []
    for field, value in (raw or {}).items():
        try:
            silence = loads(value, bounded=False)
            until = silence["until"]
            matchers = silence.get("matchers")
            ok = (is_number(until) and isinstance(matchers, dict) and matchers
                  and set(matchers) <= set(SILENCE_MATCHERS) and all(is_text(v) for v in matchers.values()))
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            continue
        if until <= now:
            expired.append(as_text(field))
        else:
            active[as_text(field)] = silence
    return active, expired


def read_silences(r, prefix, now=None, tidy=True):
    """The active silences ``{id: silence}``, oldest first; with ``tidy`` expired ones are deleted on the way
    (lazily; a dry run reads without writing)."""
    with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(alert_key(prefix, "silences"))
        pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline
        raw, server_now = pipe.execute()
    active, expired = parse_silences(raw, redis_now(server_now) if now is None else now)
    if tidy:
        _forget(r, alert_key(prefix, "silences"), expired)
    return dict(sorted(active.items(), key=lambda item: (number(item[1].get("created"), 0), item[0])))


def _forget(r, key, fields):
    if fields:
        try:
            r.hdel(key, *fields)
        except redis.RedisError as exc:  # a read-only replica: the expired ones are ignored anyway
            logger.warning("Cannot delete expired silences: %s", exc)


# ---------------------------------------------------------------------------- heartbeat; alerts as /alerts shows them

# The alerter's heartbeat lives this many of its intervals (at least HEARTBEAT_MIN seconds): past it,
# readers say no alerter is running.
HEARTBEAT_INTERVALS = 3
HEARTBEAT_MIN = 30


def heartbeat(now, interval, who, settings):
    """What an alerter stores each evaluation, and for how long: ``({at, interval, who, settings}, seconds)``;
    ``at`` is on Redis's clock, ``settings`` its thresholds and run settings (``alert_settings``), which the
    page judges by. It expires after HEARTBEAT_INTERVALS intervals, so a reader can tell no alerter runs."""
    return (dumps({"at": round(now, 3), "interval": interval, "who": who, "settings": settings}),
            int(max(HEARTBEAT_INTERVALS * interval, HEARTBEAT_MIN)))


def alert_settings(cfg=None):
    """``{"thresholds": {rule: limit or None}, "ok_reasons", "run_items_ratio"}`` of an alerter's configuration,
    or the settings table's defaults without one."""
    def setting(name, attr):
        return getattr(cfg, attr) if cfg is not None else setting_value(name, SETTING[name].default)
    thresholds = {rule.name: setting(rule.setting, rule.attr) if rule.setting else None for rule in RULES}
    if cfg is not None:
        thresholds = {name: limit if name in cfg.rules else 0 for name, limit in thresholds.items()}
    return {"thresholds": thresholds, "ok_reasons": setting("ALERT_OK_REASONS", "ok_reasons"),
            "run_items_ratio": setting("ALERT_RUN_ITEMS_RATIO", "run_items_ratio")}


def read_alerts(r, prefix):
    """``{"alerts": [...], "alerter": heartbeat or None, "silences": n, "settings", "now"}`` (``settings``: the
    running alerter's thresholds and run settings, else the defaults; see ``alert_settings``): every pending
    and firing alert from the alerter's state, newest first, each with ``rule, alertname, severity, node, spider,
    host, state, value, threshold, since, last_sent, silenced`` (the id of a silence matching it now, or null)."""
    with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(alert_key(prefix, "state"))
        pipe.hgetall(alert_key(prefix, "silences"))
        pipe.get(alert_key(prefix, "heartbeat"))
        pipe.hgetall(alert_key(prefix, "stall"))
        pipe.execute_command("TIME")  # pipe.time() is refused in a cluster pipeline
        raw_state, raw_silences, beat, raw_stall, server_now = pipe.execute()
    now = redis_now(server_now)
    silences, expired = parse_silences(raw_silences, now)
    _forget(r, alert_key(prefix, "silences"), expired)
    index = SilenceIndex(silences)
    records = {}
    for field, raw in raw_state.items():
        try:
            record = loads(raw, bounded=False)
        except ValueError:
            continue
        if (isinstance(record, dict) and record.get("state") in ("pending", "firing")
                and is_number(record.get("since"))):
            records[as_text(field)] = record
    # Live figures: a steady alert's record is not rewritten, its figure comes from its node's snapshot now.
    nodes = read_snapshots(r, prefix, {f.partition(":")[2] for f in records
                                       if RULE.get(f.partition(":")[0], RULE["run"]).scope == "node"}, now)
    alerts = []
    for field, record in records.items():
        rule, _, node = field.partition(":")
        tracker = _tracker(raw_stall.get(node.encode("utf-8", "replace")))
        value = live_value(RULE[rule], nodes.get(node), record, tracker, now) if rule in RULE else None
        labels = {"rule": rule, "node": node, "spider": _label(record.get("spider")),
                  "host": _label(record.get("host"))}
        sent = record.get("sent") if record.get("state") == "firing" and record.get("notified", True) else None
        alerts.append({**labels, "alertname": _label(record.get("alertname")),
                       "severity": _label(record.get("severity")), "state": record["state"],
                       "value": number(value), "threshold": number(record.get("threshold")),
                       "since": record["since"], "last_sent": number(sent),
                       "silenced": index.match(labels)})
    alerts.sort(key=lambda a: (-a["since"], a["rule"], a["node"]))
    try:
        heartbeat = loads(beat, bounded=False) if beat else None
    except ValueError:
        heartbeat = None
    alerter = heartbeat if isinstance(heartbeat, dict) else None
    settings = alerter.get("settings") if alerter else None
    settings = ({"source": "alerter", **settings} if isinstance(settings, dict)
                else {"source": "defaults", **alert_settings()})
    return {"alerts": alerts, "alerter": alerter, "silences": len(silences), "settings": settings, "now": now}


def _tracker(raw):
    """The ``since`` of a stored stall tracker, or None."""
    try:
        tracker = loads(raw, bounded=False) if raw else None
    except ValueError:
        return None
    return tracker[1] if tracker_problem(None, tracker) is None else None


def _label(value):
    return value if isinstance(value, str) and is_text(value) else None


# ---------------------------------------------------------------------------- the lock

# The evaluation lock outlives a crashed holder by this long; the holder renews it before every send (the
# evaluation's write and each settled send renew it too, so a send right after one needs no renewal of its own).
LOCK_TTL_MS = 60_000
RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
             "end return 0")


def move_aside(r, prefix, name, why):
    """Rename an alert key alert.py cannot use to ``<name>:aside``, logged with its key, and start it afresh."""
    key, aside = alert_key(prefix, name), alert_key(prefix, f"{name}:aside")
    try:
        r.rename(key, aside)
    except redis.ResponseError:  # gone meanwhile
        return
    logger.error("Alert: %s %s: moved to %s, starting afresh", key, why, aside)


class Lock:
    """The evaluation lock: one alert.py at a time evaluates and delivers; it expires if its holder dies."""

    def __init__(self, r, prefix):
        self.r, self.prefix = r, prefix
        self.key = alert_key(prefix, "lock")
        self.token = None
        self.until = 0.0  # time.monotonic() the lock expires at, as last taken or renewed here

    def queue(self, pipe):
        """Queue an attempt to take the lock on ``pipe`` (to share a round trip); ``took`` reads its reply."""
        token = uuid.uuid4().hex
        pipe.set(self.key, token, nx=True, px=LOCK_TTL_MS)
        return token

    def took(self, reply, token):
        if reply is True:
            self.token = token
            self.renewed()
            return True
        return False

    def renewed(self):
        """The lock was taken or renewed (LOCK_TTL_MS from now) just now."""
        self.until = time.monotonic() + LOCK_TTL_MS / 1000

    def wrote(self, released):
        """A write that released the lock (``released``), else renewed it, went through."""
        if released:
            self.token = None
        else:
            self.renewed()

    def held_for(self, seconds):
        """Whether the lock is ours for ``seconds`` more at least, as last taken or renewed (no round trip)."""
        return self.token is not None and self.until - time.monotonic() >= seconds

    def acquire(self):
        for _ in range(2):
            token = uuid.uuid4().hex
            if self.r.set(self.key, token, nx=True, px=LOCK_TTL_MS):
                self.token = token
                self.renewed()
                return True
            if self.r.pttl(self.key) != -1:  # a live lock, or gone just now
                return False
            move_aside(self.r, self.prefix, "lock", "never expires, so no alert.py wrote it")
        return False

    def renew(self):
        if not self.r.eval(RENEW_LUA, 1, self.key, self.token, LOCK_TTL_MS):
            return False
        self.renewed()
        return True

    def release(self):
        if self.token is None:  # released with the evaluation's write already
            return
        try:
            self.r.eval(RELEASE_LUA, 1, self.key, self.token)
        except redis.RedisError:
            pass  # it expires by itself
        self.token = None


# ---------------------------------------------------------------------------- the store

# Dead letters kept in <prefix>:alert:dead, newest first: enough to read back a day of a broken channel.
DEAD_MAX = 1000
# A dead letter keeps this much of a malformed record's text.
DEAD_TEXT = 10_000
# Only while the lock is ours: set or delete ('' value) fields of one hash and keep dead letters in the
# capped list, counted; then release the lock (ARGV[3] '1') or renew it. KEYS: lock, hash, dead list, dead counter.
# ARGV: token, cap, release, n, n field/value pairs, then the dead letters. Returns -1 when the lock is not ours,
# else the dead letters counted so far.
SETTLE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[2], ARGV[i])
  else redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
local total = tonumber(redis.call('GET', KEYS[4])) or 0
if #ARGV > 4 + 2 * n then
  for i = 5 + 2 * n, #ARGV do redis.call('LPUSH', KEYS[3], ARGV[i]) end
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
  total = total + #ARGV - 4 - 2 * n
  redis.call('SET', KEYS[4], total)
end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], %d) end
return total
""" % LOCK_TTL_MS


# An evaluation's outcome in one step, only while the lock is ours (else 0). KEYS: lock, state, stall, outbox,
# runs, heartbeat, silences. ARGV: token, release (1: delete the lock after, else renew it), heartbeat value
# ('' none) and seconds, runs cursor ('' none), the events channel (told ``alerts`` when records change), then
# for each of state, stall and outbox a count n and n field/value pairs ('' deletes the field), then the ids of
# expired silences to delete.
WRITE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[7]) > 0 then redis.call('PUBLISH', ARGV[6], 'alerts') end
local i = 7
for k = 2, 4 do
  local n = tonumber(ARGV[i])
  for j = i + 1, i + 2 * n, 2 do
    if ARGV[j + 1] == '' then redis.call('HDEL', KEYS[k], ARGV[j])
    else redis.call('HSET', KEYS[k], ARGV[j], ARGV[j + 1]) end
  end
  i = i + 2 * n + 1
end
for j = i, #ARGV do redis.call('HDEL', KEYS[7], ARGV[j]) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[6], ARGV[3], 'EX', ARGV[4]) end
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], %d) end
return 1
""" % LOCK_TTL_MS


def record_problem(field, record):
    """Why an alert record (field ``rule:node``) cannot be used, or None."""
    if field.partition(":")[0] not in RULE:
        return f"unknown rule {field.partition(':')[0]!r}"
    if not isinstance(record, dict) or record.get("state") not in ("pending", "firing"):
        return "not a pending or firing alert"
    times = ("since",) if record["state"] == "pending" else ("since", "fired", "sent")
    if not all(is_bounded(record.get(name)) for name in times):
        return f"needs numbers {', '.join(times)}"
    return None


def tracker_problem(field, tracker):
    """Why a stall tracker cannot be used, or None."""
    if (isinstance(tracker, list) and len(tracker) == 2 and (tracker[0] is None or is_bounded(tracker[0]))
            and is_bounded(tracker[1])):
        return None
    return "not [pages, since]"


def entry_problem(field, entry):
    """Why an outbox entry cannot be sent, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("channel"), str):
        return "not a message with a channel"
    if not all(is_bounded(entry.get(name)) for name in ("created", "attempts", "next_try")) or entry["attempts"] < 0:
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


def oldest_first(messages):
    """Outbox messages ``[(field, entry)]`` in the order they are sent: by creation, then field."""
    return sorted(messages, key=lambda item: (item[1]["created"], item[0]))


class Reading(NamedTuple):
    """What one evaluation reads of the alerter's state (``Store.read``)."""

    state: dict  # "rule:node" -> alert record
    stall: dict  # node -> stall tracker
    silences: dict  # id -> active silence
    runs_cursor: Optional[int]  # the seq of the last run judged; None before the first evaluation
    recent: list  # [(seq, run record)], the newest runs recorded
    expired: list = []  # ids of expired silences, deleted with the evaluation's write
    outbox: int = 0  # messages waiting to be sent
    messages: Optional[list] = None  # those messages as ``Store.outbox`` returns them (None: not read)


class Store:
    """The alerter's keys: alert state and stall trackers (hashes of JSON), the outbox (a hash of messages
    to send) and the dead letters (a capped list, and their count). Read-only without a lock (dry run)."""

    TYPES = {"state": "hash", "stall": "hash", "outbox": "hash", "dead": "list", "dead_total": "string",
             "silences": "hash", "heartbeat": "string", "runs": "string"}

    def __init__(self, r, prefix, lock=None):
        self.r, self.prefix, self.lock = r, prefix, lock
        self.key = {name: alert_key(prefix, name) for name in self.TYPES}
        self.decoded = {}  # hash name -> {field: (stored value, field as text, decoded value)}, as last read

    def read(self, now):
        """Everything an evaluation needs, in one round trip: ``Reading``, checked: a key of the wrong type is
        moved aside (logged), a malformed field set aside."""
        with self.r.pipeline(transaction=False) as pipe:
            self.queue(pipe)
            return self.parse(pipe.execute(raise_on_error=False), now)

    def queue(self, pipe):
        """Queue ``read``'s commands on ``pipe`` (a caller shares its round trip); ``parse`` takes the replies."""
        for name in self.TYPES:
            pipe.type(self.key[name])
        pipe.hgetall(self.key["state"])
        pipe.hgetall(self.key["stall"])
        pipe.hgetall(self.key["silences"])
        pipe.get(self.key["runs"])
        pipe.lrange(run_meta_key(self.prefix, "recent"), 0, -1)
        pipe.hgetall(self.key["outbox"])  # usually empty: read whole, delivery needs no read of its own

    QUEUED = len(TYPES) + 6

    def parse(self, replies, now):
        """``read``'s ``Reading`` from the replies to ``queue``'s commands (errors as values)."""
        *kinds, raw_state, raw_stall, raw_silences, cursor, recent, waiting = replies
        for name, kind in zip(self.TYPES, kinds):
            if as_text(kind) not in ("none", self.TYPES[name]):
                if self.lock:
                    move_aside(self.r, self.prefix, name, f"is a {as_text(kind)}, not a {self.TYPES[name]}")
                else:
                    logger.error("Alert: %s is a %s, not a %s", self.key[name], as_text(kind), self.TYPES[name])
        state = self._checked("state", raw_state, record_problem, now)
        stall = self._checked("stall", raw_stall, tracker_problem, now)
        silences, expired = parse_silences(raw_silences if isinstance(raw_silences, dict) else {}, now)
        cursor = int(cursor) if isinstance(cursor, bytes) and cursor.isdigit() else None
        messages = self._messages(waiting, now) if self.lock and isinstance(waiting, dict) else None
        return Reading(state, stall, silences, cursor, parse_recent(recent if isinstance(recent, list) else []),
                       expired, len(waiting) if isinstance(waiting, dict) else 1, messages)

    def outbox(self, now):
        """The messages to send, oldest first: ``[(field, entry)]``; malformed ones are set aside."""
        return self._messages(self.r.hgetall(self.key["outbox"]), now)

    def _messages(self, raw, now):
        return oldest_first(self._checked("outbox", raw, entry_problem, now, keep_fields=True).values())

    def queued(self):
        try:
            return self.r.hlen(self.key["outbox"])
        except redis.ResponseError:
            return "?"

    def _checked(self, name, raw, problem_of, now, keep_fields=False):
        """Decode a hash's JSON fields; those with a problem go to the dead letters (kept, logged)."""
        good, dead, last, kept = {}, [], self.decoded.get(name, {}), {}
        for field, value in (raw.items() if isinstance(raw, dict) else ()):
            seen = last.get(field)
            if seen is not None and seen[0] == value:  # unchanged since the last read (steady alerts, trackers)
                kept[field] = seen
                good[seen[1]] = seen[2].copy()
                continue
            text = as_text(field)
            try:
                decoded = loads(value, bounded=False)
                why = problem_of(text, decoded)
            except ValueError as exc:
                why = f"not JSON ({exc})"
            if why is None:
                if not keep_fields:  # outbox entries (nested, rare) are decoded each time
                    kept[field] = (value, text, decoded.copy())  # never handed out: callers get copies
                good[text] = (field, decoded) if keep_fields else decoded
            else:
                dead.append((field, {"at": now, "key": self.key[name], "field": text,
                                     "reason": f"malformed record in {self.key[name]} field {text!r}: {why}",
                                     "value": as_text(value)[:DEAD_TEXT]}))
        self.decoded[name] = kept
        if dead:
            self.settle(name, {field: None for field, _ in dead}, [letter for _, letter in dead])
        return good

    def write(self, state_changes, stall_changes, entries, runs_cursor=None, heartbeat=None, expired=(),
              release=False):
        """Write what an evaluation changed in one step (WRITE_LUA), with the alerter's ``heartbeat``
        (``heartbeat()``) and the ``expired`` silences' deletion, only while this process holds the lock
        (WatchError otherwise); with ``release`` the lock is released in the same step."""
        args = []
        for changes in (state_changes, stall_changes, entries):
            args.append(len(changes))
            for field, value in changes.items():
                args += [field, "" if value is None else value if isinstance(value, str) else dumps(value)]
        keys = [self.key[name] for name in ("state", "stall", "outbox", "runs", "heartbeat", "silences")]
        done = self.r.eval(WRITE_LUA, 7, self.lock.key, *keys, self.lock.token, int(release),
                           heartbeat[0] if heartbeat else "", heartbeat[1] if heartbeat else 0,
                           "" if runs_cursor is None else runs_cursor, events_channel(self.prefix), *args, *expired)
        if not done:
            raise redis.WatchError("evaluation lock expired")
        self.lock.wrote(release)

    def settle(self, name, changes, dead, release=False):
        """Set (a value) or delete (None) fields of one hash and keep ``dead`` letters, in one step and only
        while the lock is ours, which it renews, or releases with ``release``; logs each dead letter. False when
        the lock was lost."""
        if self.lock is None:
            for letter in dead:
                logger.warning("Alert: %s (dry run: left in place)", letter["reason"])
            return True
        pairs = [item for field, value in changes.items() for item in (field, "" if value is None else dumps(value))]
        total = self.r.eval(SETTLE_LUA, 4, self.lock.key, self.key[name], self.key["dead"], self.key["dead_total"],
                            self.lock.token, DEAD_MAX, int(release), len(changes), *pairs, *map(dumps, dead))
        if total < 0:
            return False
        self.lock.wrote(release)
        for letter in dead:
            logger.error("Alert: dead letter: %s; kept in %s (%d so far)", letter["reason"], self.key["dead"],
                         total)
        return True


def merged(old, changes):
    out = dict(old)
    for field, value in changes.items():
        if value is None:
            out.pop(field, None)
        else:
            out[field] = value
    return out
