"""The records readers page through: run history (a node's runs, lost ones recorded for nodes that vanished,
baselines and comparisons, summaries), the control log and the audit log. Pure functions where it can
(``baseline``, ``run_figures``), so tests prove the arithmetic without Redis. It imports nothing of Scrapy,
Twisted or psutil.
"""

import collections
import json
import logging
import time

from monitor_acting import AUDIT_KEEP, LOGGED_COMMANDS, audit_key
from monitor_contract import (
    BASELINE_RUNS,
    MIN_BASELINE,
    NUMBER_LIMIT,
    RUN_ID,
    as_text,
    control_ack_key,
    control_key,
    decode_command,
    dumps,
    is_number,
    loads,
    number,
    run_meta_key,
    run_record,
    runs_key,
    write_run,
)
from monitor_settings import SETTING
from monitor_snapshot import last_report, node_state

logger = logging.getLogger(__name__)

# Runs kept per spider unless MONITOR_RUNS_KEEP says otherwise.
RUNS_KEEP = SETTING["MONITOR_RUNS_KEEP"].default


# ---------------------------------------------------------------------------- run history

# What ``compare`` and the baseline cover: ratios of the run to the median of the previous finished runs.
COMPARED = ("items", "pages_per_min", "items_per_min", "duration", "error_ratio")


def record_lost_runs(r, prefix, nodes, now, lost_after, keep=RUNS_KEEP, done=None):
    """Write a ``lost`` run for each node not closed and silent for more than ``lost_after`` seconds and
    three of its intervals (stale: a short setting never loses a node between reports), on Redis's clock
    ``now``, once across processes; ``done`` (a set of ``(node, start_time)``, updated)
    skips those already handled. Returns how many this call recorded."""
    done = set() if done is None else done
    todo = []
    for node, snapshot in nodes.items():
        claim = (node, snapshot.get("start_time"))
        silent = now - last_report(snapshot) > lost_after and node_state(snapshot, now) == "stale"
        if silent and claim not in done:
            offset = last_report(snapshot) - number(snapshot.get("timestamp"), 0)
            todo.append((claim, run_record(dict(snapshot, node=node), "lost", offset)))
    if not todo:
        return 0
    with r.pipeline(transaction=False) as pipe:
        for claim, record in todo:
            write_run(pipe, prefix, record, claim[1], keep, lost=True)
        written = pipe.execute()
    done.update(claim for claim, _ in todo)
    return sum(1 for w in written if w)


def parse_member(member, id_pattern):
    """``(id, JSON object)`` of a stored ``<id> <JSON>`` member (a run, a dead letter) whose id matches
    ``id_pattern``, or None."""
    rid, _, body = as_text(member).partition(" ")
    if not id_pattern.match(rid):
        return None
    try:
        record = loads(body)
    except ValueError:
        return None
    return (rid, record) if isinstance(record, dict) else None


def parse_run(member):
    """``(id, record)`` from a stored member, or None unless it passes the snapshot gate's number rules."""
    found = parse_member(member, RUN_ID)
    if found is None or not (isinstance(found[1].get("spider"), str) and isinstance(found[1].get("finish_reason"), str)
                             and is_number(found[1].get("end_time"))):
        return None
    return found


def run_bound(before):
    """The ZREVRANGEBYLEX bound for runs older than ``before``: a cursor (a run id) or unix seconds; None
    when it is neither."""
    if before is None or before == "":
        return "+"
    if RUN_ID.match(before):
        return f"({before} "
    if before.isascii() and before.isdigit() and len(before) <= 11:
        return f"({int(before):011d}"
    return None


def read_runs(r, prefix, spider=None, limit=50, before=None, reason=None):
    """``(runs, next cursor or None)``: the spider's runs (every spider's, without one) newest first, older
    than ``before`` (see ``run_bound``), with ``finish_reason`` in ``reason`` (a set) when given. Malformed
    members are skipped."""
    if spider is None:
        spiders = sorted({s for s, _ in run_totals(r.hgetall(run_meta_key(prefix, "totals")))})
    else:
        spiders = [spider]
    found = []
    for name in spiders:
        found += _spider_runs(r, runs_key(prefix, name), limit + 1, run_bound(before), reason)
    found.sort(key=lambda pair: pair[0], reverse=True)
    more = len(found) > limit
    found = found[:limit]
    return [record for _, record in found], (found[-1][0] if more else None)


