"""The pytest fixtures over testbed.py: a private redis-server, a local website, and crawler subprocesses.

Tests never touch a Redis they did not start: each server gets a free port and a temporary folder.
Helpers are imported from ``testbed``, never from here.
"""

import os
import signal

import pytest

from testbed import RedisServer, Site, start_crawler


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
    """``crawlers(spider, env=, settings=, cwd=, args=)`` starts ``testbed.start_crawler``; any still running
    at the end are killed."""
    procs = []

    def start(*args, **kwargs):
        procs.append(start_crawler(*args, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        os.unlink(proc.log_path)
