"""The daily digest: when it is due, who sends it (a claim per day and channel), what it says, per channel.

alert.py sends it at ALERT_DIGEST_AT in ALERT_DIGEST_TZ, under its evaluation lock: for each of its channels it
claims ``<p>:alert:digest:<day>:<channel>`` with SET NX, so whatever the number of alerters each channel gets
one digest a day. It covers the 24 hours before it is sent: per spider, the runs that ended and their pages,
items and errors against the usual (the runs' like-for-like baselines), the alerts fired and how long they
lasted (from ``<p>:alert:history``, which the alerter appends to), the alerter's dead letters and Redis memory.
"""

import collections
import datetime
import html
import logging
import statistics

import redis

from monitor_channels import SEND_DEADLINE, Console, Mail, Notify, Webhook, one_line, printable, within
from monitor_contract import alert_key, dumps, is_number, loads, run_meta_key, runs_key
from monitor_records import parse_run, run_totals

logger = logging.getLogger(__name__)

WINDOW = 86400
# The alerter's log of what it sent (firing and resolved, not repeats), kept a week and capped.
HISTORY_KEEP = 5000
HISTORY_TTL = 8 * 86400
# A day's claims outlive the day.
CLAIM_TTL = 3 * 86400


def log_notes(r, prefix, notes, now):
    """Append the notifications sent (not repeats) to ``<p>:alert:history``: what the digest counts."""
    entries = [dumps({"at": now, "status": n["status"], "rule": n["rule"], "spider": n.get("spider"),
                      "node": n.get("node"), "starts_at": n.get("starts_at"), "ends_at": n.get("ends_at")},
                     ensure_ascii=False) for n in notes if not n.get("repeat")]
    if entries:
        key = alert_key(prefix, "history")
        with r.pipeline(transaction=False) as pipe:
            pipe.lpush(key, *entries)
            pipe.ltrim(key, 0, HISTORY_KEEP - 1)
            pipe.expire(key, HISTORY_TTL)
            pipe.execute()


def due_day(now, at, tz):
    """The local day (``YYYY-MM-DD``) whose digest is due at ``now`` (``at`` = (hours, minutes) in ``tz``), or
    None before that time of the day. A digest missed at its time (no alerter running) goes out when one runs."""
    local = datetime.datetime.fromtimestamp(now, tz)
    return local.date().isoformat() if (local.hour, local.minute) >= tuple(at) else None


def _seconds(text):
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def build_digest(r, prefix, now, day):
    """The digest's figures for the 24 hours before ``now`` (a dict, JSON-ready)."""
    since = int(now - WINDOW)
    spiders = sorted({s for s, _ in run_totals(r.hgetall(run_meta_key(prefix, "totals")))})
    with r.pipeline(transaction=False) as pipe:
        for spider in spiders:
            pipe.zrevrangebylex(runs_key(prefix, spider), "+", f"[{since:011d}")
        pipe.lrange(alert_key(prefix, "history"), 0, -1)
        replies = pipe.execute()
    out = {"day": day, "since": since, "until": int(now), "spiders": [], "alerts": []}
    for spider, members in zip(spiders, replies):
        runs = [p[1] for p in map(parse_run, members) if p and since < p[1]["end_time"] <= now]
        if not runs:
            continue
        compares = [c for c in (r_.get("compare") for r_ in runs) if isinstance(c, dict)]
        ratios = [c["items"] for c in compares if is_number(c.get("items"))]
        kinds = collections.Counter(c["baseline_of"] for c in compares if isinstance(c.get("baseline_of"), str))
        row = {"spider": spider, "runs": len(runs),
               "reasons": dict(collections.Counter(r_["finish_reason"] for r_ in runs))}
        for field in ("pages", "items", "errors"):
            row[field] = sum(int(r_[field]) for r_ in runs if is_number(r_.get(field)))
        row["items_vs_usual"] = round(statistics.median(ratios), 3) if ratios else None
        row["baseline_of"] = kinds.most_common(1)[0][0] if kinds else None
        out["spiders"].append(row)
    fired = {}
    for raw in replies[-1]:
        try:
            entry = loads(raw)
        except ValueError:
            continue
        if not (isinstance(entry, dict) and is_number(entry.get("at")) and since < entry["at"] <= now):
            continue
        key = (str(entry.get("rule")), str(entry.get("spider") or ""))
        a = fired.setdefault(key, {"rule": key[0], "spider": key[1], "fired": 0, "resolved": 0, "seconds": 0})
        if entry.get("status") == "firing":
            a["fired"] += 1
        elif entry.get("status") == "resolved":
            start, end = _seconds(entry.get("starts_at")), _seconds(entry.get("ends_at"))
            a["resolved"] += 1
            a["seconds"] += max(int(end - start), 0) if start is not None and end is not None else 0
    out["alerts"] = sorted(fired.values(), key=lambda a: (a["spider"], a["rule"]))
    try:
        out["dead_letters"] = r.llen(alert_key(prefix, "dead"))
    except redis.ResponseError:
        out["dead_letters"] = None
    try:
        memory = r.info("memory")
        out["redis_memory"] = {"used": memory.get("used_memory"), "max": memory.get("maxmemory") or None}
    except redis.ResponseError:  # INFO refused (an ACL): memory unknown
        out["redis_memory"] = None
    return out


