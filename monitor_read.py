"""The read side: what the API and the alerter read from Redis, and the figures they derive from it.

A spider over its nodes (SPIDER_FIELDS and ``combine``), cluster and spider views, the queue forecast and
histories (every node's snapshot is monitor_nodes.py's; run history and the logs are monitor_records.py's). Pure
functions where it can (``combine``, ``queue_forecast``, ``spider_points``), so tests prove the arithmetic without
Redis. It imports nothing of Scrapy, Twisted or psutil.
"""

import collections
import functools
import itertools
import json
import math
import operator
import time
from typing import Iterable, Optional

import redis

from monitor_contract import (
    DEFAULT_INTERVAL,
    HISTORY_FIELDS,
    HISTORY_SECONDS,
    NUMBER_LIMIT,
    ROLLUP_COUNTERS,
    ROLLUP_TIERS,
    Snapshot,
    as_text,
    history_key,
    is_number,
    loads,
    markers_key,
    number,
    rollup_key,
    trend_key,
)
from monitor_nodes import gc_paused
from monitor_settings import SETTING
from monitor_snapshot import NUMBER_TYPES, column, last_report

# ---------------------------------------------------------------------------- a spider over its nodes

# How a spider's figure combines its nodes' figures, one row per field, used alike by the cluster view,
# the spider's history, Prometheus and the alerter:
#   sum        added up over the nodes
#   host_sum   added up over hosts, each host once (by its newest report): machine figures
#   host_mean  the mean over hosts, each host once
#   newest     the newest node's reading: the scrapy-redis queue is shared, every node sees the same one
#   max        the highest: a spider's download latency p95 is at most its slowest node's (the merged
#              distribution's quantile never exceeds the largest of its parts'), and that node is the news
# Rates and machine gauges count nodes still crawling (``live`` and ``paused`` in a view; in a history
# bucket, the rows it holds); when none is, gauges fall back to every node so a finished spider still shows
# its last figures.
SPIDER_FIELDS = {
    "cpu": "host_mean", "memory": "host_mean",
    "bytes_sent": "host_sum", "bytes_recv": "host_sum", "net_sent_rate": "host_sum", "net_recv_rate": "host_sum",
    "rss": "sum", "process_cpu": "sum",
    "pages": "sum", "items": "sum", "requests": "sum", "errors": "sum",
    "pages_per_min": "sum", "items_per_min": "sum", "requests_per_min": "sum", "errors_per_min": "sum",
    "queue_requests": "newest", "queue_start_urls": "newest", "queue_dupefilter": "newest",
    "latency_p95": "max",
    "dead": "sum",
}
# The 7- and 90-day history (write-time rollups, monitor_contract.ROLLUP_LUA) combines the same figures once per
# node write, as each write lands in its spider's bucket; a point's figure, by rule:
#   sum      counted since the node's previous write, added up over writes and nodes: pages, items, errors,
#            requests, dead; a point shows the bucket's total and ``<field>_per_min`` over the bucket's span
#   seconds  the node's interval added up per write while it crawls (node-seconds): ``nodes`` is the mean
#            number of nodes crawling over the bucket (node-seconds / bucket seconds); no per-node field needed
#   last     the newest reading by its write time: the queue (every node reads the same shared queue)
#   max      the highest of the nodes' p95 over the bucket, as ``max`` above
ROLLUP_RULES = {
    "pages": "sum", "items": "sum", "errors": "sum", "requests": "sum", "dead": "sum",
    "nodes": "seconds", "queue_requests": "last", "latency_p95": "max",
}
# Fields that only count crawling nodes (a closed node's last rate is not a rate any more).
CRAWLING_FIELDS = frozenset(("cpu", "memory", "net_sent_rate", "net_recv_rate", "rss", "process_cpu",
                             "pages_per_min", "items_per_min", "requests_per_min", "errors_per_min",
                             "latency_p95"))
