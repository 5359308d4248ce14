"""The pytest fixtures over testbed.py: a private redis-server, a local website, crawler subprocesses, the
API server, headless Chromium, mail and webhook receivers, the alerter, a port that never answers.

Tests never touch a Redis they did not start: each server gets a free port and a temporary folder.
Helpers are imported from ``testbed``, never from here, nor from another test module.
"""

import os
import shutil
import signal

import pytest

from testbed import CHROMIUM, CHROMIUM_ARGS, TO
from testbed_servers import (
    ApiServer,
    ClusterServers,
    HangingPort,
    RedisServer,
    SentinelGroup,
    Site,
    start_crawler,
    start_smtp,
    start_webhook,
)


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


@pytest.fixture(autouse=True)
def no_hub_outlives_its_test(monkeypatch):
    """Every events hub (GET /events' subscription thread) and change feed (a big cluster's reads) a test starts in
    this process is stopped when the test ends. A hub left running on the session's Redis reads /alerts at every
    change, and on its clock (Redis's) tidies away as expired the silences that explicit-clock tests set at T0."""
    import monitor_events
    import monitor_nodes

    started, start, feed = [], monitor_events.Hub.start, monitor_nodes.ChangeFeed.__init__

    def tracked(hub):
        started.append(hub)
        return start(hub)

    def made(self, *args):
        started.append(self)
        feed(self, *args)

    monkeypatch.setattr(monitor_events.Hub, "start", tracked)
    monkeypatch.setattr(monitor_nodes.ChangeFeed, "__init__", made)
    yield
    for hub in started:
        hub.stop()


@pytest.fixture(scope="module")
def sentinel_group():
    """A master, a replica and three sentinels (``testbed_servers.SentinelGroup``), one per test module."""
    group = SentinelGroup().start()
    yield group
    group.cleanup()


@pytest.fixture(scope="module")
def redis_cluster():
    """A three-master Redis Cluster (``testbed_servers.ClusterServers``), one per test module."""
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli is not installed (apt-get install redis-tools, or `make test` as root)")
    cluster = ClusterServers().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture
def site():
    s = Site(pages=40).start()
    yield s
    s.stop()


@pytest.fixture
def crawlers():
    """``crawlers(spider, env=, settings=, cwd=, args=)`` starts ``testbed_servers.start_crawler``; any still running
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


@pytest.fixture
def hanging_port():
    """A port that accepts connections and never answers a byte (testbed_servers.HangingPort)."""
    port = HangingPort()
    yield port.port
    port.close()


# ---------------------------------------------------------------------------- the API and the page

@pytest.fixture(scope="module")
def api(redis_server):
    """``python monitor_api.py`` on the session's Redis, one per test module (``testbed_servers.ApiServer``)."""
    server = ApiServer(redis_server.url).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright, one per test module; skips without either."""
    if not CHROMIUM:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium, or `make test` as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """``open_page(url, init_script=None, **context options)``: a fresh browser context; no uncaught page
    errors allowed. ``init_script`` runs in the page before its own script; ``page.console_lines`` collects
    what the page logs."""
    contexts, errors = [], []

    def open_(url, init_script=None, **options):
        options.setdefault("viewport", {"width": 1280, "height": 900})
        ctx = browser.new_context(**options)
        contexts.append(ctx)
        if init_script:
            ctx.add_init_script(init_script)
        page = ctx.new_page()
        page.console_lines = []
        page.on("console", lambda msg: page.console_lines.append((msg.type, msg.text)))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, errors


# ---------------------------------------------------------------------------- the alerter and its receivers

@pytest.fixture
def smtp():
    """An SMTP server on a free port: ``testbed_servers.Inbox`` (``subjects()``, ``messages()``, ``envelopes``...)."""
    inbox = start_smtp()
    yield inbox
    inbox.controller.stop()


@pytest.fixture
def webhook():
    """A local HTTP receiver (``testbed_servers.start_webhook``): ``url``, ``bodies``, ``hits``, ``fail``..."""
    server = start_webhook()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def make(redis_url, smtp, monkeypatch):
    """``make(*flags, **env)``: an Alerter on the test's Redis, mailing the test's SMTP server (to
    ``testbed.TO``); ``env`` adds or, with None, removes settings."""
    import alert
    import monitor_settings

    def build(*argv, **env):
        for name, *_ in alert.SETTINGS:
            monkeypatch.delenv(name, raising=False)
        settings = {"REDIS_URL": redis_url, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port),
                    "ALERT_TO": TO, "ALERT_INTERVAL": "60", "ALERT_FOR": "120", "ALERT_REPEAT": "3600"}
        settings.update(env)
        for name, value in settings.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        cfg = alert.load_config(list(argv))
        return alert.Alerter(cfg, client=monitor_settings.connect(cfg.redis_url, timeout=5))

    return build


@pytest.fixture
def servers():
    """Extra API servers (and their Redis) a test starts for itself; all stopped at the end."""
    started = []

    def start(thing):
        started.append(thing)
        return thing.start()

    yield start
    for thing in reversed(started):
        thing.cleanup() if isinstance(thing, RedisServer) else thing.stop()
