"""What the tests, benchmarks and demo run against the servers of ``testbed_servers.py``: snapshots as nodes write
them, what readers see of them, the API app, the alerter's test settings and the dashboard in a browser. No
pytest here, so benchmarks and the demo need none; ``conftest.py`` turns these into fixtures.

``python testbed.py --pages 3000`` serves the site (``testbed_servers.Site``). Every page is reachable from
``/``. With ``mix`` on, some pages answer 404 or 500 and some are slow, as a real site does; ``hits`` counts each
path's requests.
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib

import redis

import monitor_contract
import monitor_nodes
import monitor_read
import monitor_snapshot
from testbed_servers import ROOT, Site, clean_env


class EventReader:
    """A client of ``GET /events`` (Server-Sent Events) on a thread: every event it reads goes to ``events``, as
    ``(name, id, parsed data, arrival time.monotonic())``; ``wait`` takes the first that matches. ``status`` and
    ``headers`` are the response's; ``headers={"Accept-Encoding": "gzip"}`` asks for the gzipped stream browsers
    get."""

    def __init__(self, base, path="/events", headers=None, timeout=30.0):
        import http.client  # here: only the stream's tests and benchmarks read events
        import queue
        from urllib.parse import urlsplit

        where = urlsplit(base)
        self.conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
        self.conn.request("GET", path, headers=headers or {})
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        self.status, self.headers = self.response.status, dict(self.response.getheaders())
        self.events, self.last_id, self.closed, self.wire = queue.Queue(), None, False, 0
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.body = self.response.read()

    def lines(self):
        """The stream's lines as they arrive, gunzipped as they arrive when it is gzipped (``wire`` counts the bytes
        as sent)."""
        if self.headers.get("Content-Encoding") != "gzip":
            for raw in iter(self.response.readline, b""):
                self.wire += len(raw)
                yield raw
            return
        unzip, rest = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        for chunk in iter(lambda: self.response.read1(1 << 16), b""):
            self.wire += len(chunk)
            *done, rest = (rest + unzip.decompress(chunk)).split(b"\n")
            yield from (line + b"\n" for line in done)

    def _read(self):
        import http.client

        name, ident, data = "message", None, []
        try:
            for raw in self.lines():
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    self.last_id = ident or self.last_id
                    self.events.put((name, ident, json.loads("\n".join(data)), time.monotonic()))
                    name, ident, data = "message", None, []
        except (OSError, ValueError, http.client.HTTPException):  # hung up, or cut mid-chunk
            pass
        self.closed = True

    def wait(self, name, match=lambda data: True, timeout=10.0):
        """The data of the first ``name`` event (from now on) whose data ``match``es; AssertionError after
        ``timeout`` seconds."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                got, _, data, _ = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {name} event within {timeout}s") from None
            if got == name and match(data):
                return data

    def close(self):
        """Hang up (the response's file holds the socket open after a plain close)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()



# ---------------------------------------------------------------------------- a node reporting on a thread

@contextlib.contextmanager
def reporting(report, every=0.2):
    """Calls ``report()`` every ``every`` seconds on a thread while the block runs, as a node that keeps
    reporting does, whatever the block's own waits cost (a browser on a loaded machine may take seconds)."""
    stop, failed = threading.Event(), []

    def loop():
        while not stop.is_set():
            try:
                report()
            except Exception as exc:  # raised again in the test's thread
                failed.append(exc)
                return
            stop.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    if failed:
        raise failed[0]

# ---------------------------------------------------------------------------- snapshots as nodes write them