CRAWLING_STATES = ("live", "paused")
STATES = ("live", "paused", "stale", "closed")


def combine(rows: list[dict], fields: Iterable[str], hosts: Optional[list] = None) -> dict:
    """``{field: figure}`` over ``rows`` (snapshots or history rows, each with a ``timestamp``), by
    SPIDER_FIELDS. ``hosts`` maps each row's position to its host (default: the row's ``host``). A field no
    row has a number for is None. Integer sums stay integers; other figures are rounded to 2 places."""
    order = sorted(range(len(rows)), key=lambda i: _time(rows[i]))
    fields = list(fields)
    by_host = [f for f in fields if SPIDER_FIELDS[f].startswith("host")]
    columns = _columns([rows[i] for i in order], [f for f in fields if f not in by_host])
    if by_host:
        hosts = hosts or [r.get("host", r.get("node")) for r in rows]
        columns.update(_columns({hosts[i]: rows[i] for i in order}.values(), by_host))  # newest per host
    return _combined(columns, fields)


def _combined(columns, fields, numeric=None):
    """``combine``'s figures from ``{field: values}``, each column in time order (a host field's: one value a
    host, its newest); ``numeric``: ``{field: its value types}`` of the columns known to hold only numbers."""
    out, numeric = {}, numeric or {}
    for field in fields:
        rule = SPIDER_FIELDS[field]
        # Rows come through the gate (decode_snapshot, read_histories): their numbers are finite already.
        kinds = numeric.get(field)
        values = numbers(columns[field]) if kinds is None else columns[field]
        if not values:
            out[field] = None
        elif rule == "newest":
            out[field] = values[-1]
        elif rule == "max":
            out[field] = max(values)
        else:
            ints = (set(map(type, values)) if kinds is None else kinds) == {int}  # checked once, at C speed
            total = sum(values) if ints else finite_sum(values, kinds)
            if rule == "host_mean":
                out[field] = round(total / len(values), 2)
            else:
                out[field] = total if ints else round(total, 2)
    return out


def _columns(rows, fields):
    """``{field: [each row's value or None]}``: every row read once."""
    values = [tuple(map(row.get, fields)) for row in rows]
    return dict(zip(fields, zip(*values))) if values else dict.fromkeys(fields, ())


def numbers(values):
    """The ints and floats (not bools) among ``values`` (a sequence), in order, picked at C speed."""
    if set(map(type, values)) <= NUMBER_TYPES:  # the usual column: every node reports the figure
        return list(values)
    return list(itertools.compress(values, map(NUMBER_TYPES.__contains__, map(type, values))))


def _time(row):
    return number(row.get("timestamp"), 0)


def finite_sum(values, kinds=None):
    """An exact sum of finite numbers (ints stay ints); never inf or nan, whatever the inputs' count. ``kinds``: the
    values' types when known."""
    if all(issubclass(kind, int) for kind in (set(map(type, values)) if kinds is None else kinds)):  # at C speed
        return sum(values)
    total = math.fsum(values)
    return total if math.isfinite(total) else 0.0


def cluster_view(nodes: dict[str, Snapshot], spider: str,
                 fields: Iterable[str] = tuple(SPIDER_FIELDS)) -> Optional[dict]:
    """One spider over its nodes: newest timestamp, figures by SPIDER_FIELDS, node counts by state, and its
    nodes. ``nodes`` is a ``{node: snapshot}`` mapping as ``list_nodes`` returns; None when it has none.
    ``fields``: only these SPIDER_FIELDS (the alerter needs few)."""
    mine = {n: s for n, s in nodes.items() if s.get("spider") == spider}
    if not mine:
        return None
    view = SpiderColumns(fields).update(list(mine), list(mine.values())).view(spider)
    view["nodes"] = mine
    return view