def _span(seconds):
    return f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else f"{seconds // 60} min"


def digest_subject(d, prefix):
    runs = sum(s["runs"] for s in d["spiders"])
    fired = sum(a["fired"] for a in d["alerts"])
    return (f"[{printable(prefix)}] daily digest {d['day']}: {runs} run(s) of {len(d['spiders'])} spider(s), "
            f"{fired} alert(s)")


def digest_rows(d):
    """The spider table: ``[[spider, runs, pages, items, errors, vs usual, reasons]]`` as text."""
    rows = []
    for s in d["spiders"]:
        vs = "no baseline" if s["items_vs_usual"] is None else (
            f"items {round(s['items_vs_usual'] * 100)}% of usual ({s['baseline_of']})")
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(s["reasons"].items()))
        rows.append([printable(s["spider"]), str(s["runs"]), str(s["pages"]), str(s["items"]), str(s["errors"]), vs,
                     printable(reasons)])
    return rows


def alert_lines(d):
    return [f"{printable(a['rule'])} on {printable(a['spider']) or 'nodes'}: fired {a['fired']}, resolved "
            f"{a['resolved']} (lasted {_span(a['seconds'])} in all)" for a in d["alerts"]]


def footer(d):
    mem = d.get("redis_memory") or {}
    used = f"{mem['used'] / 2 ** 20:.1f} MiB" if is_number(mem.get("used")) else "unknown"
    top = f" of {mem['max'] / 2 ** 20:.0f} MiB" if is_number(mem.get("max")) else ""
    dead = "unknown" if d.get("dead_letters") is None else str(d["dead_letters"])
    return f"Alert dead letters: {dead}. Redis memory: {used}{top}."


HEADER = ["spider", "runs", "pages", "items", "errors", "vs usual", "finish reasons"]


def digest_text(d, prefix):
    lines = [digest_subject(d, prefix), "", "Runs that ended in the last 24 hours:"]
    lines += ["  " + " | ".join(row) for row in [HEADER] + digest_rows(d)] if d["spiders"] else ["  none"]
    lines += ["", "Alerts:"] + (["  " + line for line in alert_lines(d)] or ["  none"]) + ["", footer(d)]
    return "\n".join(lines) + "\n"


def digest_html(d, prefix):
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in digest_rows(d))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    alerts = "".join(f"<li>{html.escape(line)}</li>" for line in alert_lines(d)) or "<li>none</li>"
    return (f"<html><body><p>{html.escape(digest_subject(d, prefix))}</p><h3>Runs that ended in the last 24 hours</h3>"
            f"<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\"><tr>{head}</tr>{cells}</table>"
            f"<h3>Alerts</h3><ul>{alerts}</ul><p>{html.escape(footer(d))}</p></body></html>")


def send_digest(channel, d, prefix):
    """Send the digest on one channel: mail as text and HTML, the webhook as JSON, Apprise and the console as
    text. Raises when it failed (the claim is then given back)."""
    text = digest_text(d, prefix)
    if isinstance(channel, Mail):
        refused = channel.deliver(channel.message(digest_subject(d, prefix), text, digest_html(d, prefix)),
                                  channel.cfg.to)
        if refused:
            raise ConnectionError(f"recipients refused: {', '.join(refused)}")
    elif isinstance(channel, Webhook):
        slack = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        channel.post({"text": slack, "prefix": prefix, "digest": d})
    elif isinstance(channel, Notify):
        channel.notify(digest_subject(d, prefix), text)
    elif isinstance(channel, Console):
        print(text, file=channel.out, flush=True)


class Digest:
    """The alerter's digest: ``run(now)`` under the evaluation lock sends what is due, once per day and channel."""

    def __init__(self, r, cfg, channels):
        self.r, self.cfg, self.channels = r, cfg, channels
        self.secrets = (cfg.webhook_url, cfg.redis_url)

    def run(self, now):
        day = due_day(now, self.cfg.digest_at, self.cfg.digest_tz)
        if day is None:
            return []
        sent, digest = [], None
        for name, channel in self.channels.items():
            claim = alert_key(self.cfg.prefix, f"digest:{day}:{name}")
            if not self.r.set(claim, int(now), nx=True, ex=CLAIM_TTL):
                continue  # this channel's digest of the day is sent, or being sent, by an alerter
            try:
                digest = digest or build_digest(self.r, self.cfg.prefix, now, day)
                within(SEND_DEADLINE, send_digest, channel, digest, self.cfg.prefix)
            except Exception as exc:  # noqa: BLE001 - given back: the next evaluation tries again
                self.r.delete(claim)
                logger.warning("Alert: daily digest on %s failed, tried again next evaluation: %s",
                               channel.describe(), one_line(exc, *self.secrets))
                continue
            logger.info("Alert: sent the daily digest of %s on %s", day, channel.describe())
            sent.append(name)
        return sent
