# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian's Chromium and its driver, for the tests that check pages in a real browser.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
APT := DEBIAN_FRONTEND=noninteractive $(shell [ "$$(id -u)" = 0 ] || echo sudo) apt-get -y -q

.PHONY: demo test test-fast browser lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk (anything else downloads GBs)
	$(BIN)/pip install --quiet torch==2.13.0

# uv installs the same packages as pip would (pip freeze identical), in seconds, not minutes
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "uv>=0.9,<1"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedmodel simulate medical

# One pytest worker per core (pytest-xdist); a file's tests stay on one worker, so a
# module's fixtures (and its federation) start once. Files go out in collection order,
# slow end-to-end files first (tests/conftest.py), so the quick ones fill the end.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra -n auto --dist loadfile --no-loadscope-reorder --durations=25

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile --no-loadscope-reorder

# Installs only when missing; retries after refreshing the package lists.
browser:
	@ls $(BROWSER) > /dev/null 2>&1 || $(APT) install --no-install-recommends chromium chromium-driver \
		|| ($(APT) update && $(APT) install --no-install-recommends chromium chromium-driver)

lint: $(STAMP)
	$(BIN)/ruff check fedmodel server client simulations tests benchmarks
	$(BIN)/ruff format --check fedmodel server client simulations tests benchmarks
	$(BIN)/mypy fedmodel server client simulations
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs dist build