def snapshot(node, spider="main_spider", age=0, now=None, **fields):
    """A snapshot with every field monitors.SpiderMonitor writes, ``age`` seconds old at ``now`` (default:
    this second); ``fields`` replace any of them. A ``status="closed"`` one gets ``finish_reason`` too."""
    now = int(time.time() if now is None else now)
    snap = {
        # who reports (SpiderMonitor.spider_opened), when and how
        "timestamp": now - age, "node": node, "spider": spider, "host": "worker-1", "pid": 4242,
        "interval": 10.0, "start_time": now - 3600, "status": "running",
        # host and process (Sampler.sample)
        "cpu": 37.5, "memory": 61.2, "bytes_sent": 10_000_000, "bytes_recv": 80_000_000,
        "net_sent_rate": 1234.5, "net_recv_rate": 2.5 * 2 ** 20, "rss": 150 * 2 ** 20, "process_cpu": 12.5,
        "peak_rss": 160 * 2 ** 20,
        # the crawl: Scrapy's stats counters, status classes and rates (Sampler.sample)
        "pages": 12345, "items": 6789, "requests": 13000, "errors": 0, "warnings": 1, "retries": 3,
        "exceptions": 2, "dropped": 0, "status_1xx": 0, "status_2xx": 12000, "status_3xx": 100,
        "status_4xx": 240, "status_5xx": 5, "pages_per_min": 120.0, "items_per_min": 60.0,
        "errors_per_min": 0.0, "requests_per_min": 125.0,
        # the scrapy-redis queues (SpiderMonitor._queue_sizes)
        "queue_requests": 4321, "queue_start_urls": 12, "queue_dupefilter": 99999,
        # crawl insight (monitors.Insight): a quiet node's, small; tests give figures where they need them
        "latency_p50": 0.12, "latency_p95": 0.4, "latency_p99": 0.9, "latency_sum": 0.0,
        "latency_buckets": [0] * (len(monitor_contract.LATENCY_BUCKETS) + 1), "domains": {}, "fields": {},
        "fields_listed": False, "error_samples": [],
        # the spider's version and arguments (issue 21), its scrapy-redis keys, idleness and dead letters (issue
        # 19), and the reports a Redis outage or failover dropped (issue 18)
        "version": "VERSION_2.3", "args_hash": "51bda1466730", "dead": 0,
        "queues": {"requests": f"{spider}:requests", "start_urls": "distributed:start_urls",
                   "dupefilter": f"{spider}:dupefilter", "start_urls_type": "list", "apart": False},
        "reports_dropped": 0,
    }
    snap.update(fields)
    snap.setdefault("idle_since", float(snap["timestamp"]))  # busy over its last interval, as a crawling node
    if snap["status"] == "closed":
        snap.setdefault("finish_reason", "finished")
    return snap


