# The two set-up commands of the README: `make demo` and `make test`.
# Each creates its own virtual environment; torch is pinned to the CPU build on this machine's disk.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
DEMO_VENV ?= .venv-demo
TEST_VENV ?= .venv

.PHONY: demo test check pytest browser clean

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install -q "$(TORCH_PIN)" numpy
	$(DEMO_VENV)/bin/python -m pip install -q -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(TEST_VENV)/bin/python -m pip install -q "$(TORCH_PIN)" numpy
	$(TEST_VENV)/bin/python -m pip install -q -e '.[test]' "$(TORCH_PIN)"
	touch $@

## demo: record a small CPU training run with the live view, then write its report
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/traceml run --ui terminal --run-name demo --out demo_out/run.tml --overwrite examples/demo_train.py
	$(DEMO_VENV)/bin/traceml report demo_out/run.tml --out demo_out/report --overwrite
	@echo "recording: demo_out/run.tml   report: demo_out/report/report.html"

## browser: headless Chromium for the dashboard tests (Debian packages)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	  else echo "chromium missing: run 'sudo apt-get install -y chromium chromium-driver'"; exit 1; fi; }

## check: lint, format, types, import contracts
check: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/ruff check traceml replay tests benchmarks examples scripts
	$(TEST_VENV)/bin/ruff format --check traceml replay tests benchmarks examples scripts
	$(TEST_VENV)/bin/mypy
	$(TEST_VENV)/bin/lint-imports

pytest: $(TEST_VENV)/.installed browser
	$(TEST_VENV)/bin/python -m pytest -q

## test: the whole suite: checks, then every test
test: check pytest

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) demo_out traceml_runs