class SpiderColumns:
    """One spider's nodes as columns, one list per figure ``cluster_view`` reads, in the nodes' order, kept between
    read passes (``spiders_view``'s memo): a pass whose nodes are the last pass's, in the same order, updates only
    the positions whose snapshot is a new object (a NodeReader shares unchanged ones), so a spider of 10,000 nodes
    with a few hundred new reports is not read row by row again. Never modified once made: ``update`` returns a
    new one (API threads share the memo)."""

    def __init__(self, fields=tuple(SPIDER_FIELDS), ids=(), members=(), columns=None, kinds=None):
        self.fields, self.ids, self.members = tuple(fields), ids, members
        self.names = (*self.fields, "timestamp", "state", "host", "start_time", "domains")  # a column each
        self.columns = columns or {}
        self.kinds = kinds or {}  # each column's value types (a superset after an update), so not checked again

    def update(self, ids, members):
        """The columns of ``members`` (snapshots of the nodes ``ids``), from these where they still hold."""
        if ids == self.ids:
            changed = list(itertools.compress(range(len(members)), map(operator.is_not, members, self.members)))
            if not changed:
                return self
            if len(changed) * 4 <= len(members):  # a few: their positions updated (else all read at C speed)
                columns = {name: list(values) for name, values in self.columns.items()}
                kinds = {name: set(types) for name, types in self.kinds.items()}
                for i in changed:
                    get = members[i].get
                    for name in self.names:
                        columns[name][i] = value = get(name)
                        kinds[name].add(value.__class__)
                updated = SpiderColumns(self.fields, ids, members, columns, kinds)
                if "sorted_ids" in self.__dict__:  # the same nodes: their sorted ids too
                    updated.sorted_ids = self.sorted_ids
                return updated
        columns = {name: column(members, name) for name in self.names}
        return SpiderColumns(self.fields, ids, members, columns,
                             {name: set(map(type, values)) for name, values in columns.items()})

    def numeric(self):
        """``{name: value types}`` of the columns holding only numbers."""
        return {name: types for name, types in self.kinds.items() if types <= NUMBER_TYPES}

    @functools.cached_property
    def sorted_ids(self):
        """The node ids, sorted (a view's ``nodes``)."""
        return sorted(self.ids)

    @functools.cached_property
    def crawling(self):
        """The node whose history the spider's queue forecast reads (``first_crawling``)."""
        return first_crawling(self.ids, self.columns["start_time"], self.columns["state"])

    def view(self, spider):
        """``cluster_view``'s figures of its ``fields``, without ``nodes``: the crawling nodes' for the rates and gauges
        (every node's gauges when none crawls). Sums are the same in any order; the newest reading, the highest (an
        int or a float of equal value) and each host's newest row are taken in time order (stable: the nodes' order
        among equal times)."""
        cols = self.columns
        times = cols["timestamp"]
        if not (self.kinds["timestamp"] <= NUMBER_TYPES and all(map(math.isfinite, times))):  # gated: at C speed
            times = [number(t, 0) for t in times]
        order = sorted(range(len(self.ids)), key=times.__getitem__)
        pick = operator.itemgetter(*order) if len(order) > 1 else (lambda values: (values[order[0]],))
        crawling = list(map(CRAWLING_STATES.__contains__, cols["state"]))
        rest = [f for f in self.fields if f not in CRAWLING_FIELDS]
        crawl = [f for f in self.fields if f in CRAWLING_FIELDS]
        rates = [f for f in crawl if f.endswith("_per_min")]
        view = {"spider": spider, "timestamp": int(times[order[-1]])}
        view.update(self._combine(order, pick, rest, None))
        if any(crawling):  # gauges and rates over the same nodes
            view.update(self._combine(order, pick, crawl, crawling))
        else:
            view.update(self._combine(order, pick, [f for f in crawl if f not in rates], None))
            view.update(dict.fromkeys(rates))
        view.update({f: view[f] or 0 for f in rates})  # no node crawling: nothing per minute
        counts = collections.Counter(cols["state"])
        view.update({f"nodes_{state}": counts[state] for state in STATES})
        return view

    def _combine(self, order, pick, fields, mask):
        """``combine``'s figures over the rows (``order``: their positions in time order, ``pick`` taking them in
        that order), those of ``mask`` only if given."""
        cols, numeric = self.columns, self.numeric()
        if mask is not None and all(mask):  # every node (the usual case): nothing to leave out
            mask = None
        in_time = mask if mask is None else pick(mask)

        def rows(values, keep):
            return values if keep is None else list(itertools.compress(values, keep))

        def in_order(f):
            """The column as ``_combined`` reads it: in time order where that decides, at least."""
            rule, kinds = SPIDER_FIELDS[f], numeric.get(f)
            if rule == "newest" and kinds is not None and mask is None:
                return (cols[f][order[-1]],)  # every one a number: the newest is the last in time
            if rule == "max" and kinds is not None and len(kinds) == 1 and mask is None:
                return cols[f]  # numbers of one type: the highest is the same in any order
            return rows(pick(cols[f]), in_time) if rule in ("newest", "max") else rows(cols[f], mask)

        columns = {f: in_order(f) for f in fields if not SPIDER_FIELDS[f].startswith("host")}
        by_host = [f for f in fields if SPIDER_FIELDS[f].startswith("host")]
        if by_host:  # each host's newest row
            newest = dict(zip(rows(pick(self.hosts()), in_time), rows(order, in_time)))  # a later one overwrites
            get = operator.itemgetter(*newest.values(), -1)  # a tuple however few
            columns.update({f: get(cols[f])[:-1] for f in by_host})
        return _combined(columns, fields, numeric)

    def hosts(self):
        """Each node's host (its node id when it names none), as ``combine`` reads them."""
        hosts = self.columns["host"]
        return hosts if None not in hosts else [s.get("host", s.get("node")) for s in self.members]

    def started(self):
        """When the first of the nodes started (None if none says)."""
        return min(numbers(self.columns["start_time"]), default=None)  # gated: finite


