"""The settings table (monitor_settings.SETTINGS) is the one truth: the README's environment reference, each
script's --help and every module's reads of the environment and of Scrapy settings agree with it.
The environment reference lives in docs/settings.md.

Static checks (ast over the sources, docs/settings.md's text) plus one ``--help`` run per script.
"""

import ast
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

import monitor_rules
import monitor_settings
from monitor_settings import ALERT, API, CRAWLER, DEMO, PROJECT, SETTING, SETTINGS

ROOT = pathlib.Path(__file__).resolve().parent

# The modules that run in production (not tests, fixtures, the test bed or benchmarks).
NOT_SCANNED = re.compile(r"^(test_.*|conftest|testbed|testbed_servers|bench.*)\.py$")
SCANNED = sorted(p.name for p in ROOT.glob("*.py") if not NOT_SCANNED.match(p.name))

# Scrapy's own settings a module may read from its crawler's settings without declaring them. main_spider.py
# reads none itself: MAX_IDLE_TIME_BEFORE_CLOSE and REDIS_URL are read for it by scrapy-redis (and both are
# declared anyway, for settings.py). Add a name here only with the reason it is Scrapy's, not the toolkit's.
SCRAPY_OWN = {"main_spider.py": set()}

# The settings-table reader each script is (what it reads must be declared with it as a reader).
SCRIPT_READER = {"monitors.py": CRAWLER, "monitor_api.py": API, "alert.py": ALERT, "demo.py": DEMO,
                 "settings.py": PROJECT}


# ---------------------------------------------------------------------------- the table itself

def test_setting_names_are_unique():
    names = [s.name for s in SETTINGS]
    assert len(SETTING) == len(names), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.name)
def test_setting_is_well_formed(s):
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", s.name)
    assert s.kind in monitor_settings.PARSERS
    assert s.readers and set(s.readers) <= {CRAWLER, API, ALERT, DEMO, PROJECT}
    assert s.help.strip()
    assert (s.flag is not None) <= (ALERT in s.readers)  # only alert.py has a flag per setting
    if s.kind in ("choice", "rules"):
        assert s.choices


def test_alert_flags_and_attributes_are_unique():
    flags = [s.flag for s in SETTINGS if s.flag]
    attrs = [s.attr for s in SETTINGS if ALERT in s.readers]
    assert len(flags) == len(set(flags)) and len(attrs) == len(set(attrs)) and None not in attrs


def test_rule_names_match_the_rules():
    assert list(monitor_settings.RULE_NAMES) == [r.name for r in monitor_rules.RULES]
    assert SETTING["ALERT_RULES"].choices == monitor_settings.RULE_NAMES


@pytest.mark.parametrize("rule", [r for r in monitor_rules.RULES if r.setting], ids=lambda r: r.name)
def test_rule_threshold_is_a_declared_alert_setting(rule):
    setting = SETTING.get(rule.setting)
    assert setting is not None, f"{rule.name}: {rule.setting} is not in monitor_settings.SETTINGS"
    assert ALERT in setting.readers
    assert setting.attr == rule.attr  # the rules read their threshold as getattr(cfg, rule.attr)


# ---------------------------------------------------------------------------- docs/settings.md

def readme_environment_rows(text):
    """The names of the `` | `NAME` | `` table rows under any heading containing "Environment" (to the next
    heading of the same or a higher level), fenced code blocks skipped."""
    names, level, fenced = set(), None, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        if heading:
            depth = len(heading.group(1))
            if "environment" in heading.group(2).lower():
                level = depth if level is None or depth <= level else level
            elif level is not None and depth <= level:
                level = None
            continue
        row = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if level is not None and row:
            names.add(row.group(1))
    return names


def test_readme_parser():
    text = ("# T\n| `OUTSIDE` | x |\n## Environment reference\n| `A_ONE` | 1 |\n```\n# not a heading\n```\n"
            "| `A_TWO` | 2 |\n### Sub\n| `A_THREE` | 3 |\n## Other\n| `LATER` | 4 |\n")
    assert readme_environment_rows(text) == {"A_ONE", "A_TWO", "A_THREE"}