def _spider_runs(r, key, count, bound, reason):
    """Up to ``count`` ``(id, record)`` of one runs key from ``bound`` down, those of ``reason`` only."""
    out, chunk = [], count if reason is None else max(count * 4, 200)
    # A member holds its reason as written by write_run: most members need no decoding to be passed over.
    needles = None if reason is None else [b'"finish_reason":' + dumps(x, ensure_ascii=False).encode()
                                           for x in reason]
    while True:
        members = r.zrevrangebylex(key, bound, "-", 0, chunk)
        wanted = members if needles is None else [m for m in members if any(n in m for n in needles)]
        for parsed in filter(None, map(parse_run, wanted)):
            if reason is None or parsed[1]["finish_reason"] in reason:
                out.append(parsed)
                if len(out) == count:
                    return out
        if len(members) < chunk:
            return out
        bound = "(" + as_text(members[-1])


def run_figures(record):
    """The figures ``compare`` covers, for one run (error_ratio is errors per page)."""
    out = {f: number(record.get(f)) for f in COMPARED if f != "error_ratio"}
    pages, errors = number(record.get("pages")), number(record.get("errors"))
    out["error_ratio"] = errors / pages if pages and errors is not None else None
    return out


def counts_for_baseline(records):
    """The records (newest first given) a new run may be compared with, newest first, as RECORD_RUN_LUA picks
    them: not lost; and a run that scraped nothing only when it finished (``finished``) and most of the
    spider's last 2 x BASELINE_RUNS runs not lost scraped nothing too (a spider that usually yields no
    items), so a few empty test runs never become the usual."""
    runs = [r for r in records if r.get("finish_reason") != "lost"]
    recent = runs[:2 * BASELINE_RUNS]
    usually_none = sum(1 for r in recent if r.get("items") == 0) * 2 > len(recent)
    return [r for r in runs if r.get("items") != 0 or (usually_none and r.get("finish_reason") == "finished")]


