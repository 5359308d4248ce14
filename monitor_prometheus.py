"""The cluster in Prometheus's text format, written per scrape over one read of the node hashes.

Two levels. ``spider`` (the default): per node only a core of CORE series (up, state, host CPU and memory,
process CPU and RSS, last report, pages, items, requests, errors, retries), the rest summed per spider (status
classes, dropped items, exceptions, warnings; the download latency histogram merged, per-domain totals, item
field coverage weighted by items) or per host (network bytes); ``node``: every series per node, as before.
Per-spider node counts, queues and run totals come at both levels. ``prometheus-rules.yml`` reads these names at
the default level (a test checks it).

A scrape reads no whole snapshot of a node that writes its insight value: the core and summed figures come
from the API's read of the slim hash, crawl insight from the insight hash, whose columns decode and add up at C
speed (``scrape_input``, ``Insight``). The node and spider families
(10,000 nodes: over 120,000 lines, two million with ``?detail=node``) are written here as prometheus_client's
``generate_latest`` writes them (same lines, labels in name order), but each node's or spider's labels are
escaped once, not once a sample, and the body is encoded in blocks of BLOCK lines into one buffer; the small
families (runs, dead letters, Redis) go through prometheus_client.
"""

import collections
import io
import itertools
import operator
import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from monitor_contract import BIG_FIELDS, LATENCY_BUCKETS, as_text, is_number, number
from monitor_read import CRAWL_STATES, FINISHED_AFTER, STATES, combine, numbers, queued_work, spider_state
from monitor_records import run_totals
from monitor_snapshot import column, decode_snapshot, node_state, parse_insights

# (snapshot field, metric name, help, scale): base units, so percentages become ratios.
GAUGES = (
    ("cpu", "scrapy_host_cpu_usage_ratio", "Host CPU in use, 0 to 1.", 0.01),
    ("memory", "scrapy_host_memory_usage_ratio", "Host memory in use, 0 to 1.", 0.01),
    ("process_cpu", "scrapy_process_cpu_usage_ratio", "CPU used by the crawler process (1 = one core).", 0.01),
    ("rss", "scrapy_process_resident_memory_bytes", "Resident memory of the crawler process.", 1),
    ("timestamp", "scrapy_node_last_report_timestamp_seconds", "When the node last reported.", 1),
    ("start_time", "scrapy_node_start_time_seconds", "When the node's crawl started.", 1),
    ("interval", "scrapy_node_report_interval_seconds", "Seconds between the node's reports.", 1),
)
COUNTERS = (
    ("bytes_sent", "scrapy_host_network_sent_bytes", "Bytes sent by the host."),
    ("bytes_recv", "scrapy_host_network_received_bytes", "Bytes received by the host."),
    ("pages", "scrapy_responses_received", "Responses received (response_received_count)."),
    ("items", "scrapy_items_scraped", "Items scraped (item_scraped_count)."),
    ("dropped", "scrapy_items_dropped", "Items dropped by pipelines (item_dropped_count)."),
    ("requests", "scrapy_downloader_requests", "Requests sent (downloader/request_count)."),
    ("exceptions", "scrapy_downloader_exceptions", "Download exceptions (downloader/exception_count)."),
    ("retries", "scrapy_retries", "Requests retried (retry/count)."),
    ("errors", "scrapy_log_errors", "ERROR log lines (log_count/ERROR)."),
    ("warnings", "scrapy_log_warnings", "WARNING log lines (log_count/WARNING)."),
)
QUEUES = (("queue_requests", "requests"), ("queue_start_urls", "start_urls"), ("queue_dupefilter", "dupefilter"))
# The fields exported per node at the default level (with up and state: CORE series a node).
NODE_CORE = frozenset(("cpu", "memory", "process_cpu", "rss", "timestamp", "pages", "items", "requests", "errors",
                       "retries"))
