"""The node side: the ``SpiderMonitor`` Scrapy extension and what it samples, collects and obeys on a crawler.

Enable it in any Scrapy project with ``EXTENSIONS = {"monitors.SpiderMonitor": 500}``. Every MONITOR_INTERVAL
seconds it samples host, process and crawl metrics (``Sampler``), adds crawl insight (``Insight``: latency,
domains, item field coverage, error samples) and the scrapy-redis queue sizes, and writes the snapshot and
its history to Redis; at close it records the run. ``NodeControl`` applies fleet commands (pause, resume, stop,
drain). A crawler machine needs this file, ``monitor_contract.py`` (what is written where) and
``monitor_settings.py`` (the settings it reads).
"""

import bisect
import collections
import hashlib
import inspect
import logging
import os
import socket
import threading
import time
import weakref

import psutil
import redis
from itemadapter import ItemAdapter, is_item
from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from twisted.internet import defer, reactor, task, threads

from monitor_contract import (
    ACK_TTL,
    DOMAIN_COUNTS,
    DRAINED,
    HISTORY_SECONDS,
    LATENCY_BUCKETS,
    MAX_FIELDS,
    QUEUE_NAMES,
    QUEUE_SIZES_LUA,
    SAMPLE_TEXT,
    SAMPLES,
    STOPPED,
    TrendBuffer,
    control_ack_key,
    control_key,
    control_targets,
    dead_member,
    dumps,
    history_row,
    newest_command,
    percentile,
    redis_now,
    run_record,
    slow_delays,
    slow_key,
    write_dead,
    write_marker,
    write_run,
    write_snapshot,
)
from monitor_settings import SETTING, ConfigError, Outage, connect, key_prefix, redact, scrub, unknown_settings, value

logger = logging.getLogger(__name__)

# Counters read from Scrapy's own stats (snapshot field -> stats key).
STAT_COUNTERS = {
    "pages": "response_received_count",
    "items": "item_scraped_count",
    "requests": "downloader/request_count",
    "errors": "log_count/ERROR",
    "warnings": "log_count/WARNING",
    "retries": "retry/count",
    "exceptions": "downloader/exception_count",
    "dropped": "item_dropped_count",
}
STATUS_STAT = "downloader/response_status_count/"
RATE_FIELDS = ("pages", "items", "errors", "requests")
# (counter, rate field, scale): network in bytes per second, crawl counters per minute.
RATES = (("bytes_sent", "net_sent_rate", 1), ("bytes_recv", "net_recv_rate", 1)) + tuple(
    (f, f"{f}_per_min", 60) for f in RATE_FIELDS)
# CPU percentages and rates over less than this many seconds are noise; a sample that soon reuses the last.
MIN_WINDOW = 0.5
WINDOW_FIELDS = frozenset(["cpu", "process_cpu"] + [rate for _, rate, _ in RATES])
# A node reads its commands this often, whatever its MONITOR_INTERVAL (the goal: applied within 2 s).
CONTROL_POLL = 1.0
# The crawl waits this long at most for the first read of the commands (a paused spider's new node then starts
# paused); a slow or hanging Redis delays nothing more: a command read later is applied as soon as it arrives.
FIRST_READ_WAIT = 0.25


# ---------------------------------------------------------------------------- the extension

def scrapy_setting(crawler, name):
    """A setting of monitor_settings.SETTINGS as the extension reads it: the crawler's Scrapy setting of that
    name, else the environment variable, else the default; parsed (ConfigError naming it)."""
    raw = crawler.settings.get(name)
    return value(name, None if raw == "" else raw)


