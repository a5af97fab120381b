# Panda: the two commands are `make demo` and `make test`; everything else is plumbing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RUNS    ?= runs
PORT    ?= 8501

.PHONY: demo test lint bench clean system-packages

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,lightning,postgres,hf,search]'
	touch $(STAMP)

# Start a background training run on the charlm task and open the dashboard onto it.
demo: $(STAMP)
	$(BIN)/panda demo --runs-dir $(RUNS) --port $(PORT)

# Debian packages the tests need, installed only when missing: Chromium drives the browser tests
# (Playwright never downloads a browser here); PostgreSQL's server programs start a throw-away
# database for the PostgreSQL store tests.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: $(STAMP) system-packages
	$(BIN)/ruff check trainer app tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check trainer app tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
