"""The alert rules and their evaluation: pure functions of the snapshots, the stored alerts and the clock.

Each rule is one row of RULES. ``evaluate`` steps every alert (inactive -> pending -> firing -> resolved, as in
Prometheus), applies silences (``with_silences``) and returns what changed and what to send; ``run_alerts``
judges run records. No Redis and no clock here: tests drive them with any ``now`` (alert.py does the I/O).
"""

import fnmatch
import itertools
import operator
import time
from typing import Callable, NamedTuple, Optional

from monitor_contract import (
    DEFAULT_INTERVAL,
    NUMBER_LIMIT,
    REFUSAL_KEEP,
    REFUSAL_STEP,
    STALE_INTERVALS,
    is_name,
    loads,
    number,
)
from monitor_snapshot import NUMBER_TYPES, age, column, last_report, last_reports, newest_error

MIB = 1024 * 1024


# ---------------------------------------------------------------------------- checks and details

def over(rule, snapshot, limit, stuck_since, now):
    """``snapshot[rule.field] / rule.scale`` while it is over the threshold."""
    return over_limit(snapshot.get(rule.field), rule.scale, limit)


def over_limit(value, scale, limit):
    """``value / scale`` (to 0.1) while ``value`` is a number and that is over ``limit``, else None."""
    value = number(value)
    if limit and value is not None and value / scale > limit:
        return round(value / scale, 1)
    return None


def down_for(rule, snapshot, limit, stuck_since, now):
    """Seconds since a stale node's last report."""
    if snapshot.get("state") == "stale":
        return age(snapshot, now)
    return None


def redis_settled(snapshot, answering_since, now):
    """False while Redis has answered for less than STALE_INTERVALS of the node's intervals since an outage or
    failover the alerter saw (``answering_since``, None: none seen): a node silent through it is not judged
    down yet, its gap is Redis's, not its death."""
    if answering_since is None:
        return True
    interval = number(snapshot.get("interval"), DEFAULT_INTERVAL) or DEFAULT_INTERVAL
    return now - answering_since >= STALE_INTERVALS * interval


def stalled_for(rule, snapshot, limit, stuck_since, now):
    """Seconds the node's pages have stood still with work queued, once that is the threshold."""
    if limit and stuck_since is not None and now - stuck_since >= limit:
        return round(now - stuck_since)
    return None


def limit_text(rule, snapshot, limit):
    return f" (limit {fmt(limit)}{rule.unit})"


def reports_every(rule, snapshot, limit):
    return f" (reports every {fmt(number(snapshot.get('interval')) or 0)} s)"


def limit_and_queue(rule, snapshot, limit):
    return f"{limit_text(rule, snapshot, limit)}, {fmt(queued(snapshot))} requests queued"


# Item field coverage is judged once a node has scraped this many items (fewer say little).
COVERAGE_MIN_ITEMS = 100


def low_coverage(rule, snapshot, limit, stuck_since, now):
    """The lowest coverage (%) among the fields the node was told to watch (MONITOR_ITEM_FIELDS: fields
    found on the first items may be optional), once it has scraped COVERAGE_MIN_ITEMS, while below the limit."""
    least = least_covered(snapshot) if snapshot.get("fields_listed") is True else None
    if not (limit and least and (number(snapshot.get("items")) or 0) >= COVERAGE_MIN_ITEMS):
        return None
    lowest = least[1] * 100
    return round(lowest, 1) if lowest < limit else None


def least_covered(snapshot):
    """``(name, share)`` of the node's least covered item field, from ``fields`` or a slim value's
    ``fields_lowest``; None when it has neither."""
    fields = snapshot.get("fields")
    if fields:
        name = min(fields, key=fields.get)
        return name, fields[name]
    lowest = snapshot.get("fields_lowest")
    return tuple(lowest) if lowest else None


def lowest_field(rule, snapshot, limit):
    name = (least_covered(snapshot) or ("?",))[0]
    return f" for field {name!r} over {fmt(snapshot.get('items'))} items{limit_text(rule, snapshot, limit)}"


