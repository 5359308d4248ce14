"""The cluster in Prometheus's text format: collectors built per scrape over one read of the status hash.

Two levels. ``spider`` (the default): per node only a core of CORE series (up, state, host CPU and memory,
process CPU and RSS, last report, pages, items, requests, errors, retries), the rest summed per spider (status
classes, dropped items, exceptions, warnings; the download latency histogram merged, per-domain totals, item
field coverage weighted by items) or per host (network bytes); ``node``: every series per node, as before.
Per-spider node counts, queues and run totals come at both levels. ``prometheus-rules.yml`` reads these names at
the default level (a test checks it).
"""

import collections
import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from monitor_contract import LATENCY_BUCKETS, as_text, is_number, number
from monitor_read import CRAWL_STATES, FINISHED_AFTER, STATES, run_totals, spiders_view

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


def exposition(nodes, skipped, now, raw_totals, raw_dead, detail="spider", stable=False,
               finished_after=FINISHED_AFTER, extra=()):
    """The /prometheus body over one read of the status hash (``nodes``, ``skipped``, ``now``), the run totals
    and the dead letter totals hashes (and ``extra`` collectors): ``node_text``, then the other families through
    prometheus_client."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(nodes, skipped, detail, stable, now, finished_after))
    registry.register(RunsCollector(raw_totals))
    registry.register(DeadCollector(raw_dead))
    for collector in extra:
        registry.register(collector)
    return node_text(nodes, detail, stable) + generate_latest(registry)


def _escaped(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def node_text(nodes, detail="spider", stable=False):
    """The per-node families in the text format (at ``spider`` the NODE_CORE fields, up and state; at ``node``
    every GAUGES and COUNTERS field too), written here rather than through prometheus_client: they are the bulk
    of a scrape (10,000 nodes: 120,000 lines), and each node's labels are escaped once, not once a series."""
    label = stable_ids(nodes) if stable else {}
    heads = {node: f'node="{_escaped(label.get(node, node))}",spider="{_escaped(s["spider"])}"'
             for node, s in nodes.items()}
    families = [(field, doc, scale, "gauge", name) for field, name, doc, scale in GAUGES]
    families += [(field, doc, 1, "counter", name + "_total") for field, name, doc in COUNTERS]
    out = []
    for field, doc, scale, kind, sample in families:
        if detail == "node" or field in NODE_CORE:
            out.append(f"# HELP {sample} {doc}\n# TYPE {sample} {kind}\n")
            for node, s in nodes.items():
                value = s.get(field)
                if value.__class__ is int or value.__class__ is float:
                    value = value if scale == 1 else round(value * scale, 6)
                    out.append(f"{sample}{{{heads[node]}}} {floatToGoString(value)}\n")
    out.append("# HELP scrapy_node_up 1 while the node reports on time, else 0.\n# TYPE scrapy_node_up gauge\n")
    out += [f"scrapy_node_up{{{heads[node]}}} {'1.0' if s['state'] == 'live' else '0.0'}\n"
            for node, s in nodes.items()]
    out.append("# HELP scrapy_node_state 1 for the node's state (live, paused, stale, closed).\n"
               "# TYPE scrapy_node_state gauge\n")
    out += [f'scrapy_node_state{{{heads[node]},state="{s["state"]}"}} 1.0\n' for node, s in nodes.items()]
    return "".join(out).encode()


class ClusterCollector:
    """A prometheus_client collector over one read of the status hash, at ``detail`` ``spider`` or ``node``
    (LEVELS), for every family but ``node_text``'s; with ``stable`` the node label is the id without its pid
    (``stable_ids``)."""

    def __init__(self, nodes, skipped, detail="spider", stable=False, now=None, finished_after=FINISHED_AFTER):
        self.nodes = nodes
        self.skipped = skipped
        self.now, self.finished_after = now, finished_after
        self.per_node = detail == "node"
        self.label = stable_ids(nodes) if stable else {node: node for node in nodes}

    def collect(self):
        views = spiders_view(self.nodes, now=self.now, finished_after=self.finished_after)
        for field, name, doc in COUNTERS:  # per node: node_text
            if self.per_node or field in NODE_CORE:
                continue
            if field in HOST_FIELDS:
                family = CounterMetricFamily(name, doc, labels=["host"])
                for host, value in host_figures(self.nodes, field).items():
                    family.add_metric([host], value)
                yield family
            else:
                family = CounterMetricFamily(name, doc + " Summed over the spider's nodes.", labels=["spider"])
                for spider, total in spider_sums(self.nodes, field).items():
                    family.add_metric([spider], total)
                yield family
        yield self.status_classes()
        count = GaugeMetricFamily("scrapy_nodes", "Nodes of each spider by state.", labels=["spider", "state"])
        queue = GaugeMetricFamily("scrapy_queue_size", "Entries in the spider's shared scrapy-redis queues.",
                                  labels=["spider", "queue"])
        for spider, view in views.items():
            for s in STATES:
                count.add_metric([spider, s], view[f"nodes_{s}"])
            for field, kind in QUEUES:
                if is_number(view.get(field)):
                    queue.add_metric([spider, kind], view[field])
        crawl = GaugeMetricFamily("scrapy_spider_state", "1 for the spider's crawl state (crawling, idle, finished, "
                                  "paused).", labels=["spider", "state"])
        for spider, view in views.items():
            for name in CRAWL_STATES:
                crawl.add_metric([spider, name], 1 if view["state"] == name else 0)
        yield count
        yield queue
        yield crawl
        yield from insight_families(self.nodes, self.label if self.per_node else None)
        yield GaugeMetricFamily("scrapy_monitor_skipped_entries",
                                "Malformed values in the status hash, left out above.", value=self.skipped)

    def status_classes(self):
        per_node = self.per_node
        family = CounterMetricFamily("scrapy_http_responses", "Responses by status class.",
                                     labels=(["node", "spider"] if per_node else ["spider"]) + ["status_class"])
        for c in range(1, 6):
            field = f"status_{c}xx"
            if per_node:
                for node, s in self.nodes.items():
                    if is_number(s.get(field)):
                        family.add_metric([self.label[node], s["spider"], f"{c}xx"], s[field])
            else:
                for spider, total in spider_sums(self.nodes, field).items():
                    family.add_metric([spider, f"{c}xx"], total)
        return family


