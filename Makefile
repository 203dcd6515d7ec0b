# kdgate — every developer and CI entry point. `make run` and `make test` build the virtual
# environment themselves, so a fresh machine needs exactly those two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test check lint typecheck bench distill sysdeps clean

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

run: $(VENV)/.serve
	@printf 'kdgate on http://$(HOST):$(PORT) — try:\n  curl -s http://$(HOST):$(PORT)/v2/models/digits/infer -d '\''{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[%s]}]}'\''\n' \
	  "$$($(PY) -c 'print(",".join(["0"]*64))')"
	exec $(VENV)/bin/kdgate serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev sysdeps
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(VENV)/.dev
	$(PY) -m bench

distill: $(VENV)/.dev
	$(VENV)/bin/kdgate distill --out models/digits

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