def queue_growing(rule, view, limit, started, now):
    """A spider's queue growth (requests/min) while it has live nodes; how long it must last is the limit.
    A crawl's queue grows as it discovers links: its first ``limit`` seconds (since ``started``, when its
    longest-running crawling node started, on Redis's clock) are not judged."""
    rate = number(view.get("queue_rate"))
    if started is not None and now - started < limit:
        return None
    if limit and view.get("nodes_live") and rate is not None and rate > 0:
        return rate
    return None


def crawl_starts(nodes):
    """``{spider: when its longest-running crawling node started}`` on Redis's clock (the node's start_time
    moved by its clock's offset, learnt from its last report); when every figure is a number, at C speed."""
    snaps = nodes.values()
    live = list(itertools.compress(snaps, map(("live", "paused").__contains__, column(snaps, "state"))))
    starts, times = column(live, "start_time"), column(live, "timestamp")
    seen = last_reports(live)
    if set(map(type, itertools.chain(starts, times, seen))) <= NUMBER_TYPES:
        starts = list(map(operator.add, starts, map(operator.sub, seen, times)))
        spiders = column(live, "spider")
        if len(set(spiders)) == 1:
            return {spiders[0]: min(starts)}
        out = {}
        for spider, start in zip(spiders, starts):
            out[spider] = min(start, out.get(spider, start))
        return out
    starts = {}
    for snapshot in nodes.values():
        start = number(snapshot.get("start_time"))
        if snapshot.get("state") in ("live", "paused") and start is not None:
            start += last_report(snapshot) - number(snapshot.get("timestamp"), 0)
            spider = snapshot.get("spider")
            starts[spider] = min(start, starts.get(spider, start))
    return starts


def redis_memory_used(rule, view, limit, stuck_since, now):
    """A Redis master's used memory as a share of its limit, while over ALERT_REDIS_MEMORY."""
    used, most = number(view.get("used_memory")), number(view.get("limit"))
    if limit and used is not None and most and used / most > limit:
        return round(used / most, 3)
    return None


def redis_evicting(rule, view, limit, stuck_since, now):
    """Keys a Redis master evicted since the previous evaluation (``evicted``), while any were."""
    evicted = number(view.get("evicted"))
    return evicted if evicted else None


def redis_detail(rule, view, limit):
    return f" of {fmt(view.get('limit'))} bytes (limit {fmt(limit)}; policy {view.get('maxmemory_policy')})"


def evicting_detail(rule, view, limit):
    return (f" since the last evaluation (policy {view.get('maxmemory_policy')}: a queue or dupefilter may be "
            "losing entries)")


def queue_detail(rule, view, limit):
    return f" for {span(limit)} or more, {fmt(view.get('queue_requests'))} requests queued"


def crawl_finished(rule, view, limit, stuck_since, now):
    """The spider's pages while its crawl is ``finished`` (``monitor_read.spider_state``), once it fetched some: a
    spider that never fetched a page is waiting for its start URLs, not done."""
    pages = number(view.get("pages"), 0)
    return pages if view.get("state") == "finished" and pages > 0 else None


def finished_totals(rule, view, limit):
    """The crawl's totals: items, errors, dead letters, and how long since its oldest node started."""
    took = number(view.get("timestamp"), 0) - number(view.get("started"), number(view.get("timestamp"), 0))
    return (f", {fmt(view.get('items'))} items, {fmt(view.get('errors'))} errors, {fmt(view.get('dead') or 0)} "
            f"dead letters in {span(took)}")


def refusing(rule, view, limit, stuck_since, now):
    """The highest share (%) of 429/503 answers among the spider's domains with REFUSAL_MIN responses in the
    window (``view["refusals"]``, from ``window_shares``), while over the limit (a ratio)."""
    worst = max((d["share"] for d in (view.get("refusals") or {}).values() if d["responses"] >= REFUSAL_MIN),
                default=None)
    return round(worst * 100, 1) if limit and worst is not None and worst > limit else None


def refusing_domains(rule, view, limit):
    over = sorted((d for d in (view.get("refusals") or {}).items()
                   if d[1]["responses"] >= REFUSAL_MIN and d[1]["share"] > limit), key=lambda d: -d[1]["share"])
    named = ", ".join(f"{name} {fmt(d['share'] * 100)}% of {fmt(d['responses'])}" for name, d in over[:5])
    return f" (limit {fmt(limit * 100)}%): {named}"


