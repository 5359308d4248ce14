"""The docs hold: README.md and docs/*.md link only to files and headings that exist, every page's table of
contents lists its headings, the tables that mirror code (rules, files, benchmarks) match it, and every
``sh runnable`` block runs as written, in the toolkit's virtualenv, against a private Redis and API.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import monitor_rules
import monitor_settings
from testbed import ROOT, publish, snapshot
from testbed_servers import clean_env

DOCS = pathlib.Path(ROOT) / "docs"
PAGES = sorted([pathlib.Path(ROOT) / "README.md", *DOCS.glob("*.md")])
RUNNABLE = "```sh runnable"


def rel(path):
    return str(path.relative_to(ROOT))


def slug(heading):
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def outside_fences(text):
    """``(line number, line)`` of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def headings(text):
    """``[(depth, title)]`` of the page's headings."""
    return [(len(m.group(1)), m.group(2)) for _, line in outside_fences(text)
            if (m := re.match(r"(#{1,6})\s+(.*)", line))]


def anchors(text):
    seen, out = {}, set()
    for _, title in headings(text):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text):
    """``(line number, target)`` of every Markdown link or image outside code."""
    for number, line in outside_fences(text):
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield number, target


def test_slug_is_githubs():
    cases = {"The API: `monitor_api.py`": "the-api-monitor_apipy", "Who may do what": "who-may-do-what",
             "Alertmanager, its webhook format, and every chat app (Apprise)":
                 "alertmanager-its-webhook-format-and-every-chat-app-apprise",
             "Alert rule `run`": "alert-rule-run", "Redis keys (`<p>` = `MONITOR_KEY_PREFIX`)":
                 "redis-keys-p--monitor_key_prefix"}
    assert {h: slug(h) for h in cases} == cases
    assert anchors("# A\n## Same\n```\n## not one\n```\n## Same\n") == {"a", "same", "same-1"}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_reach_files_and_headings_that_exist(page):
    text = page.read_text(encoding="utf-8")
    dead = []
    for number, target in links(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.exists():
            dead.append(f"{rel(page)}:{number}: {target}: no such file")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal.read_text(encoding="utf-8")):
            dead.append(f"{rel(page)}:{number}: {target}: no such heading in {goal.name}")
    assert not dead, "\n".join(dead)


def test_every_docs_page_is_linked_from_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    named = {target.partition("#")[0] for _, target in links(index)}
    assert {p.name for p in DOCS.glob("*.md")} - {"README.md"} <= named


def expected_toc(text):
    return "\n".join("  " * (depth - 2) + f"- [{title}](#{slug(title)})"
                     for depth, title in headings(text) if depth in (2, 3))


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=rel)
def test_every_docs_page_has_a_table_of_contents_of_its_headings(page):
    text = page.read_text(encoding="utf-8")
    assert "<!-- toc -->\n" in text, f"{rel(page)} has no <!-- toc --> line"
    toc = re.search(r"<!-- toc -->\n((?:\s*- \[.*\n)*)", text).group(1).rstrip("\n")
    assert toc == expected_toc(text), f"{rel(page)}: its table of contents should read:\n{expected_toc(text)}"


def test_readme_is_a_landing_page():
    text = (pathlib.Path(ROOT) / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "](docs/dashboard.png)" in text and (DOCS / "dashboard.png").stat().st_size > 10_000
    assert "make demo" in text and "make test" in text and ". .venv/bin/activate" in text


# ---------------------------------------------------------------------------- tables that mirror the code

def table_rows(text, heading):
    """The first column (its backticked text) of the rows of the first table under ``heading``."""
    section = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M).group(1)
    return [m.group(1) for line in section.splitlines() if (m := re.match(r"\|\s*`([^`]+)`", line))]


def test_the_rules_table_has_every_rule_of_alert_rules():
    text = (DOCS / "alerts.md").read_text(encoding="utf-8")
    assert table_rows(text, "Rules") == [r.name for r in monitor_rules.RULES]
    assert table_rows(text, "Rules") == list(monitor_settings.SETTING["ALERT_RULES"].default.split(","))


def test_the_file_table_names_every_file_of_the_toolkit():
    named = set(table_rows((pathlib.Path(ROOT) / "README.md").read_text(encoding="utf-8"), "The files"))
    text = (pathlib.Path(ROOT) / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The files"):]
    mentioned = set(re.findall(r"`([^`\s]+)`", section))
    ours = {p.name for p in pathlib.Path(ROOT).iterdir()
            if p.suffix in (".py", ".json", ".yml", ".html") and not p.name.startswith("test_")}
    assert ours - mentioned == set(), "README.md's file table lacks these files"
    assert {n for n in named if "*" not in n and "/" not in n} <= {p.name for p in pathlib.Path(ROOT).iterdir()}


def test_make_bench_runs_every_benchmark_and_the_docs_name_them():
    makefile = (pathlib.Path(ROOT) / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    ran = set(re.findall(r"bench/(\w+\.py)", recipe))
    assert ran == {p.name for p in (pathlib.Path(ROOT) / "bench").glob("*.py")}
    operations = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert {name for name in ran if f"bench/{name}" not in operations} == set()


# ---------------------------------------------------------------------------- runnable blocks

def runnable_blocks():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == RUNNABLE:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                yield pytest.param("\n".join(lines[i + 1:end]) + "\n", id=f"{rel(page)}:{i + 1}")


BLOCKS = list(runnable_blocks())
# What the reader has after the quick start, `. .venv/bin/activate` and a running API: curl fails on an HTTP
# error (so a 4xx is a failed command, not a quiet JSON answer), and a failing command fails the block.
PRELUDE = "set -eo pipefail\ncurl() { command curl --fail-with-body -sS \"$@\"; }\n"


def test_there_are_runnable_blocks():
    assert len(BLOCKS) >= 6 and {b.id.split(":")[0] for b in BLOCKS} >= {"docs/api.md", "docs/alerts.md"}


@pytest.mark.parametrize("code", BLOCKS)
def test_runnable_block_runs_as_written(code, api, redis_url, redis_client):
    publish(redis_client, snapshot("main_spider:web1:4242", host="web1", interval=10),
            snapshot("main_spider:web2:77", host="web2", interval=10), stamp=True)
    env = clean_env(REDIS_URL=redis_url)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # . .venv/bin/activate
    env["VIRTUAL_ENV"] = os.path.dirname(os.path.dirname(sys.executable))
    script = PRELUDE + code.replace("localhost:5000", f"127.0.0.1:{api.port}")
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