CORE = len(NODE_CORE) + 2
# Per host at the default level (each host once, by its newest report); the other fields not in NODE_CORE are
# summed per spider, except these, which say nothing summed.
HOST_FIELDS = frozenset(("bytes_sent", "bytes_recv"))
NODE_ONLY = frozenset(("start_time", "interval"))
LEVELS = ("spider", "node")
NODE_LABELS = ("id", "nopid")  # the node label: the node id, or the id without its pid (``stable_ids``)
# The pid a default node id ends with (<spider>:<hostname>:<pid>): a new one each run, so new series each run.
PID = re.compile(r":\d+\Z")


def stable_ids(nodes):
    """``{node id: label}``: each id without its trailing ``:<pid>`` (so a restarted crawler continues its
    series), unless two live ids share that label: those keep their pid."""
    labels = {node: PID.sub("", node) for node in nodes}
    taken = collections.Counter(labels.values())
    return {node: label if taken[label] == 1 else node for node, label in labels.items()}


# Lines joined and encoded at a time: the body grows by blocks, never through a list of every line.
BLOCK = 20_000
EXACT = 2 ** 53  # ints below this are floats exactly
QUEUE_FIELDS = tuple(field for field, _ in QUEUES)
SPIDER_COUNTERS = "Summed over the spider's nodes."


def exposition(decoded, now, raw_totals, raw_dead, detail="spider", stable=False, finished_after=FINISHED_AFTER,
               extra=(), skipped=0):
    """The /prometheus body (bytes) over one read of the node hashes and Redis's clock ``now``: ``decoded``,
    ``(node, snapshot with state, its Insight.part)`` triples (snapshot None for a value the gate refused; its big
    fields are not read) taken one at a time (``scrape_input``), and ``skipped`` values the read left out; the run
    totals and the dead letter totals hashes; at ``detail`` ``spider`` or ``node`` (LEVELS); with ``stable`` the
    node label is the id without its pid (``stable_ids``). ``extra``: more prometheus_client collectors."""
    per_node = detail == "node"
    insight, nodes = Insight(), {}
    for node, s, part in decoded:
        if s is None:
            skipped += 1
            continue
        insight.add(node if per_node else s["spider"], part)
        nodes[node] = s
    label = stable_ids(nodes) if stable else {}
    heads = {node: f'node="{_escaped(label.get(node, node))}",spider="{_escaped(s["spider"])}"'
             for node, s in nodes.items()}
    by_spider = {}
    for s in nodes.values():
        by_spider.setdefault(s["spider"], []).append(s)
    spiders = {spider: f'spider="{_escaped(spider)}"' for spider in by_spider}
    # labels (a node's, or its spider's) -> the snapshots
    groups = ({heads[node]: [s] for node, s in nodes.items()} if per_node else
              {spiders[spider]: members for spider, members in by_spider.items()})
    families = [node_lines(nodes, heads, per_node)]
    if not per_node:
        families.append(summed_lines(nodes, groups))
    families += [status_lines(groups), spider_lines(by_spider, spiders, now, finished_after),
                 insight_lines(insight, heads if per_node else spiders, per_node),
                 _family("scrapy_monitor_skipped_entries", "gauge", "Malformed values in the status hash, left out "
                         "above.", [f"scrapy_monitor_skipped_entries {_value(skipped)}\n"])]
    body = io.BytesIO()
    for lines in families:
        lines = iter(lines)
        while block := "".join(itertools.islice(lines, BLOCK)):
            body.write(block.encode())
    registry = CollectorRegistry()
    for collector in (RunsCollector(raw_totals), DeadCollector(raw_dead), *extra):
        registry.register(collector)
    body.write(generate_latest(registry))
    return body.getvalue()


def scrape_input(nodes, now, insights, whole):
    """``exposition``'s triples ``(node, snapshot with state, Insight.part)`` (snapshot None for a value the gate
    refused) from the API's read of the slim hash (``nodes``: ``{node: snapshot with state}`` at Redis's clock
    ``now``) and, in the same order, their values in the insight hash (``insights``). A node whose insight value is
    not usual or not in step with its slim value (``parse_insights``: an older extension's, one written by hand) is
    read and decoded whole: ``whole(names)`` gives those nodes' values in the status hash. So no scrape decodes a
    whole snapshot for a node that writes its insight value."""
    names, snaps = list(nodes), list(nodes.values())
    parts = parse_insights(insights, column(snaps, "seen"))
    redo = [name for name, part in zip(names, parts) if part is None]
    wholes = dict(zip(redo, whole(redo))) if redo else {}
    for name, s, part in zip(names, snaps, parts):
        if part is None:
            raw = wholes.get(name)
            if raw is None:  # deleted since the read
                continue
            s = decode_snapshot(raw)
            if s is None:
                yield name, None, None
                continue
            s.pop("age", None)  # readers derive it
            part = Insight.part(s)
            s["state"] = node_state(s, now)
        else:
            part = Insight.part(s, part)
        yield name, s, part


