"""A crawler machine needs only the three files the README names: a Scrapy project holding nothing else of ours
reports to Redis."""

import re
import shutil
import socket
import subprocess

import testbed
import testbed_servers
from testbed import ROOT
from testbed_servers import clean_env, crawl_command

# What a crawler machine needs of the toolkit (the README's "Monitoring your own Scrapy project" says so).
CRAWLER_FILES = ("monitors.py", "monitor_contract.py", "monitor_settings.py")

SPIDER = '''
import scrapy


class PlainSpider(scrapy.Spider):
    name = "plain"

    def __init__(self, url, **kwargs):
        super().__init__(**kwargs)
        self.start_urls = [url]

    def parse(self, response):
        yield {"url": response.url}
'''


def test_the_readme_names_the_three_files_a_crawler_machine_needs():
    readme = open(f"{ROOT}/README.md", encoding="utf-8").read()
    section = re.search(r"^## Monitoring your own Scrapy project\n(.*?)^## ", readme, re.S | re.M)
    assert section, "the README has a 'Monitoring your own Scrapy project' section"
    for name in CRAWLER_FILES:
        assert f"`{name}`" in section.group(1), name


def test_a_project_with_only_the_three_files_reports_to_redis(tmp_path, redis_url, redis_client, site):
    project = testbed_servers.scrapy_project(tmp_path, "plain", SPIDER)
    for name in CRAWLER_FILES:
        shutil.copy(f"{ROOT}/{name}", project / name)
    env = clean_env({"REDIS_URL": redis_url, "MONITOR_INTERVAL": "1"})
    env.pop("PYTHONPATH", None)  # nothing of the toolkit but the project's own copies
    done = subprocess.run(crawl_command("plain", LOG_LEVEL="INFO") + ["-a", f"url={site.url}"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    [node] = testbed.list_nodes(redis_client)[0].values()
    assert node["node"].startswith(f"plain:{socket.gethostname()}:")
    assert (node["status"], node["finish_reason"]) == ("closed", "finished") and node["items"] == 1
