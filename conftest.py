"""Shared test fixtures: a private redis-server, a local website, and crawler subprocesses.

Tests never touch a Redis they did not start: each server gets a free port and a temporary folder.
"""

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from testbed import RedisServer, Site, clean_env, free_port, redis_server_binary, wait_for  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.abspath(__file__))


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
        full_env = clean_env(env)
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