def _escaped(value):
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value):
    """A finite number as prometheus_client writes it (``floatToGoString``: Go's exponents from 1e7 up), faster:
    an int below 2 ** 53 is a float's exact value, written from its digits."""
    if value.__class__ is int and -EXACT < value < EXACT:
        if value < 1_000_000:
            return f"{value}.0"
        digits = str(value)
        return f"{digits[0]}.{digits[1:]}".rstrip("0.") + f"e+{len(digits) - 1:02d}"
    text = repr(float(value))
    dot = text.find(".")
    if dot > 6 and value > 0:
        return f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.") + f"e+{dot - 1:02d}"
    return floatToGoString(value) if text[-1] > "9" else text  # inf and nan: never from the gate


def _family(name, kind, doc, lines=()):
    """A family's lines: its HELP and TYPE lines, then ``lines``."""
    yield f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"
    yield from lines


def node_lines(nodes, heads, per_node):
    """The per-node families: at ``spider`` level the NODE_CORE fields, up and state; at ``node`` every GAUGES
    and COUNTERS field too."""
    pairs = list(zip(heads.values(), nodes.values()))
    families = [(field, doc, scale, "gauge", name) for field, name, doc, scale in GAUGES]
    families += [(field, doc, 1, "counter", name + "_total") for field, name, doc in COUNTERS]
    for field, doc, scale, kind, sample in families:
        if per_node or field in NODE_CORE:
            yield f"# HELP {sample} {doc}\n# TYPE {sample} {kind}\n"
            yield "".join([f"{sample}{{{head}}} {_value(v if scale == 1 else round(v * scale, 6))}\n"
                           for head, s in pairs if (v := s.get(field)).__class__ is int or v.__class__ is float])
    yield "# HELP scrapy_node_up 1 while the node reports on time, else 0.\n# TYPE scrapy_node_up gauge\n"
    yield "".join([f"scrapy_node_up{{{head}}} {'1.0' if s['state'] == 'live' else '0.0'}\n" for head, s in pairs])
    yield ("# HELP scrapy_node_state 1 for the node's state (live, paused, stale, closed).\n"
           "# TYPE scrapy_node_state gauge\n")
    yield "".join([f'scrapy_node_state{{{head},state="{s["state"]}"}} 1.0\n' for head, s in pairs])


def summed_lines(nodes, groups):
    """At ``spider`` level, the COUNTERS not in NODE_CORE: per host (HOST_FIELDS) or summed per spider
    (``groups``: ``{spider's labels: its snapshots}``)."""
    for field, name, doc in COUNTERS:
        if field in NODE_CORE:
            continue
        if field in HOST_FIELDS:
            yield from _family(name + "_total", "counter", doc, [
                f'{name}_total{{host="{_escaped(host)}"}} {_value(value)}\n'
                for host, value in host_figures(nodes, field).items()])
        else:
            yield from _family(name + "_total", "counter", f"{doc} {SPIDER_COUNTERS}", [
                f"{name}_total{{{key}}} {_value(total)}\n" for key, total in sums(groups, field).items()])


def status_lines(groups):
    """``scrapy_http_responses_total`` by status class, per node or per spider (``groups``: ``{labels: their
    snapshots}``)."""
    yield "# HELP scrapy_http_responses_total Responses by status class.\n# TYPE scrapy_http_responses_total counter\n"
    for c in range(1, 6):
        field = f"status_{c}xx"
        yield "".join([f'scrapy_http_responses_total{{{key},status_class="{c}xx"}} {_value(total)}\n'
                       for key, total in sums(groups, field).items()])