# A spider's crawl, derived by readers (``spider_state``), never stored.
CRAWL_STATES = ("crawling", "idle", "finished", "paused")
FINISHED_AFTER = SETTING["MONITOR_FINISHED_AFTER"].default


def queued_work(figures) -> float:
    """Requests and start URLs waiting (what keeps a crawl crawling), from a view's combined queue figures."""
    return sum(number(figures.get(f), 0) for f in ("queue_requests", "queue_start_urls"))


def spider_state(snaps: list, queued, now: float, finished_after: float = FINISHED_AFTER, states=None) -> tuple:
    """``(state, idle_for)`` of a spider from its nodes' snapshots (with their ``state``), the entries waiting in
    its requests queue and start URLs (``queued``; None for unknown, as for a spider without scrapy-redis), and
    Redis's clock: ``paused`` when every live node is paused; ``crawling`` while work is queued or a live node was
    busy at its last report (a page, a request in flight or work queued over its last interval: its ``idle_since``
    is that report's ``timestamp``); else ``finished`` once every live node has been idle (its ``idle_since``) for
    ``finished_after`` seconds, ``idle`` before. A spider with no live node and nothing queued is ``finished`` once
    every node closed, ``idle`` while one is stale (it may come back). ``idle_for``: seconds since the last live
    node's last page (None without a live node)."""
    states = column(snaps, "state") if states is None else states  # at C speed: a spider may have 10,000
    live = list(itertools.compress(snaps, map(CRAWLING_STATES.__contains__, states)))
    if live and states.count("paused") == len(live):
        return "paused", None
    if queued or any(number(s.get("idle_since"), -math.inf) >= number(s.get("timestamp"), math.inf)
                     for s in live if s.get("state") == "live"):  # a paused node's report is no work
        return "crawling", None
    if not live:
        return ("idle" if "stale" in states else "finished"), None
    since = []
    for s in live:
        idle = number(s.get("idle_since"))
        since.append(now if idle is None else idle + last_report(s) - number(s.get("timestamp"), 0))
    idle_for = max(now - max(since), 0)
    return ("finished" if idle_for >= finished_after else "idle"), round(idle_for, 1)


