# Two commands: `make demo` runs the whole system on a demo crawl, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint system-packages bench clean screenshot

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python demo.py

# Tests drive Debian's chromium (browser tests), faketime (a crawler with a wrong clock), Alertmanager and
# promtool (alert integration), redis-sentinel and redis-tools' redis-cli (Sentinel and
# Cluster tests; redis-server --sentinel stands in for redis-sentinel). As root on Debian they are installed here;
# elsewhere those tests skip.
SYSTEM_PACKAGES := chromium:chromium faketime:faketime prometheus-alertmanager:prometheus-alertmanager promtool:prometheus \
	redis-sentinel:redis-sentinel redis-cli:redis-tools
system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "Missing:$$missing: the tests that need them will be skipped (install these Debian packages)."; fi

# Most of a test's time is waiting (crawls, browsers, failovers), so TEST_WORKERS processes share the cores; each
# takes whole test files (their module fixtures start once) and has its own Redis and Chromium.
TEST_WORKERS ?= 3
test: $(BIN)/.installed system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# docs/dashboard.png, taken from the demo as the demo test sees it (the test alone writes artifacts/dashboard.png).
screenshot: $(BIN)/.installed system-packages
	UPDATE_SCREENSHOT=1 $(BIN)/python -m pytest -q test_demo.py -k runs_everything

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/alert_eval.py
	$(BIN)/python bench/alert_eval.py --insight
	$(BIN)/python bench/scale.py --insight
	$(BIN)/python bench/runs.py
	$(BIN)/python bench/history.py
	$(BIN)/python bench/insight_hooks.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/queues.py
	$(BIN)/python bench/redis_ha.py
	$(BIN)/python bench/events.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache __pycache__