def baseline(records, like=None):
    """``(medians, runs used, baseline_of)``: the medians of COMPARED over the first BASELINE_RUNS records that
    count (``counts_for_baseline``; newest first given) of the same ``version`` and ``args_hash`` as ``like`` (a
    record) if there are MIN_BASELINE, else of the same ``args_hash``, else of any: what a run like it ending now
    is compared with (as RECORD_RUN_LUA does)."""
    done = counts_for_baseline(records)
    args, version = (like or {}).get("args_hash"), (like or {}).get("version")
    same_args = [r for r in done if isinstance(args, str) and r.get("args_hash") == args]
    same_version = [r for r in same_args if isinstance(version, str) and r.get("version") == version]
    of, chosen = next(((of, chosen) for of, chosen in (("version", same_version), ("args", same_args))
                       if len(chosen[:BASELINE_RUNS]) >= MIN_BASELINE), ("any", done))
    used = [run_figures(r) for r in chosen][:BASELINE_RUNS]
    medians = {}
    for field in COMPARED:
        values = sorted(v[field] for v in used if v[field] is not None)
        medians[field] = ((values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2
                          if len(values) >= MIN_BASELINE else None)
    return (medians if len(used) >= MIN_BASELINE else None), len(used), of


SUMMARY_DAYS = 30


def runs_summary(r, prefix, spider, now):
    """A spider's runs at a glance: count kept, all-time totals by reason, the baseline a run ending now
    would be compared with, reasons among kept runs, and per-day totals (UTC) for the last 30 days."""
    with r.pipeline(transaction=False) as pipe:
        pipe.zcard(runs_key(prefix, spider))
        pipe.zrevrangebylex(runs_key(prefix, spider), "+", "-", 0, 10 * BASELINE_RUNS)
        pipe.zrevrangebylex(runs_key(prefix, spider), "+", f"[{int(now - SUMMARY_DAYS * 86400):011d}")
        pipe.hgetall(run_meta_key(prefix, "totals"))
        count, newest, month, totals = pipe.execute()
    recent = [p[1] for p in map(parse_run, newest) if p]
    medians, used, of = baseline(recent, recent[0] if recent else None)
    days, reasons = {}, collections.Counter()
    for parsed in filter(None, map(parse_run, month)):
        record = parsed[1]
        reasons[record["finish_reason"]] += 1
        day = time.strftime("%Y-%m-%d", time.gmtime(record["end_time"]))
        totals_of_day = days.setdefault(day, {"day": day, "runs": 0, "pages": 0, "items": 0, "errors": 0})
        totals_of_day["runs"] += 1
        for field in ("pages", "items", "errors"):
            totals_of_day[field] += int(number(record.get(field), 0))
    return {"spider": spider, "runs": count, "baseline": medians, "baseline_runs": used, "baseline_of": of,
            "reasons": dict(reasons), "totals": {reason: n for (s, reason), n in run_totals(totals).items()
                                                  if s == spider},
            "days": sorted(days.values(), key=lambda d: d["day"])}


def recent_runs(r, prefix):
    """The newest runs recorded (up to RECENT_RUNS), as ``[(seq, record)]``: what the alerter judges."""
    return parse_recent(r.lrange(run_meta_key(prefix, "recent"), 0, -1))


def parse_recent(raws):
    """``[(seq, record)]`` from the entries of ``<p>:runmeta:recent`` (``<seq> <member>``); malformed skipped."""
    out = []
    for raw in raws:
        seq, _, member = as_text(raw).partition(" ")
        parsed = parse_run(member)
        if seq.isdigit() and parsed:
            out.append((int(seq), parsed[1]))
    return out


def run_totals(raw):
    """``{(spider, reason): runs ever recorded}`` from an HGETALL of the totals hash; malformed fields skipped."""
    out = {}
    for field, value in raw.items():
        try:
            spider, reason = json.loads(field)
            count = int(value)
        except (ValueError, TypeError):
            continue
        if isinstance(spider, str) and isinstance(reason, str) and 0 <= count < NUMBER_LIMIT:
            out[(spider, reason)] = count
    return out


# ---------------------------------------------------------------------------- the control log

def read_control_log(r, prefix, limit):
    """The newest ``limit`` log entries, each with ``acks``: ``{node: when it applied the command}``."""
    raws = r.lrange(control_key(prefix, "log"), 0, limit - 1)
    entries = [c for c in (decode_command(raw, LOGGED_COMMANDS) for raw in raws) if c is not None]
    with r.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hgetall(control_ack_key(prefix, entry["id"]))
        acks = pipe.execute()
    for entry, ack in zip(entries, acks):
        entry["acks"] = {}
        for node, raw in ack.items():
            try:
                at = json.loads(raw).get("at")
            except (ValueError, AttributeError, RecursionError):
                continue
            if is_number(at):
                entry["acks"][as_text(node)] = at
    return entries


# ---------------------------------------------------------------------------- the audit log

# The audit log is read in pages of this many entries while filtering.
AUDIT_PAGE = 500


def read_audit(r, prefix, limit, before=None, who=None, action=None, request=None):
    """``{"entries": [...], "next"}``: up to ``limit`` audit entries, newest first, with an id below ``before``,
    by ``who``, of ``action`` (``control`` matches every ``control.*``) and of ``request`` (the request id or
    Idempotency-Key); ``next`` is the ``before`` of the next page, or None at the end. Malformed entries are
    skipped."""
    found, start, key = [], 0, audit_key(prefix, "log")
    while len(found) < limit and start < AUDIT_KEEP:
        raws = r.lrange(key, start, start + AUDIT_PAGE - 1)
        for raw in raws:
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)):
                continue
            act = str(entry.get("action", ""))
            if ((before is None or entry["id"] < before) and (who is None or entry.get("who") == who)
                    and (action is None or act == action or act.startswith(action + "."))
                    and (request is None or entry.get("request") == request)):
                found.append(entry)
                if len(found) == limit:
                    break
        if len(raws) < AUDIT_PAGE:
            break
        start += AUDIT_PAGE
    return {"entries": found, "next": found[-1]["id"] if len(found) == limit else None}
