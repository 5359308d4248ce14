"""Live and light (issue 22, sections 4 and 6): a hung Redis delays no crawl; a steady alert costs no write,
an evaluation few round trips, and insight fields no decoding where nobody reads them.

Against the real things: a private redis-server, ``scrapy crawl`` processes on a local site, a port that hangs.
"""

import re
import time

import pytest

import monitor_acting
import testbed
import testbed_servers
from testbed_servers import HangingPort, Site, crawl_log, wait_for

# ---------------------------------------------------------------------------- 6. a hung Redis delays nothing

@pytest.fixture
def hung_redis(redis_server):
    """A port that hangs until ``release()``, then relays to the session's private Redis."""
    port = HangingPort(forward=redis_server.port)
    yield port
    port.close()


def opened_at(proc):
    """The crawler's clock when its monitor started (spider_opened), from its log (LOG_FORMAT below)."""
    found = re.search(r"^(\d+\.\d+) Monitor: node .* reports to", crawl_log(proc), re.M)
    return found and float(found.group(1))


def test_a_hung_monitor_redis_delays_the_crawl_by_at_most_a_quarter_second_and_a_later_pause_is_obeyed(
        redis_client, redis_url, hung_redis, crawlers, tmp_path):
    project = testbed_servers.scrapy_project(tmp_path, "plain", testbed_servers.PLAIN_SPIDER)
    site = Site(pages=400, delay=0.1).start()
    try:
        env = {"REDIS_URL": redis_url, "MONITOR_REDIS_URL": hung_redis.url, "MONITOR_INTERVAL": "1"}
        proc = crawlers("plain", env=env, cwd=project, args=["-a", f"url={site.url}"],
                        settings={"CONCURRENT_REQUESTS": 2, "LOG_FORMAT": "%(created).3f %(message)s"})
        wait_for(lambda: site.first_hit, 60, what="the first page request")
        first_hit = time.time() - (time.monotonic() - site.first_hit)
        opened = wait_for(lambda: opened_at(proc), 10, what="the monitor's start in the log")
        # Before, the first control read waited for the client's 1 s timeout before the crawl could start.
        assert first_hit - opened < 0.75, f"first page {first_hit - opened:.3f} s after spider_opened"
        assert "no answer from Redis within 0.25s" in crawl_log(proc)
        sent = monitor_acting.issue_command(redis_client, "scrapy", "pause", "all")
        hung_redis.release()  # Redis answers again: the node reads the pause written meanwhile
        node = wait_for(lambda: next(iter(testbed.list_nodes(redis_client)[0].items()), None), 30,
                        what="the node reporting through the released port")[0]
        wait_for(lambda: (testbed.get_node(redis_client, node) or {}).get("status") == "paused", 30,
                 what="the node paused by the command read late")
        assert testbed.get_node(redis_client, node)["command"]["id"] == sent["id"]
        paused_hits = sum(site.page_hits().values())
        assert paused_hits < site.pages
        wait_for(lambda: f"Control: pause (command {sent['id']}" in crawl_log(proc), 10, what="the pause logged")
        assert proc.poll() is None and "Traceback" not in crawl_log(proc)
    finally:
        site.stop()