def spider_sums(nodes, field):
    """``{spider: the field summed over its nodes that report it}``."""
    out = {}
    for s in nodes.values():
        value = s.get(field)
        if value.__class__ is int or value.__class__ is float:
            out[s["spider"]] = out.get(s["spider"], 0) + value
    return out


def host_figures(nodes, field):
    """``{host: the field in the host's newest report}``: a host figure counted once, however many nodes."""
    newest = {}
    for s in nodes.values():
        host = s.get("host")
        if isinstance(host, str) and is_number(s.get(field)):
            if host not in newest or number(s.get("timestamp"), 0) >= number(newest[host].get("timestamp"), 0):
                newest[host] = s
    return {host: s[field] for host, s in newest.items()}


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


def insight_families(nodes, label=None):
    """The download latency histogram, per-domain counters and item field coverage: of every node (``label``:
    its node label per id), or of every spider (None): histograms merged, domain figures summed, coverage the
    mean over its nodes weighted by their items."""
    per_node = label is not None
    labels = ["node", "spider"] if per_node else ["spider"]
    latency = HistogramMetricFamily("scrapy_download_latency_seconds", "Download latency of the responses over "
                                    "the run" + ("" if per_node else ", all the spider's nodes merged") + ".",
                                    labels=labels)
    coverage = GaugeMetricFamily("scrapy_item_field_coverage_ratio",
                                 "Share of the run's items with the field present and not empty.",
                                 labels=labels + ["field"])
    counters = {field: CounterMetricFamily(name, doc, labels=labels + ["domain"])
                for field, name, doc in DOMAIN_COUNTERS}
    statuses = CounterMetricFamily("scrapy_domain_error_responses",
                                   "Responses from the domain by error status (4xx, 5xx, and 429 among the 4xx).",
                                   labels=labels + ["domain", "status"])
    bounds = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
    histograms, domains, fields = {}, {}, {}  # per key (node or spider): merged figures
    for node, s in nodes.items():
        key = (label[node], s["spider"]) if per_node else (s["spider"],)
        buckets = s.get("latency_buckets")
        if buckets:
            merged = histograms.get(key)
            histograms[key] = ([a + b for a, b in zip(merged[0], buckets)], merged[1] + number(s.get("latency_sum"), 0)
                               ) if merged else (buckets, number(s.get("latency_sum"), 0))
        if s.get("domains"):
            mine = domains.setdefault(key, {})
            for domain, figures in s["domains"].items():
                values = [figures[f] for f in DOMAIN_FIGURES]
                kept = mine.get(domain)
                mine[domain] = values if kept is None else [
                    a if b is None else b if a is None else a + b for a, b in zip(kept, values)]
        if s.get("fields"):
            items = max(number(s.get("items"), 0), 0)
            mine = fields.setdefault(key, {})
            for field, share in s["fields"].items():
                kept = mine.get(field)
                mine[field] = (share * items, items, share, 1) if kept is None else (
                    kept[0] + share * items, kept[1] + items, kept[2] + share, kept[3] + 1)
    for key, (counts, total) in histograms.items():  # the buckets are cumulative: their sums are too
        latency.add_metric(list(key), list(zip(bounds, counts)), total)
    families = [*counters.values(), *(status for status in DOMAIN_STATUSES)]
    for key, mine in domains.items():
        for domain, values in mine.items():
            for family, value in zip(families, values):
                if value is None:
                    continue
                if isinstance(family, str):
                    statuses.add_metric([*key, domain, family], value)
                else:
                    family.add_metric([*key, domain], value)
    for key, mine in fields.items():
        for field, (weighted, weight, shares, count) in mine.items():  # a node's own share stays exact
            coverage.add_metric([*key, field], shares if count == 1 else
                                round(weighted / weight if weight else shares / count, 4))
    yield latency
    yield from counters.values()
    yield statuses
    yield coverage