def slowed_domains(domains):
    """``{domain: delay}`` of the domains the nodes report slowed cluster-wide, from each node's ``domains``: a slim
    snapshot's has a fourth column, ``delays``, only when one is set (``monitor_contract.slim_domains``); a whole
    snapshot's (the views of ``?fields=all``) say each domain's ``delay``."""
    out, listed = {}, list(filter(None, domains))
    if set(map(type, listed)) == {list}:  # slim columns, which have delays only when one is set: found at C speed
        listed = list(itertools.compress(listed, map((3).__lt__, map(len, listed))))
    for domains in listed:
        if domains.__class__ is dict:
            delays = ((name, d.get("delay")) for name, d in domains.items())
        else:
            delays = zip(domains[0], domains[3]) if len(domains) > 3 else ()
        for name, delay in delays:
            if delay:
                out[name] = max(out.get(name, 0), delay)
    return out


def spiders_view(nodes: dict[str, Snapshot], r: Optional[redis.Redis] = None, prefix: Optional[str] = None,
                 now: Optional[float] = None, finished_after: float = FINISHED_AFTER,
                 fields: Iterable[str] = tuple(SPIDER_FIELDS), memo: Optional[dict] = None,
                 histories: Optional[tuple] = None) -> dict[str, dict]:
    """``{spider: cluster view}`` for every spider that has nodes, each view's ``nodes`` a sorted id list and its
    crawl ``state`` and ``idle_for`` (``spider_state``, at ``now`` on Redis's clock, default this process's);
    given a Redis client ``r``, each view also has its queue forecast (``queue_forecasts``). ``fields``: only
    these SPIDER_FIELDS (the queue's are needed for ``state``). ``memo``, a dict kept between calls by one
    reader: a spider whose snapshots are the very objects of the last call (a NodeReader shares unchanged ones)
    keeps its combined figures, so routes reading the same pass combine it once. ``histories``: the forecasts'
    histories read already (``queue_forecasts``' ``read``)."""
    with gc_paused():
        return _spiders_view(nodes, r, prefix, now, finished_after, fields, memo, histories)


def _spiders_view(nodes, r, prefix, now, finished_after, fields, memo, histories):
    groups = spider_groups(nodes)
    out, firsts = {}, {}
    for spider in sorted(groups):
        ids, members = list(groups[spider]), list(groups[spider].values())
        kept = memo.get(spider) if memo is not None else None
        if kept and kept[0].ids == ids and all(map(operator.is_, kept[0].members, members)):
            columns, view = kept[0], dict(kept[1])
        else:
            fresh = not kept or kept[0].fields != tuple(fields)
            columns = (SpiderColumns(fields) if fresh else kept[0]).update(ids, members)
            view = columns.view(spider)
            view["slowed"] = slowed_domains(columns.columns["domains"])
            view["started"] = columns.started()
            view["nodes"] = columns.sorted_ids
            if memo is not None:
                memo[spider] = (columns, dict(view))
        view["state"], view["idle_for"] = spider_state(members, queued_work(view), time.time() if now is None else now,
                                                       finished_after, columns.columns["state"])
        out[spider] = view
        firsts[spider] = columns.crawling
    for gone in set(memo or ()) - set(groups):
        memo.pop(gone, None)
    if r is not None:
        for spider, forecast in queue_forecasts(r, nodes, firsts, prefix, now, histories).items():
            out[spider].update(forecast)
    return out


# ---------------------------------------------------------------------------- queue forecast

# The forecast fits the queue size over this much of the recent history: long enough to smooth a crawler's
# bursts, short enough to follow a change of pace.
QUEUE_WINDOW = 300