class SpiderMonitor:
    """Scrapy extension: every MONITOR_INTERVAL seconds, publish this process's metrics to Redis."""

    def __init__(self, crawler, interval, url, queue_url, node_id, prefix, insight_=None):
        self.crawler = crawler
        self.insight = insight_ or Insight()
        self.stats = crawler.stats
        self.interval = interval
        self.url = url
        self.queue_url = queue_url
        self.redis = connect(url)  # clients connect lazily; a malformed URL raises ValueError here
        self.queue_redis = self.redis if queue_url == url else connect(queue_url)
        self.node_id = node_id
        self.prefix = prefix
        self.history_len = max(1, int(HISTORY_SECONDS // interval))
        self.task = None
        self.first_tick = None  # the first report's delayed call
        self.lock = None  # held while a tick's thread works: ticks never overlap
        self.outage = Outage(logger)
        self.clock_offset = None  # Redis's clock minus ours, learnt from each write's reply
        self.trend = TrendBuffer()
        self.queue_keys = None
        self.base = {}
        self.sampler = Sampler()  # primed now, so the first tick's CPU figures cover start-up
        self.peak_rss = 0  # the run's largest RSS, for its run record
        self.rolled = {}  # the counters as of the last rollup written (monitor_contract.write_rollup)
        self.version = None  # MONITOR_VERSION, set by from_crawler; the spider's version once it opens
        self.marked = False  # whether the version marker has been written (once, with the first write)
        self.reports_dropped = 0  # snapshots not written because Redis did not answer (an outage, a failover)
        self.runs_keep = None  # MONITOR_RUNS_KEEP, set by from_crawler
        self.control = None  # a NodeControl when MONITOR_CONTROL is on
        self.busy = (None, None)  # (pages, when) of the last tick that saw a new page or work queued
        self.in_flight = False  # requests in flight at the last tick (``_in_flight``)
        self.dead = DeadLetters(SETTING["MONITOR_DEAD_KEEP"].default)  # replaced by from_crawler's

    @classmethod
    def from_crawler(cls, crawler):
        def setting(name):
            return scrapy_setting(crawler, name)

        try:
            if not setting("MONITOR_ENABLED"):
                raise NotConfigured("MONITOR_ENABLED is off")
            interval = setting("MONITOR_INTERVAL")
            queue_url = setting("REDIS_URL")
            url = setting("MONITOR_REDIS_URL") or queue_url
            insight = Insight(setting("MONITOR_TOP_DOMAINS"), (setting("MONITOR_ITEM_FIELDS") or [])[:MAX_FIELDS])
            ext = cls(crawler, interval, url, queue_url, setting("MONITOR_NODE_ID"),
                      key_prefix(setting("MONITOR_KEY_PREFIX"), url), insight)
            ext.runs_keep = setting("MONITOR_RUNS_KEEP")
            ext.version = setting("MONITOR_VERSION")
            ext.dead = DeadLetters(setting("MONITOR_DEAD_KEEP"))
        except ConfigError as exc:
            logger.error("Monitor: %s; the monitor is off, the crawl goes on", exc)
            raise NotConfigured() from None  # said above, once
        try:
            ext.control = NodeControl(ext) if setting("MONITOR_CONTROL") else None
        except ConfigError as exc:
            logger.error("Monitor: %s; fleet control is off on this node", exc)
        crawler.signals.connect(ext.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(ext.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(ext.insight.response_downloaded, signal=signals.response_downloaded)
        crawler.signals.connect(ext.insight.item_scraped, signal=signals.item_scraped)
        return ext

    async def spider_opened(self, spider):
        """Start reporting; with fleet control, read the commands once before the crawl starts (Scrapy waits)."""
        self.start(spider)
        if self.control:
            await maybe_deferred_to_future(self.control.open(spider))

    def start(self, spider):
        """Name the node and start the reporting loop (its first tick now)."""
        host = socket.gethostname()
        pid = os.getpid()
        self.node_id = self.node_id or f"{spider.name}:{host}:{pid}"
        self.queue_keys = self._queue_keys(spider)
        self.version = spider_version(spider, self.version)
        self.base = {"node": self.node_id, "spider": spider.name, "host": host, "pid": pid,
                     "interval": self.interval, "start_time": int(time.time()), "version": self.version,
                     "args_hash": args_hash(spider)}
        if self.queue_keys:
            self.base["queues"] = {**dict(zip(QUEUE_NAMES, self.queue_keys)), "start_urls_type": self._start_type(),
                                   "apart": self.queue_url != self.url}
        logger.info("Monitor: node %s reports to %s every %ss", self.node_id, redact(self.url), self.interval)
        for line in unknown_settings():
            logger.warning("Monitor: %s", line)
        self.insight.handler.spider = spider
        logging.getLogger().addHandler(self.insight.handler)  # error samples, while the spider runs
        self.dead.spider = spider
        if self.dead.keep:
            logging.getLogger().addHandler(self.dead)
        self.lock = defer.DeferredLock()
        self.task = task.LoopingCall(self.tick)
        self.task.start(self.interval, now=False)
        # The first report comes MIN_CPU_SPAN after the start, so its CPU figures cover a span they can measure.
        self.first_tick = reactor.callLater(MIN_CPU_SPAN, self.tick)

    async def spider_closed(self, spider, reason):
        """Stop the loop and publish the final ``closed`` snapshot (Scrapy waits for it)."""
        if self.task and self.task.running:
            self.task.stop()
        if self.first_tick and self.first_tick.active():
            self.first_tick.cancel()
        logging.getLogger().removeHandler(self.insight.handler)
        logging.getLogger().removeHandler(self.dead)
        if self.queue_keys is None:  # never opened
            return
        stats = dict(self.stats.get_stats())
        extra = {**self.control_fields(), "status": "closed", "finish_reason": str(reason),
                 **self.insight.take_interval()}
        await maybe_deferred_to_future(self.lock.run(self._in_thread, stats, extra, True))
        if self.control:
            await maybe_deferred_to_future(threads.deferToThread(self.control.forget))

    def tick(self, queued=False):
        """Runs on the reactor thread: copy the stats and hand sampling and Redis I/O to a thread. With
        ``queued`` (a control command was applied) it runs after the tick in progress instead of skipping."""
        if self.lock.locked and not queued:
            return  # the previous tick is still talking to Redis: ticks never overlap
        self.in_flight = self._in_flight()
        self.lock.run(self._in_thread, dict(self.stats.get_stats()),
                      {"status": "running", **self.control_fields(), **self.insight.take_interval()})

    def _in_flight(self):
        """Runs on the reactor: whether requests are being downloaded (or wait in a download slot, as with a
        download delay) or responses processed. In memory only: never the scheduler, which scrapy-redis keeps in
        Redis."""
        try:
            engine = self.crawler.engine  # Scrapy 2.13+ raises RuntimeError until the crawl starts
            return bool(engine.downloader.active) or not engine.scraper.slot.is_idle()
        except (AttributeError, RuntimeError):  # not open yet, or closing
            return False

    def control_fields(self):
        return self.control.status() if self.control else {}

    def _in_thread(self, stats, extra, final=False):
        d = threads.deferToThread(self.collect_and_publish, stats, extra, final)
        return d.addErrback(lambda f: logger.error("Monitor: tick failed: %s", f.getErrorMessage()))

    def collect_and_publish(self, stats, extra, final=False):
        """Runs in a thread: sample, read queue sizes, write to Redis. Returns the snapshot."""
        now = time.time()
        snapshot = {"timestamp": int(now), **self.base, **self.sampler.sample(stats, now), **extra,
                    **self.insight.figures()}
        if final:  # closed, it downloads nothing any more; and its last window, cut short, would extrapolate
            snapshot.update({rate: 0.0 for _, rate, _ in RATES})  # a few seconds into hundreds a minute
        snapshot.update(self._queue_sizes())
        self.peak_rss = snapshot["peak_rss"] = max(self.peak_rss, snapshot.get("rss") or 0)
        snapshot["dead"] = self.dead.count
        snapshot["idle_since"] = self._idle_since(snapshot, now)
        dead = self.dead.take()
        snapshot["reports_dropped"] = self.reports_dropped
        try:
            if self.clock_offset is None:  # the first write: history rows go on Redis's clock from the start
                self.clock_offset = redis_now(self.redis.time()) - time.time()
            row = history_row(snapshot, now + self.clock_offset)
            trend_rows = [self.trend.add(row)]
            if final:
                trend_rows.append(self.trend.flush())
            with self.redis.pipeline(transaction=False) as pipe:
                rolled = write_snapshot(pipe, self.prefix, snapshot, self.history_len, [r for r in trend_rows if r],
                                        stamp=True, row=row, rollup=(now + self.clock_offset, self.rolled))
                if not self.marked and self.version:  # a marker if the version changed: in the same round trip
                    write_marker(pipe, self.prefix, snapshot["spider"], self.version, now + self.clock_offset,
                                 self.node_id)
                if final:  # the run's record, in the same round trip
                    write_run(pipe, self.prefix, run_record(snapshot, offset=self.clock_offset),
                              self.base["start_time"], self.runs_keep)
                if dead:  # the dead letters since the last write, in the same round trip
                    write_dead(pipe, self.prefix, self.base["spider"],
                               self.dead.members(dead, self.node_id, self.clock_offset), self.dead.keep)
                sent = time.time()
                server_time = pipe.execute()[0]
        except redis.RedisError as exc:
            self.dead.put_back(dead)
            self.reports_dropped += 1
            self.outage.failed("Monitor: cannot write metrics to Redis at %s (%s); the crawl goes on, "
                               "retrying every %ss", redact(self.url), scrub(exc), self.interval)
            return snapshot
        self.clock_offset = redis_now(server_time) - sent
        self.rolled, self.marked = rolled, True
        self.outage.ok("Monitor: Redis at %s is back; node %s reports again", redact(self.url), self.node_id)
        return snapshot

    def _queue_keys(self, spider):
        """The scrapy-redis keys of this spider (requests, start URLs, dupefilter), or () if it has none."""
        def setting(name):
            return scrapy_setting(self.crawler, name)

        scheduler = setting("SCHEDULER")
        start_key = getattr(spider, "redis_key", None)
        if "scrapy_redis" not in scheduler and not start_key:
            return ()
        name = {"spider": spider.name}
        return (
            setting("SCHEDULER_QUEUE_KEY") % name,
            start_key or "",
            setting("SCHEDULER_DUPEFILTER_KEY") % name,
        )

    def _idle_since(self, snapshot, now):
        """Since when (this node's clock) it downloaded no page, had no request in flight and saw no request or
        start URL queued: the readers' "the crawl is done" (to the precision of one interval). Paused, it is not
        idle. Busy at this report, it is this report's time (readers: ``idle_since >= timestamp``)."""
        queued = any(snapshot.get(k) for k in ("queue_requests", "queue_start_urls"))
        if (queued or self.in_flight or snapshot["pages"] != self.busy[0]
                or snapshot.get("status") == "paused"):
            self.busy = (snapshot["pages"], now)
        return round(self.busy[1], 3)

    def _start_type(self):
        """How scrapy-redis keeps this spider's start URLs: ``list``, ``set`` or ``zset``."""
        if scrapy_setting(self.crawler, "REDIS_START_URLS_AS_SET"):
            return "set"
        return "zset" if scrapy_setting(self.crawler, "REDIS_START_URLS_AS_ZSET") else "list"

    def _queue_sizes(self):
        if not self.queue_keys:
            return {}
        names = ("queue_requests", "queue_start_urls", "queue_dupefilter")
        try:  # one key per script: a spider's keys may sit on three shards of a cluster
            with self.queue_redis.pipeline(transaction=False) as pipe:
                for key in self.queue_keys:
                    pipe.execute_command("EVAL", QUEUE_SIZES_LUA, 1, key)
                sizes = [size for sizes in pipe.execute() for size in sizes]
        except redis.RedisError:
            return dict.fromkeys(names)
        return dict(zip(names, (int(s) for s in sizes)))


def spider_version(spider, configured=None):
    """The version a node reports: ``configured`` (MONITOR_VERSION), else the spider's ``version`` attribute,
    else the first 12 hex digits of the SHA-256 of its class's source file (None if it has none)."""
    for given in (configured, getattr(spider, "version", None)):
        if given is not None and str(given).strip():
            return str(given).strip()[:200]
    try:
        with open(inspect.getsourcefile(type(spider)), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except (TypeError, OSError):
        return None


def args_hash(spider):
    """12 hex digits of a hash of the spider's arguments, names and values (never the values themselves): the
    text attributes its instance has that its class does not (what ``scrapy crawl -a name=value`` sets), or
    whose text value differs from the class's."""
    cls = type(spider)
    args = sorted((k, v) for k, v in vars(spider).items()
                  if isinstance(v, str) and not k.startswith("_") and isinstance(getattr(cls, k, ""), str)
                  and getattr(cls, k, None) != v)
    return hashlib.sha256(dumps(args, ensure_ascii=False).encode("utf-8", "replace")).hexdigest()[:12]


# ---------------------------------------------------------------------------- host, process and crawl metrics

# CPU figures over a shorter span read 0.0 (the kernel's counters move in 10 ms steps): the first report
# comes this long after the start.
MIN_CPU_SPAN = 0.25


def host_cpu_times(psutil_=psutil):
    """``(total, idle)`` CPU seconds of the host so far, as psutil counts them (guest time is already in user
    time; iowait is idle)."""
    t = psutil_.cpu_times()
    total = sum(t) - getattr(t, "guest", 0) - getattr(t, "guest_nice", 0)
    return total, t.idle + getattr(t, "iowait", 0)


def host_cpu_percent(before, after):
    """Host CPU % between two ``host_cpu_times`` readings."""
    total, idle = after[0] - before[0], after[1] - before[1]
    return round(min(max(100 * (total - idle) / total, 0.0), 100.0), 1) if total > 0 else 0.0


class Sampler:
    """Host, process and crawl metrics for one node; each call to ``sample`` covers the time since the last."""

    def __init__(self, process=None):
        self.psutil = psutil
        self.process = process or psutil.Process()
        # psutil's first cpu_percent() is 0.0: prime the process's, so the first real sample means something.
        # The host's is measured here, from our own last reading: psutil keeps its last one per thread, and
        # each tick samples in whichever pool thread runs it (a thread's first figure would read 0.0).
        self.host_cpu = host_cpu_times(psutil)
        self.process.cpu_percent(None)
        self.prev = None

    def sample(self, stats, now):
        """A dict of metrics from a copy of Scrapy's stats, with rates over the time since the last call."""
        psutil = self.psutil
        net = psutil.net_io_counters()
        out = {"memory": psutil.virtual_memory().percent, "bytes_sent": net.bytes_sent,
               "bytes_recv": net.bytes_recv, "rss": self.process.memory_info().rss}
        for field, key in STAT_COUNTERS.items():
            out[field] = int(stats.get(key, 0) or 0)
        classes = {f"status_{c}xx": 0 for c in range(1, 6)}
        for key, count in stats.items():
            if isinstance(key, str) and key.startswith(STATUS_STAT):
                name = f"status_{key[len(STATUS_STAT):][:1]}xx"
                if name in classes:
                    classes[name] += int(count)
        out.update(classes)
        if self.prev and now - self.prev[0] < MIN_WINDOW:
            # Too soon after the last sample (a close right after a tick): keep its CPU figures and rates.
            out.update({k: v for k, v in self.prev[1].items() if k in WINDOW_FIELDS})
            return out
        host_cpu, self.host_cpu = self.host_cpu, host_cpu_times(psutil)
        out["cpu"] = host_cpu_percent(host_cpu, self.host_cpu)
        out["process_cpu"] = round(self.process.cpu_percent(None), 1)
        prev, self.prev = self.prev, (now, out)
        elapsed = now - prev[0] if prev else 0
        for field, rate_name, scale in RATES:
            rate = (out[field] - prev[1][field]) * scale / elapsed if elapsed > 0 else 0.0
            out[rate_name] = round(max(rate, 0.0), 1)
        return out


# ---------------------------------------------------------------------------- crawl insight

# Domains tracked one by one; a domain first seen after this many counts under "other" (bounded memory).
TRACKED_DOMAINS = 1000
OTHER = "other"
# Fields tracked when MONITOR_ITEM_FIELDS is unset: the first ones seen.
DEFAULT_FIELD_COUNT = 30


def _filled(value):
    """Present and not empty: 0 and False count as filled, None, "" and empty containers do not."""
    if value is None or isinstance(value, (int, float)):
        return value is not None
    try:
        return len(value) > 0
    except TypeError:
        return True


def host_of(netloc):
    """``user@Host:port`` -> ``host``; ``[::1]:80`` -> ``::1``."""
    name = netloc.rpartition("@")[2].lower()
    if name.startswith("["):
        return name[1:name.find("]")] or "?"
    return name.partition(":")[0] or "?"


def _short(text):
    return str(text)[:SAMPLE_TEXT]


class ErrorSamples(logging.Handler):
    """Keeps the last SAMPLES ERROR/CRITICAL records, as text (no reference to their tracebacks or
    requests), and counts the errors that name a request against its domain."""

    def __init__(self, insight):
        super().__init__(logging.ERROR)
        self.insight = insight
        self.records = collections.deque(maxlen=SAMPLES)
        self.spider = None  # set while the spider runs: records Scrapy tags with another spider are not ours

    def emit(self, record):
        spider = getattr(record, "spider", None)
        if spider is not None and self.spider is not None and spider is not self.spider:
            return
        args = record.args
        request = args.get("request") if isinstance(args, dict) else None
        url = getattr(request, "url", None)
        if isinstance(url, str):
            self.insight.domain(url)[1] += 1
        else:
            url = None
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not format
            message = str(record.msg)
        # Cut after scrub (in samples), so a password in a URL is masked even when the cut falls after it.
        self.records.append((record.created, record.name, (message.splitlines() or [""])[0][:4 * SAMPLE_TEXT],
                             url and url[:4 * SAMPLE_TEXT]))

    def samples(self):
        """Newest first: ``{time, logger, message (first line, at most 300 characters), url}``; a password
        in a URL they quote is masked."""
        return [{"time": round(created, 3), "logger": _short(name), "message": _short(scrub(message)),
                 "url": url and _short(scrub(url))} for created, name, message, url in reversed(list(self.records))]


class Insight:
    """Latency, per-domain and item-field figures of one crawl, fed by Scrapy's signals; every structure is
    bounded. Handlers run on the reactor thread; ``figures`` may run in another (it copies before reading)."""

    def __init__(self, top_domains=SETTING["MONITOR_TOP_DOMAINS"].default, item_fields=None):
        self.top = top_domains
        self.listed = tuple(item_fields or ())
        self.fields = list(self.listed)  # tracked dotted paths
        self.known = set(self.fields)
        self.present = collections.Counter()
        self.items = 0
        width = len(LATENCY_BUCKETS) + 1
        self.width = width
        self.interval = [0] * width  # this interval's latencies
        self.total = [0] * width  # the run's, for Prometheus
        self.latency_sum = 0.0
        self.domains = {}  # domain -> [pages, errors, 4xx, 5xx, 429, histogram...]
        self.handler = ErrorSamples(self)
        self.slowed = {}  # domain -> the cluster-wide delay applied to its download slot (NodeControl)
        self._hosts = {}  # netloc -> its domain entry: the per-response lookup is one dict get

    # ---- collection (reactor thread)

    def domain(self, url):
        """The counters of ``url``'s domain (``other`` past TRACKED_DOMAINS)."""
        netloc = url.split("/", 3)[2] if url.count("/") >= 2 else ""
        entry = self._hosts.get(netloc)
        if entry is None:
            name = host_of(netloc)
            entry = self.domains.get(name)
            if entry is None:
                if len(self.domains) >= TRACKED_DOMAINS:
                    name = OTHER
                entry = self.domains.setdefault(name, [0] * (len(DOMAIN_COUNTS) + self.width))
            if len(self._hosts) < TRACKED_DOMAINS * 2:
                self._hosts[netloc] = entry
        return entry

    def response_downloaded(self, response, request, spider):
        """Every response the downloader got, retried ones too (a 429 retried away is still a refusal)."""
        latency = request.meta.get("download_latency")
        entry = self.domain(response.url)
        entry[0] += 1
        status = response.status
        if status >= 400:
            entry[2 if status < 500 else 3] += 1
            if status == 429:
                entry[4] += 1
            elif status == 503:
                entry[5] += 1
        if latency is not None:
            i = bisect.bisect_left(LATENCY_BUCKETS, latency)
            self.interval[i] += 1
            self.total[i] += 1
            self.latency_sum += latency
            entry[len(DOMAIN_COUNTS) + i] += 1

    def item_scraped(self, item, response, spider):
        adapter = ItemAdapter(item)
        self.items += 1
        if not self.listed and len(self.fields) < DEFAULT_FIELD_COUNT:
            for name, value in adapter.items():
                self._track(str(name))
                if is_item(value):
                    for sub in ItemAdapter(value).keys():
                        self._track(f"{name}.{sub}")
        present = self.present
        for path in self.fields:
            head, dot, sub = path.partition(".")
            value = adapter.get(head)
            if dot:
                value = ItemAdapter(value).get(sub) if is_item(value) else None
            if _filled(value):
                present[path] += 1

    def _track(self, path):
        if len(self.fields) < DEFAULT_FIELD_COUNT and path not in self.known:
            self.known.add(path)
            self.fields.append(path)

    def take_interval(self):
        """``latency_p50/p95/p99`` of the responses since the last call (None without any); reactor thread."""
        counts, self.interval = self.interval, [0] * self.width
        return {f"latency_p{q}": percentile(counts, q / 100) for q in (50, 95, 99)}

    # ---- figures (any thread)

    def figures(self):
        """The run's figures for a snapshot: ``latency_buckets`` (cumulative, +Inf last), ``latency_sum``,
        ``domains``, ``fields`` (``fields_listed``: whether they are MONITOR_ITEM_FIELDS), ``error_samples``."""
        cumulative, running = [], 0
        for count in list(self.total):
            running += count
            cumulative.append(running)
        out = {"latency_buckets": cumulative, "latency_sum": round(self.latency_sum, 3),
               "domains": self.top_domains(), "error_samples": self.handler.samples()}
        out["fields_listed"] = bool(self.listed)
        items = self.items
        if items:
            present = self.present.copy()
            out["fields"] = {path: round(present[path] / items, 3) for path in list(self.fields)}
        else:
            out["fields"] = {}
        return out

    def top_domains(self):
        if not self.top:
            return {}
        entries = sorted(list(self.domains.items()), key=lambda kv: -kv[1][0])
        other = [0] * (len(DOMAIN_COUNTS) + self.width)
        out = {}
        for name, entry in entries:
            if len(out) < self.top and name != OTHER:
                out[name] = self._domain_figures(list(entry), name)
            else:
                other = [a + b for a, b in zip(other, entry)]
        if any(other):
            out[OTHER] = self._domain_figures(other)
        return out

    def _domain_figures(self, entry, name=None):
        n = len(DOMAIN_COUNTS)
        figures = dict(zip(DOMAIN_COUNTS, entry[:n]))
        figures["latency_p95"] = percentile(entry[n:], 0.95)
        figures["delay"] = self.slowed.get(name)
        return figures


# ---------------------------------------------------------------------------- dead letters

# Scrapy's own log records that say a request failed for good (matched on their format strings): retries
# exhausted, a download error nobody handled, an HTTP error response the spider does not handle.
GAVE_UP, DOWNLOAD_ERROR, IGNORED = "Gave up retrying %(request)s", "Error downloading %(request)s", "Ignoring response"
# Meta keys Scrapy and its components set for themselves: not part of what rebuilds a request.
INTERNAL_META = frozenset(("download_latency", "download_slot", "download_timeout", "retry_times", "depth",
                           "redirect_times", "redirect_ttl", "redirect_urls", "redirect_reasons", "requeued"))
# A dead letter's url is cut to this many characters, its meta dropped past this many (as JSON).
DEAD_URL, DEAD_META = 4000, 2000
# Requests remembered as recorded, so the records that follow a give-up (an error logged, a response ignored)
# do not record the same failure twice.
RECENT_DEAD = 1000


def json_meta(meta):
    """The meta keys JSON can hold (Scrapy's own left out), or {} when they are large."""
    out = {}
    for key, val in meta.items():
        if isinstance(key, str) and key not in INTERNAL_META and not key.startswith("_"):
            try:
                dumps(val)
            except (TypeError, ValueError, RecursionError):
                continue
            out[key] = val
    return out if len(dumps(out)) <= DEAD_META else {}


class DeadLetters(logging.Handler):
    """Requests that failed for good, read from Scrapy's own log records (so they are Scrapy's decisions:
    RETRY_TIMES, HTTPERROR_ALLOWED_CODES, errbacks), kept here until the node's next write carries them."""

    def __init__(self, keep):
        super().__init__(logging.INFO)
        self.keep = keep
        self.pending = collections.deque(maxlen=max(keep, 1))  # a long Redis outage keeps the newest
        # id(request) -> a weak reference to each request recorded lately: an id alone is reused by a later
        # request once the first is gone (a dead letter requeued and failing again would be taken for it)
        self.recent = collections.OrderedDict()
        self.count = 0  # recorded in this run: the snapshot's ``dead``
        self.seq = 0
        self.spider = None

    def emit(self, record):
        msg, args = record.msg, record.args
        if not (isinstance(msg, str) and isinstance(args, dict)):
            return
        spider = getattr(record, "spider", None)
        if spider is not None and self.spider is not None and spider is not self.spider:
            return
        status = exception = None
        if msg.startswith(GAVE_UP):
            request, reason, why = args.get("request"), "retry/max_reached", args.get("reason")
            if isinstance(why, str):
                head = why.split(" ", 1)[0]
                status = int(head) if head.isdigit() and len(head) == 3 else None
                exception = None if status else why[:200]
            elif why is not None:
                kind = why if isinstance(why, type) else type(why)
                exception = f"{kind.__module__}.{kind.__qualname__}"
        elif msg.startswith(DOWNLOAD_ERROR):
            request, reason = args.get("request"), "download_error"
            if record.exc_info and record.exc_info[0] is not None:
                exception = f"{record.exc_info[0].__module__}.{record.exc_info[0].__qualname__}"
        elif msg.startswith(IGNORED):
            response = args.get("response")
            request, reason = getattr(response, "request", None), "http_error"
            status = getattr(response, "status", None)
        else:
            return
        url = getattr(request, "url", None)
        seen = self.recent.get(id(request))
        if not isinstance(url, str) or (seen is not None and seen() is request):
            return
        self.recent[id(request)] = weakref.ref(request)
        if len(self.recent) > RECENT_DEAD:
            self.recent.popitem(last=False)
        callback = getattr(request, "callback", None)
        self.count += 1
        self.pending.append({
            "url": url[:DEAD_URL], "method": str(request.method)[:20], "status": status, "exception": exception,
            "reason": reason, "retries": int(request.meta.get("retry_times", 0) or 0), "at": record.created,
            "meta": json_meta(request.meta), "callback": getattr(callback, "__name__", None),
            "priority": int(request.priority)})

    def take(self):
        """Every pending dead letter (they are gone from here: ``put_back`` if the write fails)."""
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out

    def put_back(self, records):
        self.pending.extendleft(reversed(records))

    def members(self, records, node, offset):
        """The sorted-set members of ``records``, stamped with the node and Redis's clock (``offset``)."""
        out = []
        for record in records:
            self.seq += 1
            out.append(dead_member({**record, "node": node, "at": round(record["at"] + offset, 3)}, node, self.seq))
        return out


# ---------------------------------------------------------------------------- fleet control

class NodeControl:
    """Fleet control on one node: reads its commands every CONTROL_POLL seconds in a thread of its own (one
    HMGET, never on the reactor), applies each new one on the reactor once, and acknowledges it."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.engine = None
        self.fields = None
        self.seen = set()  # (id, at) of every command taken: each is applied once, across Redis outages
        self.command = None  # {id, name, at} of the last applied, for the snapshot
        self.acks = collections.deque()  # (command id, at) to write
        self.draining = False
        self.done = None
        self.outage = Outage(logger)
        self.slow = {}  # domain -> cluster-wide delay, as last read from <p>:slow
        self.saved = {}  # slot key -> (delay, jitter) it had before a cluster-wide delay replaced them

    def open(self, spider):
        """Read the commands once before the crawl starts (a paused spider's new node starts paused), then
        poll. Returns a Deferred Scrapy waits for: fired by the first read, or after FIRST_READ_WAIT seconds
        if Redis has not answered by then (the read goes on, and what it finds is applied when it comes)."""
        try:
            self.engine = self.monitor.crawler.engine
        except RuntimeError:  # a crawler that is not crawling (the benchmark's): nothing to apply commands to
            self.engine = None
        self.fields = control_targets(self.monitor.node_id, spider.name)
        self.done = threading.Event()
        started = defer.Deferred()

        def go():
            if not started.called:
                started.callback(None)

        def late():
            logger.info("Control: no answer from Redis within %gs; the crawl starts, commands apply once read",
                        FIRST_READ_WAIT)
            go()

        timer = reactor.callLater(FIRST_READ_WAIT, late)

        def first(command):
            if timer.active():
                timer.cancel()
            if command is not None:
                self.apply(command)
            go()

        threading.Thread(target=self.poll, args=(first,), name="monitor-control", daemon=True).start()
        return started

    def read(self):
        """Runs in a thread: write pending acknowledgements and read the three targets in one round trip;
        the newest command if this node has not taken it yet (it is then taken), else None."""
        r, prefix = self.monitor.redis, self.monitor.prefix
        acks = []
        while self.acks:
            acks.append(self.acks.popleft())
        try:
            with r.pipeline(transaction=False) as pipe:
                self._write_acks(pipe, acks)
                pipe.hmget(control_key(prefix, "commands"), self.fields)
                pipe.hgetall(slow_key(prefix))
                raws, slow = pipe.execute()[-2:]
        except redis.RedisError as exc:
            self.acks.extendleft(reversed(acks))
            self.outage.failed("Control: cannot read commands from Redis (%s); retrying every %gs",
                               scrub(exc), CONTROL_POLL)
            return None
        self.outage.ok("Control: Redis answers again; node %s reads its commands", self.monitor.node_id)
        self.slow = slow_delays(slow)
        command = newest_command(raws)
        if command is None or (command["id"], command["at"]) in self.seen:
            return None
        self.seen.add((command["id"], command["at"]))
        return command

    def poll(self, first=None):
        """The thread: read at once (handing the outcome to ``first`` on the reactor), then every CONTROL_POLL
        seconds until the node closes; hand new commands, and the drain check, to the reactor."""
        if first is not None:
            reactor.callFromThread(first, self.read())
        while not self.done.wait(CONTROL_POLL):
            command = self.read()
            if command is not None:
                reactor.callFromThread(self.apply, command)
            if self.slow or self.saved:
                reactor.callFromThread(self.apply_slow, self.slow)
            if self.draining:
                sizes = self.monitor._queue_sizes()
                reactor.callFromThread(self.check_drain, sizes)

    def apply(self, command):
        """Runs on the reactor: carry out one command, note it for the snapshot and ack, publish at once."""
        engine, name = self.engine, command["command"]
        if engine is None or engine.spider is None:
            return
        logger.info("Control: %s (command %d, %s)", name, command["id"], command.get("target"))
        if name == "pause":
            engine.pause()
        elif name == "resume":
            self.draining = False
            engine.unpause()
            slot = getattr(engine, "_slot", None)
            if slot is not None:
                slot.nextcall.schedule()  # start downloading now, not at the engine's next 5-second heartbeat
        elif name == "stop":
            self.close(STOPPED)
        elif name == "drain":
            self.draining = True
        at = round(time.time(), 3)
        self.command = {"id": command["id"], "name": name, "at": at}
        self.acks.append((command["id"], at))
        self.monitor.tick(queued=True)

    def apply_slow(self, delays):
        """Runs on the reactor: every download slot of a slowed domain (its key is the host) takes the cluster-wide
        delay, without jitter; a slot no longer slowed gets its own delay back. New slots are caught at the next
        poll, so a delay holds within CONTROL_POLL seconds everywhere."""
        slots = getattr(getattr(self.engine, "downloader", None), "slots", None)
        if slots is None:
            return
        for key, slot in list(slots.items()):
            want = delays.get(key)
            if want is not None:
                self.saved.setdefault(key, (slot.delay, slot.jitter))
                slot.delay, slot.jitter = want, 0.0
            elif key in self.saved:
                slot.delay, slot.jitter = self.saved.pop(key)
        self.monitor.insight.slowed = dict(delays)

    def check_drain(self, sizes):
        """Runs on the reactor: close with ``drained`` once this node is idle and the shared queue and start
        URLs are empty (``sizes`` as the poll thread just read them; a failed read is not empty)."""
        engine = self.engine
        if not self.draining or engine is None or engine.spider is None:
            return
        if engine.paused or any(sizes.get(k) != 0 for k in ("queue_requests", "queue_start_urls") if k in sizes):
            return
        try:
            idle = engine.spider_is_idle()
        except (redis.RedisError, RuntimeError):
            return
        if idle:
            self.close(DRAINED)

    def close(self, reason):
        """Close the spider gracefully: in-flight requests finish; the scrapy-redis queue keeps the rest."""
        self.draining = False
        if self.engine.spider is not None:
            deferred_from_coro(self.engine.close_spider_async(reason=reason))

    def status(self):
        """Snapshot fields: ``status`` ``paused`` while the engine is paused, and the last ``command``."""
        out = {"command": self.command} if self.command else {}
        if self.engine is not None and self.engine.paused:
            out["status"] = "paused"
        return out

    def forget(self):
        """Runs in a thread at close: stop polling, write pending acks, delete this node's own command."""
        if self.done is not None:
            self.done.set()
        if self.monitor.outage.down:
            return  # the final snapshot just failed: do not hold up the exit another timeout
        r, prefix = self.monitor.redis, self.monitor.prefix
        try:
            with r.pipeline(transaction=False) as pipe:
                self._write_acks(pipe, list(self.acks))
                pipe.hdel(control_key(prefix, "commands"), f"node:{self.monitor.node_id}")
                pipe.execute()
        except redis.RedisError:
            pass  # the readers' pruning deletes it with the node

    def _write_acks(self, pipe, acks):
        for command_id, at in acks:
            key = control_ack_key(self.monitor.prefix, command_id)
            pipe.hset(key, self.monitor.node_id, dumps({"at": at}))
            pipe.expire(key, ACK_TTL)