def spider_lines(by_spider, spiders, now, finished_after):
    """Per spider (``by_spider``: ``{spider: its snapshots}``): node counts by state, queue sizes (the newest
    report's, as in ``spiders_view``) and the crawl state (``spider_state``); without the rest of
    ``spiders_view`` (combined figures, slowed domains)."""
    views = {}
    for spider in sorted(by_spider):
        members = by_spider[spider]
        queues = combine(members, QUEUE_FIELDS)
        views[spiders[spider]] = (collections.Counter(s["state"] for s in members), queues,
                                  spider_state(members, queued_work(queues), now, finished_after)[0])
    yield from _family("scrapy_nodes", "gauge", "Nodes of each spider by state.", [
        f'scrapy_nodes{{{head},state="{s}"}} {_value(counts[s])}\n' for head, (counts, _, _) in views.items()
        for s in STATES])
    yield from _family("scrapy_queue_size", "gauge", "Entries in the spider's shared scrapy-redis queues.", [
        f'scrapy_queue_size{{queue="{kind}",{head}}} {_value(queues[field])}\n'
        for head, (_, queues, _) in views.items() for field, kind in QUEUES if is_number(queues[field])])
    yield from _family("scrapy_spider_state", "gauge",
                       "1 for the spider's crawl state (crawling, idle, finished, paused).", [
                           f'scrapy_spider_state{{{head},state="{name}"}} {"1.0" if state == name else "0.0"}\n'
                           for head, (_, _, state) in views.items() for name in CRAWL_STATES])


def sums(groups, field):
    """``{key: the field summed over the key's snapshots that report it}`` (``groups``: ``{key: snapshots}``)."""
    out = {}
    for key, members in groups.items():
        values = numbers([s.get(field) for s in members])
        if values:
            out[key] = sum(values)
    return out


def host_figures(nodes, field):
    """``{host: the field in the host's newest report}``: a host figure counted once, however many nodes."""
    newest = {}  # host -> (timestamp, figure)
    for s in nodes.values():
        host, value = s.get("host"), s.get(field)
        if host.__class__ is str and (value.__class__ is int or value.__class__ is float):
            when = number(s.get("timestamp"), 0)
            kept = newest.get(host)
            if kept is None or when >= kept[0]:
                newest[host] = when, value
    return {host: value for host, (_, value) in newest.items()}


class RedisCollector:
    """``scrapy_redis_*``: Redis's memory, evictions and clients per master, and the spiders' key sizes, from
    one ``monitor_redis.RedisWatch.read`` payload."""

    def __init__(self, health):
        self.health = health

    def collect(self):
        masters = self.health["nodes"]
        for name, doc, field, kind in (
                ("scrapy_redis_memory_used_bytes", "Memory Redis uses.", "used_memory", GaugeMetricFamily),
                ("scrapy_redis_memory_max_bytes", "Redis's memory limit: maxmemory, or the machine's memory when "
                 "maxmemory is 0.", "limit", GaugeMetricFamily),
                ("scrapy_redis_evicted_keys", "Keys Redis evicted for memory (evicted_keys).", "evicted_keys",
                 CounterMetricFamily),
                ("scrapy_redis_connected_clients", "Clients connected to Redis.", "connected_clients",
                 GaugeMetricFamily)):
            family = kind(name, doc, labels=["redis"])
            for master, figures in masters.items():
                if is_number(figures.get(field)):
                    family.add_metric([master], figures[field])
            yield family
        sizes = GaugeMetricFamily("scrapy_redis_queue_size", "Entries in each spider's scrapy-redis keys, read "
                                  "from Redis.", labels=["spider", "queue"])
        for spider, queues in sorted(self.health["spiders"].items()):
            for queue, figures in queues.items():
                if isinstance(figures, dict) and is_number(figures.get("size")):
                    sizes.add_metric([spider, queue], figures["size"])
        yield sizes