def queue_forecast(rows: list[dict]) -> dict:
    """``{"queue_rate": requests per minute (negative while draining), "queue_eta": seconds until empty
    at that rate, None unless it shrinks}`` from history rows (oldest first), by a least-squares line
    through the ``queue_requests`` readings since the queue was last empty (a refill is a new batch), from
    its peak on when it has one before the newest reading.
    Both None with fewer than two readings."""
    points = [(row["timestamp"], row["queue_requests"]) for row in rows
              if is_number(row.get("timestamp")) and is_number(row.get("queue_requests"))]
    for i in range(len(points) - 2, -1, -1):
        if points[i][1] == 0:
            points = points[i + 1:]
            break
    # A queue past its peak (filled by a burst of links, now draining) is forecast from the peak on.
    peak = max(range(len(points)), key=lambda i: points[i][1], default=0)
    if len(points) - peak >= 2:
        points = points[peak:]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return {"queue_rate": None, "queue_eta": None}
    mean_t = sum(t for t, _ in points) / len(points)
    mean_q = sum(q for _, q in points) / len(points)
    slope = (sum((t - mean_t) * (q - mean_q) for t, q in points)
             / (sum((t - mean_t) ** 2 for t, _ in points) or 1))
    eta = points[-1][1] / -slope if slope < 0 else None
    return {"queue_rate": round(slope * 60, 1), "queue_eta": None if eta is None else round(eta)}


def spider_groups(nodes):
    """``{spider: {node: snapshot}}`` of ``nodes``, in their order (one spider's nodes found at C speed)."""
    spiders = set(map(operator.itemgetter("spider"), nodes.values()))
    if len(spiders) <= 1:
        return {spider: nodes for spider in spiders}
    groups = {}
    for node, snapshot in nodes.items():
        groups.setdefault(snapshot["spider"], {})[node] = snapshot
    return groups


def first_crawling(ids, starts, states):
    """Of nodes ``ids`` with these ``start_time`` and ``state`` values (in the same order), the one whose history a
    spider's queue forecast reads, None if none crawls (see ``forecast_nodes``), found at C speed."""
    if not (set(map(type, starts)) <= NUMBER_TYPES and all(map(math.isfinite, starts))):
        starts = [number(start, 0) for start in starts]
    crawling = map(CRAWLING_STATES.__contains__, states)
    return min(itertools.compress(zip(starts, ids), crawling), default=(None, None))[1]


def forecast_nodes(nodes, firsts=None):
    """``({spider: node}, rows)``: whose history each spider's queue forecast reads (its crawling node that started
    first, the lowest id among those that started together: the queue is shared, so one node's readings are the
    spider's; the longest-running one has the most of them), and how many of each one's newest history rows.
    ``firsts``: ``{spider: that node, or None}``, found already (``SpiderColumns.crawling``, ``memo_firsts``)."""
    if firsts is None:
        firsts = {spider: SpiderColumns(()).update(list(members), list(members.values())).crawling
                  for spider, members in spider_groups(nodes).items()}
    chosen = {spider: node for spider, node in firsts.items() if node is not None}
    rows = max((math.ceil(QUEUE_WINDOW / number(nodes[n].get("interval"), DEFAULT_INTERVAL)) + 2
                for n in chosen.values()), default=0)
    return chosen, rows


def memo_firsts(memo):
    """``forecast_nodes``' ``firsts`` of the spiders a ``spiders_view`` with ``memo`` just combined."""
    return {spider: kept[0].crawling for spider, kept in memo.items()}


def queue_forecasts(r, nodes, firsts, prefix=None, now=None, read=None):
    """``{spider: queue_forecast}`` for every spider of ``firsts`` (as ``forecast_nodes`` takes them), in one round
    trip, from the histories of ``forecast_nodes``; ``read``: ``(rows, {node: history rows})`` read already
    (``queue_histories``), used for those nodes when read as many rows. A spider with no crawling node gets None
    figures."""
    chosen, rows = forecast_nodes(nodes, firsts)
    series = {}
    if read is not None and read[0] == rows:
        series = {n: read[1][n] for n in chosen.values() if n in read[1]}
    missing = [n for n in chosen.values() if n not in series]
    if missing:
        series.update(read_histories(r, missing, QUEUE_WINDOW / 60, prefix, now, rows))
    empty = {"queue_rate": None, "queue_eta": None}
    return {spider: queue_forecast(series[chosen[spider]]) if spider in chosen else dict(empty) for spider in firsts}


