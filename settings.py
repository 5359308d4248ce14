"""Scrapy settings for the toolkit's own crawler: scrapy-redis queue and dupefilter, monitor on.

Redis and monitor settings come from the environment (see the README's reference); every variable read here
is declared in monitor_settings.SETTINGS.
"""

import warnings

from scrapy.exceptions import ScrapyDeprecationWarning

from monitor_settings import env, ha_kind

# scrapy-redis's scheduler passes Scrapy 2.19's stats a deprecated argument on every crawl: its warning, not
# something a user of this project can act on, is left out of the log (ours raise none).
warnings.filterwarnings("ignore", category=ScrapyDeprecationWarning, module=r"scrapy_redis\.")

BOT_NAME = "scrapy_cluster_monitor"
SPIDER_MODULES = ["main_spider"]
NEWSPIDER_MODULE = "main_spider"

# Environment values are strings; Scrapy's getbool/getint read them (and name a bad one in the error).
ROBOTSTXT_OBEY = env("ROBOTSTXT_OBEY") or "True"
CONCURRENT_REQUESTS = env("CONCURRENT_REQUESTS") or "16"

# scrapy-redis: one shared request queue and one shared dupefilter for every node.
SCHEDULER = "scrapy_redis.scheduler.Scheduler"
DUPEFILTER_CLASS = "scrapy_redis.dupefilter.RFPDupeFilter"
SCHEDULER_PERSIST = True
REDIS_URL = env("REDIS_URL") or "redis://localhost:6379/0"
if ha_kind(REDIS_URL):  # redis+sentinel:// or redis+cluster://: scrapy-redis connects through the monitor's connect
    REDIS_PARAMS = {"redis_cls": "main_spider.HARedis"}
# Seconds a node waits with nothing to do before it closes (0: wait for start URLs forever).
MAX_IDLE_TIME_BEFORE_CLOSE = env("MAX_IDLE_TIME_BEFORE_CLOSE") or "0"

# The node monitor; MONITOR_* settings default to the environment variables of the same names.
EXTENSIONS = {"monitors.SpiderMonitor": 500}

# Scrapy's own consoles, which run code in the crawler, are off: the telnet console and Scrapy 2.19's remote
# control HTTP server (fleet control goes through the monitor's API instead).
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False
FEED_EXPORT_ENCODING = "utf-8"