def limit_and_sample(rule, snapshot, limit):
    """The limit, and the node's newest error sample: what the errors are."""
    sample = newest_error(snapshot)
    return limit_text(rule, snapshot, limit) + (f"; newest: {sample}" if sample else "")


# ---------------------------------------------------------------------------- the rules

class Rule(NamedTuple):
    """One alert rule: adding a rule is adding a row to RULES."""
    name: str  # as ALERT_RULES and the messages name it
    alertname: str  # Prometheus-style
    severity: str  # critical or warning
    label: str  # what its figure is, in messages
    unit: str
    field: Optional[str] = None  # the snapshot field compared with the threshold...
    scale: float = 1  # ...after dividing it by this
    setting: Optional[str] = None  # its threshold's setting (monitor_settings.SETTINGS; 0 turns the rule off)
    check: Callable = over  # (rule, snapshot, limit, stuck_since, now) -> its figure while it holds, or None
    detail: Callable = limit_text  # (rule, snapshot, limit) -> what a firing message adds to the figure
    back: str = "back to normal"  # what a resolved message says
    needs_live: bool = True  # judged on reporting nodes only: silenced while down, over once closed
    scope: str = "node"  # or "spider": judged on the spider's cluster view, its alert keyed rule:<spider>; or
    # "redis": judged on a Redis master's INFO figures, keyed rule:<address>
    hold: bool = False  # the threshold is how long the condition must hold (instead of ALERT_FOR)
    pending: Optional[float] = None  # seconds pending before it fires, instead of ALERT_FOR
    once: bool = False  # one message per episode: never repeated, its end not sent
    big: bool = False  # its message's detail reads a big insight field (error samples): see ``with_details``

    @property
    def attr(self):
        """The setting's attribute on the configuration: ALERT_CPU_PERCENT -> cpu_percent."""
        return self.setting[len("ALERT_"):].lower() if self.setting else None