# ---------------------------------------------------------------------------- histories

# A row this far past ``now`` is from a bad clock or a forgery: dropped, so it cannot widen a chart.
FUTURE_SLACK = 60


def read_histories(r: redis.Redis, nodes: list[str], minutes: float, prefix: str, now: Optional[float] = None,
                   limit: Optional[int] = None) -> dict[str, list[dict]]:
    """``{node: rows}`` for the last ``minutes``, oldest first, each row a dict of HISTORY_FIELDS, in one
    round trip. Up to an hour comes from the full-resolution lists, longer spans (up to a day) from the
    5-minute tier. Values that are not numbers (or too large) read as None; rows without a timestamp in the
    window (``now`` plus FUTURE_SLACK at most) are dropped, and rows are sorted by time. ``limit``: read only
    each list's newest rows."""
    with r.pipeline(transaction=False) as pipe:
        queue_histories(pipe, nodes, minutes, prefix, limit)
        return parse_histories(nodes, pipe.execute(), minutes, now)


def queue_histories(pipe, nodes, minutes, prefix, limit=None):
    """Queue ``read_histories``' commands on ``pipe`` (a caller shares its round trip)."""
    key = history_key if minutes * 60 <= HISTORY_SECONDS else trend_key
    for node in nodes:
        pipe.lrange(key(prefix, node), 0, -1 if limit is None else limit - 1)


def parse_histories(nodes, lists, minutes, now=None):
    """``read_histories``' answer from the replies to ``queue_histories``."""
    now = time.time() if now is None else now
    since, until = now - minutes * 60, now + FUTURE_SLACK
    out = {}
    for node, raws in zip(nodes, lists):
        if isinstance(raws, Exception):  # from a pipeline executed with raise_on_error=False
            raise raws
        rows = []
        for raw in reversed(raws):
            try:
                values = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(values, list) and 0 < len(values) <= len(HISTORY_FIELDS):
                values = values + [None] * (len(HISTORY_FIELDS) - len(values))  # a row from before a new column
                row = {f: v if is_number(v) and abs(v) < NUMBER_LIMIT else None for f, v in zip(HISTORY_FIELDS, values)}
                if row["timestamp"] is not None and since <= row["timestamp"] <= until:
                    rows.append(row)
        rows.sort(key=lambda row: row["timestamp"])
        out[node] = rows
    return out


def spider_points(series, holds, hosts, step, last, before=None):
    """One point per ``step``-second bucket up to ``last`` over every node's rows (sorted, in the window),
    combined by ``SPIDER_FIELDS``. A node's last row counts in later buckets until it is
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
    combined = [f for f in HISTORY_FIELDS if f in SPIDER_FIELDS]
    counters = [f for f in combined if SPIDER_FIELDS[f] == "sum" and f not in CRAWLING_FIELDS]
    fields = [f for f in combined if f not in counters]
    latest = dict(before or {})  # node -> its newest row so far: where its counters stand
    points = []
    for b in sorted(buckets):
        nodes = list(buckets[b])
        rows = [buckets[b][n] for n in nodes]
        latest.update(buckets[b])
        point = {"timestamp": b * step, "nodes": len(rows)}
        point.update(combine(rows, fields, [hosts[n] for n in nodes]))
        point.update(combine(list(latest.values()), counters))
        points.append(point)
    return points


# The buckets' figures in one reply: a line per KEYS bucket, its ROLLUP_FIELDS values comma-separated ('' for a
# field it lacks), an empty line for a bucket that does not exist. Parsing one string is a tenth of the cost of
# 2,160 HGETALL replies.
ROLLUP_FIELDS = tuple(ROLLUP_COUNTERS.values()) + ("n", "q", "l")
READ_ROLLUPS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local ok, values = pcall(redis.call, 'HMGET', key, unpack(ARGV))
  local line = {}
  if ok then
    for j = 1, #ARGV do line[j] = (string.gsub(values[j] or '', '[,\\n]', '')) end
  end
  out[i] = (string.gsub(table.concat(line, ','), '^,*$', ''))
end
return table.concat(out, '\\n')
"""


