# LineGuard: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
OUT ?= out/demo
SAMPLE ?= sample_data/line_1080p.mp4
BUNDLE ?= models/default

.PHONY: demo replay test lint typecheck bench bench-accuracy bench-throughput bench-streams golden synth train bundle clean help

help:
	@echo "make demo   - install agent + hub (no torch); start the hub and an agent replaying the sample video; Ctrl-C stops"
	@echo "make replay - replay the sample video through the default INT8 bundle into results.jsonl and an annotated MP4"
	@echo "make test   - install everything (train extra included) and run the full test suite"
	@echo "make bench  - run the benchmarks under bench/ (see docs/benchmarks.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The edge install: what a camera station runs (no torch, no ultralytics).
$(VENV)/.edge: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[edge]"
	@touch $@

# The demo install: agent + hub (still no torch).
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[edge,hub]"
	@touch $@ $(VENV)/.edge

# Everything: edge + hub + train (torch, ultralytics) + dev tools.
$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[edge,hub,train,dev]"
	@touch $@ $(VENV)/.edge $(VENV)/.demo

# DEMO_ARGS: e.g. --seconds 30 (stop by itself), --http-port 8081
demo: $(VENV)/.demo
	$(BIN)/python deploy/demo.py $(DEMO_ARGS)

replay: $(VENV)/.edge
	$(BIN)/lineguard-agent replay $(SAMPLE) --bundle $(BUNDLE) --out $(OUT)/results.jsonl --video $(OUT)/annotated.mp4

test: $(VENV)/.all
	$(BIN)/python -m pytest -q

lint: $(VENV)/.all
	$(BIN)/ruff check .
	$(BIN)/mypy models edge_agent hub lineguard_contract

bench: bench-accuracy bench-throughput bench-streams

# needs the synthetic dataset: make synth
bench-accuracy: $(VENV)/.all
	$(BIN)/python bench/accuracy.py --bundle $(BUNDLE) --data data/synth/dataset --json out/bench/accuracy.json --plot docs/img/part_level_curve.png

bench-throughput: $(VENV)/.all
	$(BIN)/python bench/throughput.py --bundle $(BUNDLE) --video $(SAMPLE) --json out/bench/throughput.json

bench-streams: $(VENV)/.all
	$(BIN)/python bench/streams.py --json out/bench/streams.json

# Regenerate the replay regression file after a deliberate model change (review the diff!).
golden: $(VENV)/.edge
	$(BIN)/lineguard-agent replay $(SAMPLE) --bundle $(BUNDLE) --out sample_data/line_1080p.golden.jsonl -q

synth: $(VENV)/.all
	$(BIN)/lineguard-model synth --out data/synth

train: $(VENV)/.all
	$(BIN)/lineguard-model train --preset default --data data/synth/dataset/data.yaml

clean:
	rm -rf out runs .pytest_cache