def publish(client, *snapshots, prefix="scrapy", history=0, history_len=None, trend_rows=(),
            stamp=False, rolled=None):
    """Write snapshots as their nodes do, in one pipeline. ``history`` earlier rows per node (one per interval,
    with figures that rise and fall, and their 5-minute trend rows) come first; ``history_len`` rows are kept
    (default: an hour's worth, as a node keeps); ``trend_rows`` go with each snapshot. With ``stamp`` Redis
    stamps each snapshot's report time (``seen``) with its own clock, as the extension's writes do; without,
    a snapshot's age is its ``timestamp``'s (tests on a made-up clock). With ``rolled`` (``{node: the counts of its
    last rollup}``, updated here) each write adds to its spider's rollups and refusal buckets at its ``timestamp``, as
    the extension's do."""
    with client.pipeline(transaction=False) as pipe:
        for snap in snapshots:
            interval = monitor_contract.number(snap.get("interval"))
            interval = interval if interval and interval > 0 else monitor_contract.DEFAULT_INTERVAL
            keep = history_len or max(1, int(monitor_contract.HISTORY_SECONDS // interval))
            trend = monitor_contract.TrendBuffer()
            for i in range(history, 0, -1):
                wave = (i % 12) / 12
                old = dict(snap, timestamp=snap["timestamp"] - i * int(interval), cpu=round(20 + 60 * wave, 1),
                           memory=round(50 + 10 * wave, 1), pages_per_min=round(80 + 80 * wave, 1))
                done = trend.add(monitor_contract.history_row(old))
                monitor_contract.write_snapshot(pipe, prefix, old, keep, [done] if done else [])
            rollup = None if rolled is None else (snap["timestamp"], rolled.get(snap["node"], {}))
            counts = monitor_contract.write_snapshot(pipe, prefix, snap, keep, trend_rows, stamp=stamp, rollup=rollup)
            if rolled is not None:
                rolled[snap["node"]] = counts
        pipe.execute()


# ---------------------------------------------------------------------------- what readers see

def list_nodes(client, prefix="scrapy", now=None):
    """``({node: snapshot with state}, malformed count)``, read as the API and the alerter read them."""
    nodes, skipped, _ = monitor_nodes.NodeReader(client, prefix).read(now)
    return nodes, skipped


def get_node(client, node, prefix="scrapy", now=None):
    """One node's snapshot with its state, or None."""
    return monitor_snapshot.parse_snapshot(client.hget(monitor_contract.status_key(prefix), node), now)


def read_history(client, node, minutes=60, prefix="scrapy", now=None):
    """One node's history rows, oldest first."""
    return monitor_read.read_histories(client, [node], minutes, prefix, now)[node]


# ---------------------------------------------------------------------------- the API on its own

# Small figures over ``snapshot``'s defaults, so sums and means are easy to check (the API's tests).
snap = functools.partial(
    snapshot, host="host-a", cpu=12.5, memory=45.3, bytes_sent=102400, bytes_recv=409600, pages=10, items=8,
    requests=12, errors=1, warnings=0, retries=2, exceptions=0, status_2xx=9, status_3xx=0, status_4xx=1,
    status_5xx=0, rss=50_000_000, process_cpu=7.5, net_sent_rate=100.0, net_recv_rate=400.0, pages_per_min=6.0,
    items_per_min=4.8, requests_per_min=7.0, queue_requests=5, queue_start_urls=0, queue_dupefilter=20)


def store(client, *snaps, prefix="scrapy", trend_rows=()):
    """``publish`` keeping 360 history rows whatever the interval."""
    publish(client, *snaps, prefix=prefix, trend_rows=trend_rows, history_len=360)


def make_app(url, **config):
    """A ``monitor_api`` app with every setting given, so the environment of the test run does not leak in."""
    import monitor_api  # Flask and the rest only where an app is made: benchmarks and the demo import testbed

    settings = {"REDIS_URL": url, "MONITOR_KEY_PREFIX": "scrapy", "MONITOR_API_TOKEN": None,
                "MONITOR_CORS_ORIGINS": "null", "MONITOR_RETENTION": 86400, "MONITOR_API_CACHE": 0,
                "MONITOR_API_HOST": "127.0.0.1", "MONITOR_API_HOSTS": None, "MONITOR_API_READONLY": "0"}
    settings.update(config)
    return monitor_api.create_app(settings)


# ---------------------------------------------------------------------------- the alerter and its receivers

MB = 1024 * 1024
T0 = 1_700_000_000  # the explicit clock of most alerter tests (``Alerter.run_once(T0 + t)``)
TO = "ops@example.com"  # where the alerter built by conftest's ``make`` mails

# A quiet node over ``snapshot``'s defaults: nothing near a threshold, no work queued.
QUIET = dict(host="h1", pid=1, cpu=10.0, memory=20.0, bytes_sent=0, bytes_recv=0, pages=0, items=0, pages_per_min=0.0,
             rss=100 * MB,
             queue_requests=0, queue_start_urls=0, queue_dupefilter=0)


class CountingConnection(redis.Connection):
    """A real Redis connection that counts what it sends: each command or pipeline is one send, one round
    trip. Set as a client's ``connection_pool.connection_class`` before its first command."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def report(r, node, ts, prefix="scrapy", rolled=None, **fields):
    """Write a quiet node's snapshot at ``ts``, with ``fields``, as the extension does (with ``rolled``, its
    rollups too: see ``publish``)."""
    publish(r, snapshot(node, now=ts, **{**QUIET, **fields}), prefix=prefix, history_len=10, rolled=rolled)


def run_script(*args, env, timeout=30):
    """``python alert.py *args`` with only the toolkit settings in ``env``; the finished process, text."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "alert.py"), *args], env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# Debian's chromium, for the dashboard's tests and benchmark (None: not installed).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]



# ---------------------------------------------------------------------------- the dashboard in a browser
# Playwright page objects, as conftest's ``open_page`` and ``browser`` fixtures give them; playwright itself
# is imported there, so nothing here needs it.

PAGE = os.path.join(ROOT, "dashboard.html")
# The page polls this often (ms) in tests, instead of every 5 s.
FAST = 300
# Generous (ms): the machine is shared, and the API may serve a response up to a second old.
WAIT = 15_000
# A node, host or spider name that would run script if the page put it in as HTML.
XSS = '<img src=x onerror="window.__xss=1">'


def until(page, js, arg=None, timeout=WAIT):
    """Wait until the page function ``js`` (written as ``() => ...`` or ``(arg) => ...``) is truthy."""
    return page.wait_for_function(js, arg=arg, timeout=timeout).json_value()


def polls_after(page, n=2):
    """Wait for ``n`` more successful polls of the page (``window.dashboardStats.okPolls``)."""
    start = page.evaluate("() => window.dashboardStats.okPolls")
    until(page, "(n) => window.dashboardStats.okPolls >= n", start + n)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mix", action="store_true", help="some 404, 500 and slow pages")
    args = parser.parse_args()
    try:
        site = Site(args.pages, mix=args.mix, port=args.port).start()
    except OSError as exc:  # a busy port, mostly: one line, not a traceback
        parser.exit(2, f"testbed.py: error: cannot serve on 127.0.0.1:{args.port} ({exc.strerror or exc}); "
                       "stop what uses it or pass --port\n")
    print(f"Serving {args.pages} pages at {site.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        site.stop()
