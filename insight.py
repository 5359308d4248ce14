"""Crawl insight for the node monitor: download latency, per-domain health, item field coverage, error samples.

``Insight`` collects them from Scrapy's signals and a logging handler, all bounded whatever the crawl;
``monitors.SpiderMonitor`` adds its figures to every snapshot. ``clean`` is the read side's gate for them:
it drops any value of the wrong shape, so the API, the alerter and the page may trust what is left.
"""

import bisect
import collections
import logging
import math

# Upper bounds (seconds) of the download latency histogram; a last, open bucket (+Inf) follows.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                   15.0, 30.0, 60.0)
DEFAULT_TOP_DOMAINS = 20
MAX_TOP_DOMAINS = 100
# Domains tracked one by one; a domain first seen after this many counts under "other" (bounded memory).
TRACKED_DOMAINS = 1000
OTHER = "other"
# Fields tracked when MONITOR_ITEM_FIELDS is unset: the first ones seen.
DEFAULT_FIELD_COUNT = 30
MAX_FIELDS = 100
SAMPLES = 5
SAMPLE_TEXT = 300
# The per-domain figures, in the order ``Insight`` keeps them (pages, errors, 4xx, 5xx, 429).
DOMAIN_COUNTS = ("pages", "errors", "4xx", "5xx", "429")
# Snapshot fields too big for list views: the API sends them for one node, or with ?fields=all.
BIG_FIELDS = frozenset(("domains", "fields", "error_samples", "latency_buckets"))


def percentile(counts, q):
    """The ``q`` quantile (0..1) of a bucket histogram, interpolated within its bucket as Prometheus's
    histogram_quantile does; None when it is empty. The open last bucket answers its lower bound."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            return round(low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / count, 3)
        seen += count
    return LATENCY_BUCKETS[-1]


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
        from monitors import scrub  # here: monitors imports this module

        return [{"time": round(created, 3), "logger": _short(name), "message": _short(scrub(message)),
                 "url": url and _short(scrub(url))} for created, name, message, url in reversed(list(self.records))]


class Insight:
    """Latency, per-domain and item-field figures of one crawl, fed by Scrapy's signals; every structure is
    bounded. Handlers run on the reactor thread; ``figures`` may run in another (it copies before reading)."""

    def __init__(self, top_domains=DEFAULT_TOP_DOMAINS, item_fields=None):
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
        if latency is not None:
            i = bisect.bisect_left(LATENCY_BUCKETS, latency)
            self.interval[i] += 1
            self.total[i] += 1
            self.latency_sum += latency
            entry[len(DOMAIN_COUNTS) + i] += 1

    def item_scraped(self, item, response, spider):
        from itemadapter import ItemAdapter, is_item

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
                out[name] = self._domain_figures(list(entry))
            else:
                other = [a + b for a, b in zip(other, entry)]
        if any(other):
            out[OTHER] = self._domain_figures(other)
        return out

    def _domain_figures(self, entry):
        n = len(DOMAIN_COUNTS)
        figures = dict(zip(DOMAIN_COUNTS, entry[:n]))
        figures["latency_p95"] = percentile(entry[n:], 0.95)
        return figures


# ---------------------------------------------------------------------------- read side

def _num(value, low=0.0, high=math.inf):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _text(value):
    """Text that encodes as UTF-8 (no lone surrogate, which Prometheus and mail cannot write)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(value):
    return _text(value) and 0 < len(value) <= SAMPLE_TEXT


def clean(snapshot):
    """Drop from a decoded snapshot every insight field, or part of one, of the wrong shape (in place).

    Kept: ``latency_*`` numbers >= 0; ``latency_buckets`` a list of len(LATENCY_BUCKETS) + 1 counts;
    ``domains`` up to MAX_TOP_DOMAINS + 1 names of at most 300 characters, each an object of numbers
    (others None); ``fields`` up to MAX_FIELDS names -> shares 0..1; ``error_samples`` up to SAMPLES
    objects with text ``message`` and ``logger``, a number ``time`` and a text or null ``url``."""
    for q in ("latency_p50", "latency_p95", "latency_p99", "latency_sum"):
        if q in snapshot and not (snapshot[q] is None or _num(snapshot[q])):
            del snapshot[q]
    buckets = snapshot.get("latency_buckets")
    if buckets is not None and not (isinstance(buckets, list) and len(buckets) == len(LATENCY_BUCKETS) + 1
                                    and all(_num(b) for b in buckets)):
        del snapshot["latency_buckets"]
    domains = snapshot.get("domains")
    if domains is not None:
        if isinstance(domains, dict):
            snapshot["domains"] = {
                name: {k: (v[k] if _num(v.get(k)) else None) for k in DOMAIN_COUNTS + ("latency_p95",)}
                for name, v in list(domains.items())[:MAX_TOP_DOMAINS + 1] if _name(name) and isinstance(v, dict)}
        else:
            del snapshot["domains"]
    fields = snapshot.get("fields")
    if fields is not None:
        if isinstance(fields, dict):
            snapshot["fields"] = {name: share for name, share in list(fields.items())[:MAX_FIELDS]
                                  if _name(name) and _num(share, 0, 1)}
        else:
            del snapshot["fields"]
    samples = snapshot.get("error_samples")
    if samples is not None:
        if isinstance(samples, list):
            snapshot["error_samples"] = [
                {"time": s["time"], "logger": s["logger"][:SAMPLE_TEXT], "message": s["message"][:SAMPLE_TEXT],
                 "url": s["url"][:SAMPLE_TEXT] if _text(s.get("url")) else None}
                for s in samples[:SAMPLES]
                if isinstance(s, dict) and _num(s.get("time")) and _text(s.get("logger")) and _text(s.get("message"))]
        else:
            del snapshot["error_samples"]
    return snapshot


def slim(snapshot):
    """The snapshot without BIG_FIELDS: what list views send unless asked for all fields."""
    return {k: v for k, v in snapshot.items() if k not in BIG_FIELDS}


def newest_error(snapshot):
    """``"<logger>: <message> (<url>)"`` of the node's newest error sample, or None."""
    samples = snapshot.get("error_samples") or []
    if not samples:
        return None
    s = samples[0]
    return f"{s['logger']}: {s['message']}" + (f" ({s['url']})" if s.get("url") else "")
