# `make demo` and `make test` set everything up on a fresh machine (Python 3.11).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo-work
DEMO_ITEMS ?= 2000
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo loop compile lint images-smoke clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## The whole suite: unit, integration and the kfp.local end-to-end test.
test: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest $(PYTEST_ARGS)

## Unit tests only (seconds).
test-fast: venv
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

## The main job end to end on a generated marketplace, then the serving container answers.
demo: venv
	$(PY) -m pipelines.demo --work-dir $(DEMO_DIR) --items $(DEMO_ITEMS)

## The loop twice round: run, serve with logging to simulated users, join their taps, run again gated on them.
loop: venv
	$(PY) -m pipelines.loop --work-dir loop-work --items $(DEMO_ITEMS)

compile: venv
	$(VENV)/bin/visrec compile --out pipeline.yaml

lint: venv
	$(VENV)/bin/hadolint containers/*/Dockerfile

## Build every image and start each one's entrypoint on a tiny job (docker, or podman here: minutes).
images-smoke: venv
	$(PY) containers/smoke.py $(SMOKE_ARGS)

clean:
	rm -rf $(DEMO_DIR) loop-work .pytest_cache pipeline.yaml