RULES = (
    Rule("down", "ScrapyNodeDown", "critical", "no report for", " s", check=down_for, detail=reports_every,
         back="reporting again", needs_live=False),
    Rule("cpu", "ScrapyHostCpuHigh", "warning", "host CPU", "%", field="cpu",
         setting="ALERT_CPU_PERCENT"),
    Rule("memory", "ScrapyHostMemoryHigh", "warning", "host memory", "%", field="memory",
         setting="ALERT_MEMORY_PERCENT"),
    Rule("stalled", "ScrapyCrawlStalled", "warning", "pages not rising for", " s", check=stalled_for,
         detail=limit_and_queue, setting="ALERT_STALL_SECONDS"),
    Rule("errors", "ScrapyErrorsHigh", "warning", "errors", "/min", field="errors_per_min", detail=limit_and_sample,
         setting="ALERT_ERRORS_PER_MIN", big=True),
    Rule("rss", "ScrapyProcessRssHigh", "warning", "process RSS", " MiB", field="rss", scale=MIB,
         setting="ALERT_RSS_MB"),
    # Judged on run records, not snapshots: see ``run_alerts`` (one message per bad run, never resolved).
    Rule("run", "ScrapyRunFailed", "warning", "run", "", check=lambda *_: None, needs_live=False),
    Rule("coverage", "ScrapyItemFieldCoverageLow", "warning", "item field coverage", "%", check=low_coverage,
         detail=lowest_field, setting="ALERT_COVERAGE_MIN"),
    Rule("latency", "ScrapyDownloadLatencyHigh", "warning", "download latency p95", " s", field="latency_p95",
         setting="ALERT_LATENCY_P95"),
    Rule("queue", "ScrapyQueueGrowing", "warning", "queue growing by", "/min", check=queue_growing,
         detail=queue_detail, setting="ALERT_QUEUE_GROWING", needs_live=False, back="queue no longer growing",
         scope="spider", hold=True),
    Rule("domain_refusing", "ScrapyDomainRefusing", "warning", "429/503 answers", "%", check=refusing,
         detail=refusing_domains, setting="ALERT_DOMAIN_REFUSALS", needs_live=False, scope="spider",
         back="domains answer again"),
    Rule("finished", "ScrapyCrawlFinished", "info", "crawl finished:", " pages", check=crawl_finished,
         detail=finished_totals, needs_live=False, scope="spider", pending=0, once=True),
    # Judged on each Redis master's INFO (alert.py reads it every evaluation); the alert's node is its address.
    Rule("redis_memory", "ScrapyRedisMemoryHigh", "warning", "Redis memory used", "", needs_live=False,
         check=redis_memory_used, detail=redis_detail,
         setting="ALERT_REDIS_MEMORY", scope="redis", back="Redis memory back under its limit"),
    Rule("redis_evictions", "ScrapyRedisEvicting", "critical", "Redis evicted", " keys", check=redis_evicting,
         detail=evicting_detail, needs_live=False, scope="redis", back="Redis no longer evicting"),
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
    return f"{rule.label} {fmt(value)}{rule.unit}{rule.detail(rule, snapshot, limit)}"


def resolved_summary(rule, snapshot, cfg):
    """Why an alert ended: ``back to normal: host CPU 12%``, ``node closed``..."""
    if not snapshot:
        return "node gone from the status hash"
    if snapshot.get("state") == "closed":
        return "node closed"
    if not is_active(rule, cfg):
        return "rule turned off"
    figure = number(snapshot.get(rule.field)) if rule.field else None
    if figure is None:
        return rule.back
    return f"{rule.back}: {rule.label} {fmt(figure / rule.scale)}{rule.unit}"


def queued(snapshot):
    """Requests plus start URLs waiting in the node's scrapy-redis queue; None when it has no such queue."""
    sizes = [number(snapshot.get(f)) for f in ("queue_requests", "queue_start_urls")]
    sizes = [s for s in sizes if s is not None]
    return sum(sizes) if sizes else None


# ---------------------------------------------------------------------------- evaluation

# Silences match alerts on these labels; all given must match.
SILENCE_MATCHERS = ("node", "spider", "host", "rule")


class SilenceIndex:
    """Active silences ``{id: silence}`` indexed by their first matcher (node, spider, host, rule), so finding
    one that matches an alert costs four lookups, however many silences there are."""

    def __init__(self, silences):
        self.by = {}
        for sid, silence in silences.items():
            matchers = silence["matchers"]
            first = next(key for key in SILENCE_MATCHERS if key in matchers)
            self.by.setdefault((first, matchers[first]), []).append((sid, matchers))

    def __bool__(self):
        return bool(self.by)

    def match(self, labels):
        """The id of a silence whose matchers all equal ``labels`` (node, spider, host, rule), or None."""
        for key in SILENCE_MATCHERS:
            for sid, matchers in self.by.get((key, labels.get(key)), ()):
                if all(labels.get(name) == value for name, value in matchers.items()):
                    return sid
        return None


def track_stall(snapshot, previous, now):
    """The stall tracker of one node, ``[pages, since]``: since when its pages stood still with work queued.

    None (nothing to remember) unless the node is live, running, has requests waiting and its own last
    interval saw no new page; so a healthy cluster stores no trackers at all.
    """
    if snapshot.get("state") != "live" or snapshot.get("status") != "running":
        return None
    if (number(snapshot.get("pages_per_min")) or 0) > 0 or not queued(snapshot):
        return None
    pages = number(snapshot.get("pages"))
    if previous and previous[0] == pages:
        return previous
    return [pages, now]


# The figure of a rule whose node is down: no news about it until the node reports again.
NODE_DOWN = object()


def step(record: Optional[dict], value, now: float, cfg,
         hold: Optional[float] = None) -> tuple[Optional[dict], Optional[str]]:
    """One alert's transition. ``value``: the rule's figure when its condition holds, None when not,
    ``NODE_DOWN`` while its node is down; ``hold``: seconds pending before firing (default ALERT_FOR).
    Returns ``(new record or None, "firing"/"resolved"/None)``."""
    if value is NODE_DOWN:
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
    """The rule's figure on one node while its condition holds, else None; NODE_DOWN while the node is down."""
    if rule.needs_live:
        state = snapshot.get("state")
        if state == "stale":
            return NODE_DOWN
        if state == "closed":
            return None
    return rule.check(rule, snapshot, limit, stuck_since, now)


def evaluate(nodes: dict, state: dict, stall: dict, now: float, cfg, silences: Optional[dict] = None,
             spiders: Optional[dict] = None, answering_since: Optional[float] = None,
             redis_views: Optional[dict] = None) -> tuple[dict, dict, list]:
    """One evaluation over ``{node: snapshot with state}``, the stored alerts and stall trackers, and
    ``spiders`` (``spider_views``; None leaves the spider-level alerts as they are).

    Returns ``(state changes, stall changes, notifications)``; a change of None deletes the field.
    ``silences`` (``{id: silence}``, as ``read_silences`` returns) hold back what matching alerts
    send (see ``in_the_open``). ``answering_since``: when Redis answered again after an outage or failover
    (``redis_settled``): until then a stale node's down alert waits, as a figure of NODE_DOWN. ``redis_views``
    (``{master address: INFO figures with evicted}``; None leaves the Redis alerts as they are) for the
    rules of scope ``redis``.
    Pure: no Redis, no clock, so tests can drive it with any ``now``.
    """
    state_changes, stall_changes, notes = {}, {}, []
    rules = active_rules(cfg)
    limits = {rule.name: threshold(rule, cfg) for rule in rules}
    silences = SilenceIndex(silences or {})
    scoped = {"spider": (spiders, [r for r in rules if r.scope == "spider"]),
              "redis": (redis_views, [r for r in rules if r.scope == "redis"])}
    rules = [rule for rule in rules if rule.scope == "node"]
    track = RULE["stalled"] in rules
    records_of = {}  # {node: {rule: record}}: few nodes have any, so most nodes cost no key lookups
    scoped_records = {"spider": {}, "redis": {}}  # {"rule:spider" or "rule:address": record}
    for key, record in state.items():
        rule, _, node = key.partition(":")
        if RULE[rule].scope != "node":
            scoped_records[RULE[rule].scope][key] = record
        else:
            records_of.setdefault(node, {})[rule] = record

    def apply(rule, node, snapshot, record, value):
        new, event = step(record, value, now, cfg, limits.get(rule.name) if rule.hold else rule.pending)
        new, event = with_silences(rule, node, snapshot, record, new, event, value, limits.get(rule.name), silences,
                                 now)
        if rule.once and (event == "resolved" or event == "firing" and record and record["state"] == "firing"):
            event = None  # sent once per episode
        if new != record:
            state_changes[f"{rule.name}:{node}"] = new
        if event:
            notes.append(notification(event, rule, node, snapshot, new or record, now, cfg))

    # A down or closed node without alerts skips the rules judged on reporting nodes: nothing could start.
    # A threshold on one field (``over``) is judged inline on a reporting node: most of an evaluation's checks.
    judged = [(rule, rule.field if rule.check is over and rule.needs_live else None, rule.scale, limits[rule.name])
              for rule in rules]
    other_rules = [row for row in judged if not row[0].needs_live]
    for node in to_judge(nodes, judged, stall, records_of, now):
        snapshot = nodes[node]
        tracker = track_stall(snapshot, stall.get(node), now) if track else None
        if tracker != stall.get(node):
            stall_changes[node] = tracker
        records = records_of.pop(node, None) or {}
        state = snapshot.get("state")
        reporting = state == "live" or state == "paused"
        for rule, field, scale, limit in other_rules if state in ("stale", "closed") and not records else judged:
            if field is not None and reporting:  # over(), without figure()'s and the rule's lookups
                value = over_limit(snapshot.get(field), scale, limit)
            else:
                value = figure(rule, snapshot, limit, tracker[1] if tracker else None, now)
            if value is not None and rule.name == "down" and not redis_settled(snapshot, answering_since, now):
                value = NODE_DOWN
            record = records.pop(rule.name, None) if records else None
            if record is not None or value is not None:
                apply(rule, node, snapshot, record, value)
        for name, record in records.items():  # rules turned off since
            apply(RULE[name], node, snapshot, record, None)
    for node, records in records_of.items():  # nodes gone from the status hash
        for name, record in records.items():
            apply(RULE[name], node, None, record, None)
    for node in set(stall) - set(nodes):
        stall_changes[node] = None
    starts = crawl_starts(nodes) if spiders else {}  # a spider rule's "since": its crawl's start
    for scope, (views, scope_rules) in scoped.items():
        records = scoped_records[scope]
        for name, view in (views or {}).items():
            for rule in scope_rules:
                value = rule.check(rule, view, limits[rule.name], starts.get(name) if scope == "spider" else None,
                                   now)
                record = records.pop(f"{rule.name}:{name}", None)
                if record is not None or value is not None:
                    apply(rule, name, view, record, value)
        for key, record in records.items() if views is not None else ():  # spiders or masters gone, rules off
            rule, _, name = key.partition(":")
            apply(RULE[rule], name, views.get(name), record, None)
    notes.sort(key=lambda a: (a["status"], ORDER[a["rule"]], a["node"]))
    return state_changes, stall_changes, notes


def to_judge(nodes, judged, stall, records_of, now):
    """The nodes ``evaluate`` must go through one by one, in their order: all but those found quiet at C speed, figure
    by figure over every node: no alert, no stall tracker before or now, and no rule of ``judged`` holding (a rule
    of another kind leaves every node in). The snapshots are the gate's: their numbers are finite."""
    ids, snaps = list(nodes), list(nodes.values())

    def over(field, scale, limit):  # per node: over_limit(its value, scale, limit) is not None
        values = column(snaps, field)
        if set(map(type, values)) <= NUMBER_TYPES:
            return list(map(operator.gt, map(operator.truediv, values, itertools.repeat(scale)),
                            itertools.repeat(limit)))
        return [v.__class__ in NUMBER_TYPES and v / scale > limit for v in values]

    states = column(snaps, "state")
    live_running = map(operator.and_, map(operator.eq, states, itertools.repeat("live")),
                       map(operator.eq, column(snaps, "status"), itertools.repeat("running")))
    idle = map(operator.not_, over("pages_per_min", 1, 0))
    masks = [list(map(operator.eq, states, itertools.repeat("stale"))),  # down
             list(map(operator.and_, live_running, idle))]  # stalled, or to be tracked (track_stall)
    for rule, field, scale, limit in judged:
        if field is not None:
            if limit:
                masks.append(over(field, scale, limit))
        elif rule.check is low_coverage:
            masks.append(low_covered(snaps, rule, limit, now))
        elif not (rule.check is down_for or rule.check is stalled_for or rule.name == "run"):
            return ids  # down: stale, above; stalled: the tracker, above; run: judged on run records
    judge = list(map(any, zip(*masks)))
    position = dict(zip(ids, itertools.count()))
    for name in itertools.chain(stall, records_of):
        if name in position:
            judge[position[name]] = True
    return list(itertools.compress(ids, judge))


def low_covered(snaps, rule, limit, now):
    """Per node: whether the coverage rule may hold (``low_coverage``): its fields listed and, from slim values'
    ``fields_lowest`` at C speed, its lowest share under the limit (its items not looked at)."""
    listed = list(map(operator.is_, column(snaps, "fields_listed"), itertools.repeat(True)))
    if not (limit and any(listed)):
        return listed
    lowest = column(snaps, "fields_lowest")
    if set(map(type, lowest)) == {list} and set(map(len, lowest)) == {2} and not any(column(snaps, "fields")):
        shares = list(map(operator.itemgetter(1), lowest))
        if set(map(type, shares)) <= NUMBER_TYPES:
            return list(map(operator.and_, listed, map(operator.lt, map(operator.mul, shares, itertools.repeat(100)),
                                                       itertools.repeat(limit))))
    return [flag and low_coverage(rule, s, limit, None, now) is not None for flag, s in zip(listed, snaps)]


def with_silences(rule, node, snapshot, record, new, event, value, limit, silences, now):
    """One step's outcome ``(new record, event)`` with silences applied and what /alerts shows stored in the
    record (alertname, severity, threshold, spider, host, silenced; ``value`` and ``summary`` as last sent).
    A steady alert's record does not change: /alerts derives its live figure (``live_value``). A silenced
    alert keeps its state and sends nothing; a firing never sent (``notified`` false) is sent once no silence matches
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
    if new["state"] != "firing":
        return new, event
    if event == "firing" and sid:
        if not record or record["state"] == "pending":
            new["notified"] = False  # fired under a silence: sent when it ends, if still firing
        event = None
    elif event == "firing":
        new["notified"] = True
    elif sid is None and not new.get("notified", True) and value is not NODE_DOWN:
        new.update(sent=now, first_sent=now, notified=True, value=value)  # its silence ended while it still fires:
        # its first message, sent now (a repeat is one sent after the first: ``notification``)
        event = "firing"
    if event == "firing":
        new["summary"] = firing_summary(rule, new["value"], snapshot, limit)
    return new, event


def needs_details(notes):
    """The nodes whose firing notes' details read big insight fields (``Rule.big``)."""
    return {n["node"] for n in notes if n["status"] == "firing" and RULE[n["rule"]].big}


def with_details(notes, changes, full):
    """Rewrite the summary of ``needs_details``' notes, and of their records in ``changes``, from the nodes'
    full snapshots ``full``: for an evaluation over slim snapshots (``slim_key``: no error samples)."""
    for note in notes:
        rule, snapshot = RULE[note["rule"]], full.get(note["node"])
        if note["status"] == "firing" and rule.big and snapshot:
            note["summary"] = firing_summary(rule, note["value"], snapshot, note["threshold"])
            record = changes.get(f"{rule.name}:{note['node']}")
            if record:
                record["summary"] = note["summary"]


def live_value(rule, snapshot, record, stuck_since, now):
    """An alert's figure now, as /alerts shows it: the rule's check on the node's snapshot (with state) at
    the record's threshold (``stuck_since``: the stall tracker's); the figure last sent when it cannot be
    derived (spider rules, the node gone, the condition just ended)."""
    if snapshot and rule.scope == "node":
        value = rule.check(rule, snapshot, record.get("threshold"), stuck_since, now)
        if value is not None and value is not NODE_DOWN:
            return value
    return number(record.get("value"))


def notification(event, rule, node, snapshot, record, now, cfg):
    """What a message says of one alert (``record``: its firing record): a dict, the webhook's ``alerts``."""
    snapshot = snapshot or {}
    limit = threshold(rule, cfg)
    if event == "firing":
        summary = firing_summary(rule, record["value"], snapshot, limit)
    else:
        summary = f"{resolved_summary(rule, snapshot, cfg)} after {span(now - record['fired'])}"
    return {
        "status": event, "rule": rule.name, "alertname": rule.alertname, "severity": rule.severity,
        "node": node, "spider": snapshot.get("spider"), "host": snapshot.get("host"),
        "value": record.get("value"), "threshold": limit, "summary": summary,
        "repeat": event == "firing" and record["sent"] > record.get("first_sent", record["fired"]),
        "starts_at": iso(record["fired"]), "ends_at": iso(now) if event == "resolved" else None,
    }


# ---------------------------------------------------------------------------- run alerts

# What a run's baseline was, as the run rule says it (RECORD_RUN_LUA's ``compare.baseline_of``).
BASELINE_OF = {"version": " for this version and arguments", "args": " for these arguments"}


def bad_run(record, cfg):
    """Why a run ended badly (lost, a finish reason not in ALERT_OK_REASONS, items below
    ALERT_RUN_ITEMS_RATIO of its baseline), or None."""
    reason = record.get("finish_reason")
    if reason == "lost":
        return "lost: no report for MONITOR_LOST_AFTER, never closed"
    if not any(fnmatch.fnmatchcase(str(reason), ok) for ok in cfg.ok_reasons):
        return f"ended {reason}"
    compare = record.get("compare") if isinstance(record.get("compare"), dict) else {}
    ratio = number(compare.get("items"))
    if cfg.run_items_ratio and ratio is not None and ratio < cfg.run_items_ratio:
        basis = BASELINE_OF.get(compare.get("baseline_of"), "")
        return f"items {fmt(round(ratio * 100))}% of usual{basis} (limit {fmt(cfg.run_items_ratio * 100)}%)"
    return None


def run_alerts(recent, cursor, cfg):
    """``(notifications, new cursor)`` for the runs of ``recent`` (``[(seq, record)]``, as
    ``recent_runs`` gives them) recorded after ``cursor``, one per bad run. Without a cursor (the
    first evaluation) nothing is sent: the cursor starts at the newest run. Pure, as ``evaluate`` is."""
    newest = max([seq for seq, _ in recent] + [cursor or 0])
    if cursor is None or RULE["run"] not in active_rules(cfg):
        return [], newest
    notes = []
    for seq, record in sorted(recent, key=lambda pair: pair[0]):
        why = bad_run(record, cfg) if seq > cursor else None
        if why:
            counts = ", ".join(f"{fmt(number(record.get(f)))} {f}" for f in ("pages", "items", "errors"))
            notes.append({
                "status": "firing", "rule": "run", "alertname": RULE["run"].alertname,
                "severity": RULE["run"].severity, "node": str(record.get("node")), "spider": record["spider"],
                "host": record.get("host"), "value": record.get("finish_reason"), "threshold": None,
                "summary": f"run {why}; {counts} in {span(number(record.get('duration'), 0))}",
                "repeat": False, "starts_at": iso(record["end_time"]), "ends_at": None})
    return notes, newest


# ---------------------------------------------------------------------------- domains refusing, and slowing them

# A domain's share of 429/503 answers is judged once it gave this many responses in the window.
REFUSAL_MIN = 50
# The first cluster-wide delay (seconds) the ``slow`` action sets; it doubles from there, and is lifted when
# halving it would go below this.
FIRST_DELAY = 1.0


def refusal_starts(now, window, slack=0):
    """The starts of the refusal buckets (``monitor_contract.refusals_key``) a window of ``window`` seconds ending at
    ``now`` reads: from the bucket holding ``now - window`` (the window at most REFUSAL_KEEP) to now's; with
    ``slack`` seconds more each side (``now`` an estimate)."""
    first = int(now - min(window, REFUSAL_KEEP) - slack) // REFUSAL_STEP * REFUSAL_STEP
    return list(range(first, int(now + slack) // REFUSAL_STEP * REFUSAL_STEP + 1, REFUSAL_STEP))


def refusal_shares(buckets):
    """``{spider: {domain: {"share", "responses"}}}``: each spider's domains' share of 429/503 answers, added up over
    ``buckets`` (the refusal buckets' hashes as read: ``{field: count}``, bytes or text). A field or count that is
    not as the nodes write it (hand-edited) is skipped."""
    totals = {}
    for bucket in buckets:
        for field, count in bucket.items():
            try:
                spider, domain, figure = loads(field)
                count = int(count)
            except (ValueError, TypeError):
                continue
            if 0 <= count < NUMBER_LIMIT and figure in ("pages", "refused") and is_name(spider) and is_name(domain):
                pages, refused = totals.get((spider, domain), (0, 0))
                totals[spider, domain] = (pages + count, refused) if figure == "pages" else (pages, refused + count)
    out = {}
    for (spider, domain), (pages, refused) in totals.items():
        out.setdefault(spider, {})[domain] = {"share": min(refused / pages, 1.0) if pages else 0.0,
                                              "responses": pages}
    return out


def next_delay(delay, changed, share, responses, limit, raise_ok, now, window, most):
    """``(delay or None, when it last changed)`` of one domain after an evaluation: over ``limit`` (with
    REFUSAL_MIN responses, and ``raise_ok``: its alert fires, not silenced) it starts at FIRST_DELAY and doubles
    once per ``window`` up to ``most``; under half the limit for a ``window`` since the last change it halves,
    and is lifted below FIRST_DELAY."""
    if raise_ok and responses >= REFUSAL_MIN and share > limit:
        if delay is None:
            return FIRST_DELAY, now
        if now - changed >= window and delay < most:
            return min(delay * 2, most), now
        return delay, changed
    if delay is not None and share < limit / 2 and now - changed >= window:
        return (delay / 2 if delay / 2 >= FIRST_DELAY else None), now
    return delay, changed


# ---------------------------------------------------------------------------- formatting

def fmt(value):
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def iso(ts):
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, ValueError, OSError):  # a stored time beyond the calendar
        return "?"


def span(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
