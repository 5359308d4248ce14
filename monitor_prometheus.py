"""The cluster in Prometheus's text format: collectors built per scrape over one read of the status hash.

Node gauges and counters, responses by status class, node states, per-spider node counts and queues, the
download latency histogram, per-domain counters, item field coverage and run totals. ``prometheus-rules.yml``
reads these names (a test checks it).
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

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


class ClusterCollector:
    """A prometheus_client collector over one read of the status hash."""

    def __init__(self, nodes, skipped, now=None, finished_after=FINISHED_AFTER):
        self.nodes = nodes
        self.skipped = skipped
        self.now, self.finished_after = now, finished_after

    def collect(self):
        labels = ["node", "spider"]
        for field, name, doc, scale in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            self.add(family, field, scale)
            yield family
        for field, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            self.add(family, field)
            yield family
        family = CounterMetricFamily("scrapy_http_responses", "Responses by status class.",
                                     labels=labels + ["status_class"])
        for node, s in self.nodes.items():
            for c in range(1, 6):
                if is_number(s.get(f"status_{c}xx")):
                    family.add_metric([node, s["spider"], f"{c}xx"], s[f"status_{c}xx"])
        yield family
        up = GaugeMetricFamily("scrapy_node_up", "1 while the node reports on time, else 0.", labels=labels)
        for node, s in self.nodes.items():
            up.add_metric([node, s["spider"]], 1 if s["state"] == "live" else 0)
        yield up
        state = GaugeMetricFamily("scrapy_node_state", "1 for the node's state (live, paused, stale, closed).",
                                  labels=labels + ["state"])
        for node, s in self.nodes.items():
            state.add_metric([node, s["spider"], s["state"]], 1)
        yield state
        views = spiders_view(self.nodes, now=self.now, finished_after=self.finished_after)
        count = GaugeMetricFamily("scrapy_nodes", "Nodes of each spider by state.", labels=["spider", "state"])
        queue = GaugeMetricFamily("scrapy_queue_size", "Entries in the spider's shared scrapy-redis queues.",
                                  labels=["spider", "queue"])
        for spider, view in views.items():
            for state in STATES:
                count.add_metric([spider, state], view[f"nodes_{state}"])
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
        yield from insight_families(self.nodes)
        yield GaugeMetricFamily("scrapy_monitor_skipped_entries",
                                "Malformed values in the status hash, left out above.", value=self.skipped)

    def add(self, family, field, scale=1):
        for node, s in self.nodes.items():
            if is_number(s.get(field)):
                family.add_metric([node, s["spider"]], s[field] * scale if scale == 1 else round(s[field] * scale, 6))


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


def insight_families(nodes):
    """The download latency histogram, per-domain counters and item field coverage of every node."""
    labels = ["node", "spider"]
    latency = HistogramMetricFamily("scrapy_download_latency_seconds",
                                    "Download latency of the node's responses over its run.", labels=labels)
    coverage = GaugeMetricFamily("scrapy_item_field_coverage_ratio",
                                 "Share of the run's items with the field present and not empty.",
                                 labels=labels + ["field"])
    counters = {field: CounterMetricFamily(name, doc, labels=labels + ["domain"])
                for field, name, doc in DOMAIN_COUNTERS}
    statuses = CounterMetricFamily("scrapy_domain_error_responses",
                                   "Responses from the domain by error status (4xx, 5xx, and 429 among the 4xx).",
                                   labels=labels + ["domain", "status"])
    for node, s in nodes.items():
        buckets = s.get("latency_buckets")
        if buckets:
            bounds = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([node, s["spider"]], list(zip(bounds, buckets)), number(s.get("latency_sum"), 0))
        for domain, figures in (s.get("domains") or {}).items():
            for field, family in counters.items():
                if figures[field] is not None:
                    family.add_metric([node, s["spider"], domain], figures[field])
            for status in DOMAIN_STATUSES:
                if figures[status] is not None:
                    statuses.add_metric([node, s["spider"], domain, status], figures[status])
        for field, share in (s.get("fields") or {}).items():
            coverage.add_metric([node, s["spider"], field], share)
    yield latency
    yield from counters.values()
    yield statuses
    yield coverage
