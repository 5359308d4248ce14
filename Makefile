# Two commands: `make demo` runs the whole system on a demo crawl, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test browser bench clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python demo.py

# Browser tests drive Debian's chromium; as root on Debian it is installed here, elsewhere they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "No chromium: the browser tests will be skipped (install Debian's chromium package)."; fi

test: $(BIN)/.installed browser
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/alert_eval.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache __pycache__