def read_rollups(r: redis.Redis, prefix: str, spider: str, days: int, now: float) -> dict:
    """``{"spider", "days", "step", "points"}``: the spider's rollup buckets of the last ``days`` (7: 10-minute
    points, 90: hourly; monitor_contract.ROLLUP_TIERS), oldest first, one round trip. Buckets nobody wrote are
    left out; a figure a bucket lacks is None (0 for counters). Rates are over the part of the bucket gone by."""
    step = ROLLUP_STEPS[days]
    last = int(now) // step
    starts = [(last - i) * step for i in range(days * 86400 // step - 1, -1, -1)]
    keys = [rollup_key(prefix, spider, step, start) for start in starts]
    lines = as_text(r.eval(READ_ROLLUPS_LUA, len(keys), *keys, *ROLLUP_FIELDS)).split("\n")
    points = [rollup_point(line.split(","), start, step, now) for start, line in zip(starts, lines) if line]
    return {"spider": spider, "days": days, "step": step, "points": points}


ROLLUP_STEPS = {keep // 86400: step for step, keep in ROLLUP_TIERS}


def read_markers(r: redis.Redis, prefix: str, spider: str, since: float) -> list:
    """The spider's version markers since ``since``, oldest first: ``[{"at", "version", "node"}]``; malformed
    entries skipped."""
    out = []
    for raw in r.lrange(markers_key(prefix, spider), 0, -1):
        try:
            marker = loads(raw)
        except ValueError:
            continue
        if (isinstance(marker, dict) and is_number(marker.get("at")) and marker["at"] >= since
                and isinstance(marker.get("version"), str)):
            out.append({"at": marker["at"], "version": marker["version"], "node": str(marker.get("node", ""))})
    return out[::-1]


RATE_NAMES = tuple(f"{f}_per_min" for f in ROLLUP_COUNTERS)


def rollup_point(values, start, step, now):
    """One history point from a bucket's ROLLUP_FIELDS values (text; see ROLLUP_RULES). Counters and the
    queue read as whole numbers below 1e18 (else 0 and None), p95 as a finite number (else None)."""
    values = (list(values) + [""] * len(ROLLUP_FIELDS))[:len(ROLLUP_FIELDS)]
    wholes, p95 = values[:-1], values[-1]
    digits = "".join(wholes)
    if digits.isdigit() and digits.isascii() and max(map(len, wholes)) < 19:  # the usual bucket, checked at once
        ints = [int(t) if t else None for t in wholes]
    else:
        ints = [int(t) if t.isdigit() and t.isascii() and len(t) < 19 else None for t in wholes]
    span = min(step, max(now - start, 1.0))
    per_min = 60 / span
    counts = [c or 0 for c in ints[:len(ROLLUP_COUNTERS)]]
    point = {"timestamp": start}
    point.update(zip(ROLLUP_COUNTERS, counts))
    point.update(zip(RATE_NAMES, [round(c * per_min, 2) for c in counts]))
    node_ms, queue = ints[len(ROLLUP_COUNTERS):]
    point["nodes"] = round((node_ms or 0) / 1000 / span, 2)
    point["queue_requests"] = queue
    try:
        p95 = float(p95)
    except ValueError:
        p95 = None
    point["latency_p95"] = p95 if p95 is not None and math.isfinite(p95) and 0 <= p95 < NUMBER_LIMIT else None
    return point