REFERENCE = ROOT / "docs" / "settings.md"


def readme_rows():
    return readme_environment_rows(REFERENCE.read_text(encoding="utf-8"))


def test_every_environment_setting_is_in_the_readme_reference():
    rows = readme_rows()
    missing = [s.name for s in SETTINGS if s.env and s.name not in rows]
    assert not missing, f"docs/settings.md's environment reference has no row for: {', '.join(missing)}"


def test_readme_reference_names_only_declared_settings():
    stale = sorted(readme_rows() - set(SETTING))
    assert not stale, f"docs/settings.md's environment reference has rows for undeclared settings: {', '.join(stale)}"


# ---------------------------------------------------------------------------- --help

def clean_environment():
    env = {k: v for k, v in os.environ.items() if k not in SETTING}
    env["COLUMNS"] = "200"
    return env


@functools.lru_cache(maxsize=None)
def helps():
    """``{script: its --help output}``, the three run at once."""
    procs = {script: subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, env=clean_environment(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for script in ("alert.py", "monitor_api.py", "demo.py")}
    out = {}
    for script, proc in procs.items():
        text, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{text}"
        out[script] = text
    return out


def names_in(text, name):
    return re.search(rf"(?<![A-Z0-9_]){re.escape(name)}(?![A-Z0-9_])", text) is not None


HELP_CASES = [pytest.param(script, s.name, id=f"{script}-{s.name}")
              for script, reader in (("alert.py", ALERT), ("monitor_api.py", API), ("demo.py", DEMO))
              for s in monitor_settings.readers_of(reader) if s.env]


@pytest.mark.parametrize("script, name", HELP_CASES)
def test_help_lists_every_setting_the_script_reads(script, name):
    assert names_in(helps()[script], name), f"{script} --help does not mention {name}"


def test_help_word_match_is_exact():
    assert names_in("[MONITOR_API_HOSTS]", "MONITOR_API_HOSTS")
    assert not names_in("[MONITOR_API_HOSTS]", "MONITOR_API_HOST")
    assert not names_in("XALERT_FOR", "ALERT_FOR")


@pytest.mark.parametrize("environ, lines", [
    pytest.param({"ALERT_CPU_PERCENT": "5", "MONITOR_INTERVAL": "2", "SMTP_HOST": "h"}, [], id="all-known"),
    pytest.param({"REDIS_PARAMS": "x", "HOME": "/", "ALERTS": "x"}, [], id="other-families-left-alone"),
    pytest.param({"ALERT_CPU": "1"}, ["ALERT_CPU is not a setting and is ignored (did you mean ALERT_CPU_PERCENT?)"],
                 id="a-prefix-of-one"),
    pytest.param({"MONITOR_INTERVALL": "2"},
                 ["MONITOR_INTERVALL is not a setting and is ignored (did you mean MONITOR_INTERVAL?)"], id="typo"),
    pytest.param({"MONITOR_ZZZ": "1"}, ["MONITOR_ZZZ is not a setting and is ignored"], id="nothing-close"),
    pytest.param({}, [], id="empty"),
])
def test_unknown_settings_are_named_with_the_closest_one(environ, lines):
    assert monitor_settings.unknown_settings(environ) == lines


# ---------------------------------------------------------------------------- what the modules read

SETTINGS_GETTERS = {"get", "getbool", "getint", "getfloat", "getlist", "getdict", "getdictorlist", "getwithbase",
                    "getpriority", "__getitem__"}
# Functions whose argument at this position names a setting: monitor_settings.env/value, the extension's
# scrapy_setting(crawler, name) and the local ``setting(name)`` helpers built on them.
NAMED_BY = {"env": 0, "value": 0, "setting": 0, "scrapy_setting": 1, "getenv": 0}


def dotted(node):
    """``a.b.c`` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def literal(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def is_settings_object(node):
    """``settings``, ``crawler.settings``, ``self.crawler.settings``...: a Scrapy Settings object."""
    name = dotted(node)
    return name is not None and name.split(".")[-1] == "settings"


class Scan:
    """The setting names a module's source reads (literal names only), and its uses of ``os.environ``."""

    def __init__(self, source):
        tree = ast.parse(source)
        self.aliases, self.os_names = {}, {"os.environ": "os.environ", "os.getenv": "os.getenv"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "monitor_settings":
                for a in node.names:
                    self.aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module == "os":
                for a in node.names:
                    self.os_names[a.asname or a.name] = f"os.{a.name}"
            for child in ast.iter_child_nodes(node):
                child.parent = node
        self.reads = []  # (name, line)
        self.config_reads = []  # (name, line) of the API's Flask config: ``config["X"]``, ``app.config.get("X")``
        self.environ = []  # (line, how) of every os.environ / os.getenv use but {**os.environ, ...}
        for node in ast.walk(tree):
            self.visit(node)

    def os_name(self, node):
        return self.os_names.get(dotted(node) or "")

    def visit(self, node):
        if isinstance(node, ast.Call):
            func, name = node.func, None
            if isinstance(func, ast.Name) and self.aliases.get(func.id, func.id) in NAMED_BY:
                name = self.arg(node, NAMED_BY[self.aliases.get(func.id, func.id)])
            elif isinstance(func, ast.Attribute):
                if self.os_name(func) == "os.getenv" or self.os_name(func.value) == "os.environ":
                    name = self.arg(node, 0)
                elif dotted(func.value) == "monitor_settings" and func.attr in ("env", "value"):
                    name = self.arg(node, 0)
                elif func.attr in SETTINGS_GETTERS and is_settings_object(func.value):
                    name = self.arg(node, 0)
            if name is not None:
                self.reads.append((name, node.lineno))
        if isinstance(node, (ast.Subscript, ast.Call)):
            target = node.value if isinstance(node, ast.Subscript) else node.func
            key = literal(node.slice) if isinstance(node, ast.Subscript) else (
                self.arg(node, 0) if isinstance(target, ast.Attribute) and target.attr == "get" else None)
            if isinstance(node, ast.Call):
                target = target.value if isinstance(target, ast.Attribute) else None
            if key is not None and (dotted(target) or "").split(".")[-1] == "config":
                self.config_reads.append((key, node.lineno))
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if self.os_name(node.value) == "os.environ" or is_settings_object(node.value) or \
                    dotted(node.value) in ("SETTING", "monitor_settings.SETTING"):
                name = literal(node.slice)
                if name is not None:
                    self.reads.append((name, node.lineno))
        os_use = self.os_name(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if os_use in ("os.environ", "os.getenv"):
            parent = getattr(node, "parent", None)
            spread = isinstance(parent, ast.Dict) and any(k is None and v is node
                                                          for k, v in zip(parent.keys, parent.values))
            if not spread:
                self.environ.append((node.lineno, os_use))

    @staticmethod
    def arg(call, index):
        return literal(call.args[index]) if len(call.args) > index else None


@functools.lru_cache(maxsize=None)
def scan(module):
    return Scan((ROOT / module).read_text(encoding="utf-8"))


def test_scanner_finds_every_pattern():
    source = '''
import os
from os import environ as env_vars
from monitor_settings import env, value as setting_value
import monitor_settings
a = os.environ.get("R1")
b = os.environ["R2"]
c = os.getenv("R3")
d = env("R4")
e = setting_value("R5", raw)
f = scrapy_setting(crawler, "R6")
g = settings.get("R7")
h = setting("R8")
i = crawler.settings.getbool("R9")
j = self.crawler.settings.getint("R10")
k = spider.settings.getfloat("R11")
l = SETTING["R12"]
m = monitor_settings.value("R13")
n = env_vars.get("R14")
o = crawler.settings["R15"]
child = {**os.environ, "X": "1"}
p = app.config["C1"]
q = current_app.config.get("C2")
r = config["C3"]
wsgi = environ.get("HTTP_HOST")
other = options.get("NOT_A_READ")
dynamic = value(name)
'''
    found = Scan(source)
    assert sorted(n for n, _ in found.reads) == sorted(f"R{i}" for i in range(1, 16))
    assert [how for _, how in sorted(found.environ)] == ["os.environ", "os.environ", "os.getenv", "os.environ"]
    assert sorted(name for name, _ in found.config_reads) == ["C1", "C2", "C3"]


def test_every_production_module_is_scanned():
    assert {"monitors.py", "monitor_settings.py", "monitor_contract.py", "monitor_read.py", "monitor_rules.py",
            "monitor_api.py", "alert.py", "demo.py", "settings.py", "main_spider.py"} <= set(SCANNED)
    assert not any(NOT_SCANNED.match(m) for m in SCANNED)


@pytest.mark.parametrize("module, some_reads", [
    pytest.param("monitors.py", {"MONITOR_ENABLED", "MONITOR_INTERVAL", "SCHEDULER_QUEUE_KEY"}, id="monitors"),
    pytest.param("settings.py", {"ROBOTSTXT_OBEY", "CONCURRENT_REQUESTS", "REDIS_URL", "MAX_IDLE_TIME_BEFORE_CLOSE"},
                 id="settings"),
    pytest.param("demo.py", {"MONITOR_API_HOST", "MONITOR_API_PORT", "ALERT_FOR"}, id="demo"),
    pytest.param("monitor_api.py", {"MONITOR_API_HOST", "MONITOR_API_PORT"}, id="monitor_api"),
])
def test_scanner_sees_the_known_reads(module, some_reads):
    assert some_reads <= {name for name, _ in scan(module).reads}


@pytest.mark.parametrize("module", SCANNED)
def test_module_reads_only_declared_settings(module):
    allowed = SCRAPY_OWN.get(module, set())
    unknown = [f"{module}:{line} {name}" for name, line in scan(module).reads
               if name not in SETTING and name not in allowed]
    assert not unknown, "read but not declared in monitor_settings.SETTINGS: " + ", ".join(unknown)


@pytest.mark.parametrize("module", list(SCRIPT_READER))
def test_script_reads_only_settings_declared_for_it(module):
    reader = SCRIPT_READER[module]
    undeclared = sorted({name for name, _ in scan(module).reads
                         if name in SETTING and reader not in SETTING[name].readers})
    assert not undeclared, f"{module} reads {undeclared} whose readers do not include {reader!r}"


@pytest.mark.parametrize("module", [m for m in SCANNED if m != "monitor_settings.py"])
def test_only_monitor_settings_reads_os_environ(module):
    uses = [f"{module}:{line} {how}" for line, how in scan(module).environ]
    assert not uses, "read the environment through monitor_settings.env/value: " + ", ".join(uses)


def test_monitor_settings_reads_the_environment():
    assert scan("monitor_settings.py").environ  # the one place, so the check above is not vacuous


# The API's Flask config holds its settings (create_app fills it from SETTINGS read by API), one entry of its
# own and Flask's own body limit (a constant of monitor_api, not a setting).
APP_ONLY = {"DASHBOARD_PATH", "MAX_CONTENT_LENGTH"}
API_MODULES = [m for m in SCANNED if m in ("monitor_api.py", "monitor_gate.py", "monitor_cache.py",
                                           "monitor_prometheus.py")]


def test_api_config_reads_are_seen():
    assert {"MONITOR_KEY_PREFIX", "MONITOR_API_CACHE"} <= {n for n, _ in scan("monitor_api.py").config_reads}
    assert {"MONITOR_API_TOKEN", "MONITOR_API_READONLY"} <= {n for n, _ in scan("monitor_gate.py").config_reads}


@pytest.mark.parametrize("module", API_MODULES)
def test_api_config_reads_are_api_settings(module):
    wrong = [f"{module}:{line} {name}" for name, line in scan(module).config_reads
             if name not in APP_ONLY and (name not in SETTING or API not in SETTING[name].readers)]
    assert not wrong, "the API's config holds only settings read by API (create_app): " + ", ".join(wrong)
