"""The toolkit's distributed crawler: takes start URLs from Redis and follows links on the same host.

Run ``scrapy crawl main_spider`` on as many machines as you like, all with the same ``REDIS_URL``, then push
URLs: ``redis-cli LPUSH distributed:start_urls '{"url": "https://example.com/"}'`` (a plain URL works too).
"""

import json
import os
import sys
import time
from urllib.parse import urlsplit

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from scrapy import Request, signals
from scrapy.utils.defer import deferred_from_coro
from scrapy_redis.spiders import RedisSpider
from twisted.internet import task

from monitor_settings import connect, redact, scrub

# How often an idle node looks for new start URLs (the engine's own idle check runs only every 5 s).
START_URLS_POLL_INTERVAL = 1.0
# Seconds the start waits for Redis to answer before it says it cannot reach it.
REDIS_CHECK_TIMEOUT = 3.0


def redis_problem(url):
    """Why the crawl's Redis (its queue, its start URLs) cannot be used, in one line; None when it answers."""
    try:
        client = connect(url, timeout=REDIS_CHECK_TIMEOUT)
    except ValueError as exc:
        return f"REDIS_URL: {exc}"
    try:
        client.ping()
    except redis.RedisError as exc:
        return (f"cannot reach Redis at {redact(url)} ({scrub(exc, url)}); start it, or set REDIS_URL "
                "to a Redis that answers")
    finally:
        client.close()
    return None


class TransactionalCluster(redis.cluster.RedisCluster):
    """A cluster client whose pipelines are MULTI/EXEC transactions, as scrapy-redis's queue expects (each of
    its pipelines touches one key, so one slot)."""

    def pipeline(self, transaction=None, shard_hint=None):
        return super().pipeline(True if transaction is None else transaction, shard_hint)


class HARedis:
    """scrapy-redis's ``REDIS_PARAMS["redis_cls"]`` for a ``redis+sentinel://`` or ``redis+cluster://``
    REDIS_URL (settings.py sets it): the monitor's ``connect``, retrying through a failover for up to about
    FAILOVER_TRIES seconds (a failover takes a few; a loaded machine or a managed Redis may take tens)."""

    FAILOVER_TRIES = 90  # one a second at most (backoff capped at 1 s)

    @classmethod
    def from_url(cls, url, socket_timeout=30, **_):
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), cls.FAILOVER_TRIES,
                      supported_errors=(redis.ConnectionError, redis.TimeoutError))
        return connect(url, float(socket_timeout), retry, TransactionalCluster)


class DistributedSpider(RedisSpider):
    """Crawl every page of the hosts whose URLs are pushed to ``distributed:start_urls``."""

    name = "main_spider"
    redis_key = "distributed:start_urls"
    test_flag = "VERSION_2.3"
    version = test_flag  # what the monitor reports as this spider's version (markers, like-for-like baselines)
    custom_settings = {"HTTPERROR_ALLOW_ALL": True}  # 404 and 500 pages become items too

    @classmethod
    def from_crawler(cls, crawler, *args, **kwargs):
        # A crawl starting (not a spider built for a look at it) needs its Redis: scrapy-redis would fail to
        # build its scheduler, in three tracebacks. One line instead.
        problem = crawler.crawling and redis_problem(crawler.settings.get("REDIS_URL"))
        if problem:
            print(f"main_spider: error: {problem}", file=sys.stderr, flush=True)
            os._exit(2)  # nothing is started yet; a SystemExit would be caught and logged by the crawl's task
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(spider.spider_closed, signal=signals.spider_closed)
        return spider

    async def start(self):
        """Scrapy >= 2.13 calls this instead of start_requests: the first batch waiting in Redis."""
        for request in self.next_requests():
            yield request

    def make_request_from_data(self, data):
        """A request from a queue entry: JSON ``{"url": ..., "meta": {...}, "dont_filter": false}`` or a URL."""
        text = data.decode(self.redis_encoding) if isinstance(data, bytes) else str(data)
        try:
            entry = json.loads(text)
        except ValueError:
            entry = {"url": text.strip()}
        if isinstance(entry, str):
            entry = {"url": entry}
        url = entry.get("url") if isinstance(entry, dict) else None
        if not url or urlsplit(url).scheme not in ("http", "https"):
            self.logger.warning("Ignoring start URL entry without an http(s) url: %.200r", text)
            return []
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        # Filtered like any link, so a start page that other pages link to is fetched once per cluster; a requeued
        # dead letter (meta "requeued": its id) was seen already, and is fetched again.
        return Request(url, meta=meta, dont_filter=bool(entry.get("dont_filter", False)) or "requeued" in meta)

    def parse(self, response):
        title = None
        if hasattr(response, "css"):
            title = (response.css("title::text").get() or "").strip() or None
        yield {"url": response.url, "status": response.status, "title": title}
        if not hasattr(response, "css") or response.status >= 400:
            return
        host = urlsplit(response.url).netloc
        for href in response.css("a::attr(href)").getall():
            url = response.urljoin(href.strip())
            parts = urlsplit(url)
            if parts.scheme in ("http", "https") and parts.netloc == host:
                yield Request(url.split("#", 1)[0], callback=self.parse)

    def spider_opened(self, spider):
        self.spider_idle_start_time = time.time()
        self.poller = task.LoopingCall(self.poll_start_urls)
        self.poller.start(START_URLS_POLL_INTERVAL, now=False)

    def spider_closed(self, spider, reason):
        if getattr(self, "poller", None) is not None and self.poller.running:
            self.poller.stop()
        self.logger.info("Node closed (%s)", reason)

    def poll_start_urls(self):
        """Pick up pushed start URLs promptly, and close an idle node once MAX_IDLE_TIME_BEFORE_CLOSE passes."""
        engine = self.crawler.engine
        now = time.time()
        if engine.spider is None or engine.paused or not engine.spider_is_idle():
            # scrapy-redis counts idle time only from the last start URL seen; count it from the last work.
            # A paused node (fleet control) is waiting for its resume, not idle: it never closes for idling.
            self.spider_idle_start_time = now
            return
        try:
            waiting = self.count_size(self.redis_key)
        except redis.RedisError as exc:  # no master for a moment (a failover): poll again next second
            self.logger.warning("Cannot read %s: %s", self.redis_key, exc)
            return
        if waiting > 0:
            self.spider_idle_start_time = now
            self.schedule_next_requests()
        elif self.max_idle_time and now - self.spider_idle_start_time >= self.max_idle_time:
            self.poller.stop()
            deferred_from_coro(engine.close_spider_async(reason="finished"))
