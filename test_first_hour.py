"""A newcomer's mistakes explain themselves, and what the demo says is true: a wrong REDIS_URL for
``scrapy crawl main_spider`` and a busy port for ``python testbed.py`` are one line and a non-zero exit;
the demo site serves every page it counts."""

import re
import socket
import subprocess
import sys

import pytest

from testbed import ROOT, Site, clean_env, crawl_command, free_port


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:{port}/0", "main_spider: error: cannot reach Redis at redis://127.0.0.1:{port}/0 (Error 111"),
    ("redis://:s3cret@127.0.0.1:{port}/0", "main_spider: error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0"),
    ("redis://127.0.0.1:{port}/0?bogus=1", "main_spider: error: REDIS_URL: redis://127.0.0.1:{port}/0?bogus=1 is not a "
                                           "usable Redis URL (unknown option 'bogus')"),
], ids=["refused", "password-masked", "unknown-option"])
def test_main_spider_with_a_wrong_redis_url_says_so_in_one_line(url, says):
    port = free_port()  # nothing listens there
    done = subprocess.run(crawl_command("main_spider", LOG_LEVEL="WARNING"), cwd=ROOT,
                          env=clean_env(REDIS_URL=url.format(port=port)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(says.format(port=port)), done
    assert "s3cret" not in done.stderr


def test_main_spider_logs_no_traceback_at_info_either():
    done = subprocess.run(crawl_command("main_spider"), cwd=ROOT, env=clean_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == [done.stderr.splitlines()[-1]]


def test_testbed_on_a_busy_port_says_so_in_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "testbed.py", "--port", str(port)], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == f"testbed.py: error: cannot serve on 127.0.0.1:{port} (Address already in use); " \
                          "stop what uses it or pass --port\n"


@pytest.mark.parametrize("pages", [2000, 500, 41, 7])
def test_the_demo_site_links_every_page_it_counts(pages):
    """The pages a crawler reaches from / by following the links of pages that answer 200 (as Scrapy does)."""
    site = Site(pages, mix=True)
    site.server.server_close()
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        if site.status_of(i) != 200:
            continue
        for path in re.findall(r'href="(/|/page/\d+)"', site.body(i)):
            n = 0 if path == "/" else int(path.rsplit("/", 1)[1])
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == set(range(pages))
    assert {site.status_of(i) for i in seen} == ({200, 404, 500} if pages > 41 else {200, 404} if pages > 23 else {200})