class RunsCollector:
    """``scrapy_runs_total{spider,finish_reason}``: runs ever recorded (capping the history never lowers it)."""

    def __init__(self, raw_totals):
        self.totals = run_totals(raw_totals)

    def collect(self):
        family = CounterMetricFamily("scrapy_runs", "Runs recorded, by finish reason (lost: a node that went "
                                     "silent without closing).", labels=["spider", "finish_reason"])
        for (spider, reason), count in sorted(self.totals.items()):
            family.add_metric([spider, reason], count)
        yield family


class DeadCollector:
    """``scrapy_dead_requests_total{spider}``: dead letters ever recorded (a cap or a requeue never lowers it)."""

    def __init__(self, raw_totals):
        self.totals = {as_text(k): int(v) for k, v in raw_totals.items() if as_text(v).isdigit()}

    def collect(self):
        family = CounterMetricFamily("scrapy_dead_requests", "Requests failed for good (dead letters) recorded.",
                                     labels=["spider"])
        for spider, count in sorted(self.totals.items()):
            family.add_metric([spider], count)
        yield family


# (snapshot domain figure, metric name, help): per-domain counters of the top domains.
DOMAIN_COUNTERS = (
    ("pages", "scrapy_domain_responses", "Responses received from the domain (top domains, the rest as 'other')."),
    ("errors", "scrapy_domain_errors", "ERROR log lines naming a request to the domain."),
)
DOMAIN_STATUSES = ("4xx", "5xx", "429", "503")
DOMAIN_FIGURES = (*(field for field, _, _ in DOMAIN_COUNTERS), *DOMAIN_STATUSES)
BOUNDS = (*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf")


def insight_lines(insight, labels, per_node):
    """The download latency histogram, per-domain counters and item field coverage of each key of ``insight``
    (an Insight; ``labels``: each key's labels): over a key's nodes, histograms merged, domain figures summed,
    coverage the mean weighted by their items (a single node's share as it is)."""
    histograms = {labels[key]: kept for key, kept in insight.histograms.items()}
    domains = {labels[key]: mine for key, mine in insight.domains.items()}
    fields = {labels[key]: mine for key, mine in insight.fields.items()}
    name = "scrapy_download_latency_seconds"
    yield (f"# HELP {name} Download latency of the responses over the run"
           f"{'' if per_node else ', all the spider' + chr(39) + 's nodes merged'}.\n# TYPE {name} histogram\n")
    for key, (counts, total) in histograms.items():
        yield from (f'{name}_bucket{{le="{bound}",{key}}} {_value(count)}\n' for bound, count in zip(BOUNDS, counts))
        yield f"{name}_count{{{key}}} {_value(counts[-1])}\n{name}_sum{{{key}}} {_value(total)}\n"
    merged = {key: {_escaped(domain): figures for domain, figures in _domain_totals(groups).items()}
              for key, groups in domains.items()}
    for i, (_, name, doc) in enumerate(DOMAIN_COUNTERS):
        yield f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n"
        for key, mine in merged.items():
            yield from (f'{name}_total{{domain="{domain}",{key}}} {_value(values[i])}\n'
                        for domain, values in mine.items() if values[i] is not None)
    name = "scrapy_domain_error_responses_total"
    yield (f"# HELP {name} Responses from the domain by error status (4xx, 5xx, and 429 among the 4xx).\n"
           f"# TYPE {name} counter\n")
    first = len(DOMAIN_COUNTERS)
    for key, mine in merged.items():
        for domain, values in mine.items():
            yield from (f'{name}{{domain="{domain}",{key},status="{status}"}} {_value(value)}\n'
                        for status, value in zip(DOMAIN_STATUSES, values[first:]) if value is not None)
    name = "scrapy_item_field_coverage_ratio"
    yield (f"# HELP {name} Share of the run's items with the field present and not empty.\n"
           f"# TYPE {name} gauge\n")
    for key, groups in fields.items():
        for field, (shares, items) in _field_rows(groups).items():
            yield f'{name}{{field="{_escaped(field)}",{key}}} {_value(_coverage(shares, items))}\n'


class Insight:
    """Crawl insight gathered per key (a node or a spider), one snapshot at a time (``add``): ``histograms``
    ``{key: [latency buckets, latency sum]}`` added up; ``domains`` ``{key: {domain names: [each node's domain
    columns]}}`` and ``fields`` ``{key: {field names: [(each node's shares, its items)]}}``, grouped by the names
    each node lists (in node order), so that the nodes that list the same names add up column by column at C
    speed (``_domain_totals``, ``_field_rows``)."""

    def __init__(self):
        self.histograms, self.domains, self.fields = {}, {}, {}

    @staticmethod
    def part(snapshot, insight=None):
        """What ``add`` needs of a node: ``(latency buckets, latency sum, domains [names, *DOMAIN_FIGURES], fields
        [names, shares], items)``: its insight from ``insight`` (``(latency buckets, domains, fields)`` of its insight
        value, ``parse_insights``), else from the whole snapshot's big fields, which are taken off it."""
        if insight is None:
            big = {field: snapshot.pop(field, None) for field in BIG_FIELDS}
            domains, fields = big["domains"], big["fields"]
            figures = list(domains.values()) if domains else ()
            insight = (big["latency_buckets"],
                       [list(domains), *(column(figures, f) for f in DOMAIN_FIGURES)] if domains else None,
                       [list(fields), list(fields.values())] if fields else None)
        buckets, domains, fields = insight
        return (buckets or None, number(snapshot.get("latency_sum"), 0), domains, fields,
                max(number(snapshot.get("items"), 0), 0))

    def add(self, key, part):
        """One node's ``part`` added to ``key``'s figures."""
        buckets, latency_sum, domains, fields, items = part
        if buckets:
            kept = self.histograms.get(key)
            if kept is None:
                self.histograms[key] = [buckets, latency_sum]
            else:
                kept[0] = list(map(operator.add, kept[0], buckets))
                kept[1] += latency_sum
        if domains:
            self.domains.setdefault(key, {}).setdefault(tuple(domains[0]), []).append(domains)
        if fields:
            self.fields.setdefault(key, {}).setdefault(tuple(fields[0]), []).append((fields[1], items))


def _domain_totals(groups):
    """``{domain: its DOMAIN_FIGURES summed over the nodes}`` (each None when no node has it) from ``Insight.domains``'
    groups of one key, in the order the domains first come."""
    out = {}
    for names, tables in groups.items():
        columns = tables[0][1:]
        if len(tables) > 1:  # each figure's columns end to end, then each domain's figures taken every len(names)
            width = len(names)
            columns = [[_total(flat[i::width]) for i in range(width)] for flat in (
                list(itertools.chain.from_iterable(map(operator.itemgetter(f), tables)))
                for f in range(1, 1 + len(DOMAIN_FIGURES)))]
        for name, figures in zip(names, zip(*columns)):
            kept = out.get(name)
            out[name] = list(figures) if kept is None else list(map(_plus, kept, figures))
    return out


def _field_rows(groups):
    """``{field: (each node's share, each node's items)}`` from ``Insight.fields``' groups of one key."""
    out = {}
    for names, rows in groups.items():
        items = [count for _, count in rows]
        for name, shares in zip(names, zip(*map(operator.itemgetter(0), rows))):
            kept = out.get(name)
            if kept is None:
                out[name] = (list(shares), list(items))
            else:
                kept[0].extend(shares)
                kept[1].extend(items)
    return out


def _total(values):
    """The sum of the figures that are not None (None if none is)."""
    try:
        return sum(values[1:], values[0])  # no None among them, the usual case (sought first, it costs more)
    except TypeError:
        values = [v for v in values if v is not None]
        return sum(values[1:], values[0]) if values else None


def _plus(a, b):
    """``a + b`` of two figures, either None when no node had it."""
    return a if b is None else b if a is None else a + b


def _coverage(shares, items):
    """A field's coverage over its nodes' ``shares`` and ``items``: its share for one node, else the mean of the
    shares weighted by items (plain mean when no node has items), to 4 places."""
    if len(shares) == 1:
        return shares[0]
    weight = sum(items)
    return round(sum(map(operator.mul, shares, items)) / weight if weight else sum(shares) / len(shares), 4)
