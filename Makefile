# stemlab — every entry point a newcomer needs. `make up` and `make test` install what is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# System packages the services use: decoding (ffmpeg, libsndfile), synthesis (fluidsynth and the
# General MIDI soundfont; the Csound bank is a training font and TimGM6mb the held-out test set's,
# docs/models.md), the browser test (chromium), compose file validation (docker-compose), the job
# store tests of replicas (postgresql: the tests start a throwaway server of their own).
APT_PACKAGES := ffmpeg libsndfile1 fluidsynth fluid-soundfont-gm csound-soundfont timgm6mb-soundfont chromium \
	docker-compose postgresql
PROTOS := $(sort $(wildcard protos/stemlab/v1/*.proto))
# TF Serving's prediction protocol for the separation client, taken from the installed
# tensorflow-serving-api so the client can speak it without importing TensorFlow
# (services/serving/protocol.py).
SERVING_PROTOCOL := services/serving/tf_serving_protocol.binpb
GENERATED := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS)) $(patsubst protos/%.proto,%_pb2_grpc.py,$(PROTOS))
PYTEST_ARGS ?=
# Test workers (pytest-xdist): one per core; each test file runs whole on one worker, so a file's
# module fixtures (a trained run, a running service) are made once.
TEST_WORKERS ?= auto

.PHONY: help install system-packages python protos test lint up down status logs clean

help:
	@echo "make up        install what is missing and start the whole stack"
	@echo "make test      install what is missing and run the tests"
	@echo "make down | status | logs | lint | protos | install"

install: system-packages python protos

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing system packages:" $$missing "— run: sudo apt-get install" $$missing; exit 1; \
	  fi; \
	fi

$(PY):
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)

python: $(STAMPS)/python

# Reinstalled only when pyproject.toml changes, so a second `make install` is quick.
$(STAMPS)/python: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(STAMPS) && touch $@

protos: $(GENERATED) $(SERVING_PROTOCOL)

# Generated code lands in stemlab/v1/ (imported as stemlab.v1.*_pb2) and is never committed.
$(GENERATED) &: $(PROTOS) $(STAMPS)/python
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	@touch $(GENERATED)

$(SERVING_PROTOCOL): services/serving/protocol.py $(STAMPS)/python
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m services.serving.protocol $@

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check services model stemlab tests bench research realset deploy

up: install
	$(PY) deploy/local/stack.py up

down:
	@if [ -x $(PY) ]; then $(PY) deploy/local/stack.py down; else echo "stemlab is not installed"; fi

status:
	@$(PY) deploy/local/stack.py status

logs:
	@$(PY) deploy/local/stack.py logs

clean:
	rm -rf $(STAMPS) stemlab/v1/*_pb2*.py stemlab/v1/*_pb2*.pyi $(SERVING_PROTOCOL)
