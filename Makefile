# Two commands for a fresh machine: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: setup browser model run test test-slow lint bench clean

$(BIN)/python:
	$(shell command -v $(PY) >/dev/null 2>&1 && echo $(PY) || echo python3) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the CPU wheel on disk: a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Harness isolation uses bubblewrap (namespaces); without it the sandbox falls back to the
# audit guard with a warning. Installed here when running as root with apt, else explained.
setup: $(STAMP)
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } || \
	      echo "sialoop: could not install bubblewrap; harnesses run under the audit-guard fallback"; \
	  else \
	    echo "sialoop: bubblewrap (bwrap) not found: harnesses run under the audit-guard fallback."; \
	    echo "  install it: sudo apt-get install -y bubblewrap (Debian/Ubuntu), sudo dnf install bubblewrap (Fedora)"; \
	  fi; }

model: setup
	$(BIN)/python -c "from sialoop.policy.model_files import embedded_model_dir as m; print(m())"

run: model
	$(BIN)/sialoop run --task lawbench $(ARGS)

# The dashboard's browser tests drive Debian's Chromium and ChromeDriver (never a downloaded one).
browser:
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	      echo "sialoop: could not install chromium; the dashboard's browser tests will fail"; \
	  else \
	    echo "sialoop: the browser tests need /usr/bin/chromium and /usr/bin/chromedriver:"; \
	    echo "  sudo apt-get install -y chromium chromium-driver"; \
	  fi; }

test: setup browser
	$(BIN)/python -c "from sialoop.policy.model_files import tokenizer_dir as t; print(t())"
	$(BIN)/ruff check src tests bench examples
	$(BIN)/pytest -q

test-slow: model browser
	$(BIN)/pytest -q -m slow

bench: model
	$(BIN)/python bench/policy_throughput.py

clean:
	rm -rf $(VENV) runs
