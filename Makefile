# kubegate — every target does its own setup on a fresh Debian machine (root, registries only).
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(HOME)/.local/bin:$(PATH)
UV ?= uv
VCSIM := .kubegate/bin/vcsim
GO_PACKAGES := golang-go golang-github-vmware-govmomi-dev
PYTEST_ARGS ?=

.PHONY: help setup demo test lint down uv go-deps cloud-init

help:
	@echo "make demo   start the local stack (Temporal + vCenter simulator + workers) and run the story"
	@echo "make test   run the whole test suite (unit, integration, replay)"
	@echo "make lint   ruff + mypy"
	@echo "make down   stop what 'make demo' started"

uv:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --break-system-packages uv

go-deps:
	@if ! command -v go >/dev/null 2>&1 || [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then \
	  echo "installing $(GO_PACKAGES) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(GO_PACKAGES) >/dev/null; \
	fi

# Debian's cloud-init validates the rendered user-data in the tests (its schema, its VMware
# datasource). Installed fresh, it is disabled at boot so it cannot reconfigure this machine.
cloud-init:
	@if ! /usr/bin/python3 -c 'import cloudinit.config.schema' >/dev/null 2>&1; then \
	  echo "installing cloud-init with apt-get (disabled at boot)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cloud-init >/dev/null \
	  && { [ -e /etc/cloud/cloud-init.disabled ] || touch /etc/cloud/cloud-init.disabled; }; \
	fi

# build.sh patches govmomi's property_collector.go in the build (-overlay): rebuild when the
# wrapper, the patch or the script changes, or when Debian updates the govmomi sources
$(VCSIM): $(wildcard tools/vcsim/*.go) $(wildcard tools/vcsim/overlay/*) tools/vcsim/build.sh \
  $(wildcard /usr/share/gocode/src/github.com/vmware/govmomi/simulator/property_collector.go) | go-deps
	@bash tools/vcsim/build.sh $(VCSIM)

setup: uv go-deps cloud-init
	@$(UV) sync --frozen --quiet
	@$(MAKE) --no-print-directory $(VCSIM)

demo: setup
	@$(UV) run --frozen bash scripts/demo.sh

#: test processes (pytest-xdist; three on two cores: the tests mostly wait); each runs its own
#: simulator, Temporal and workers, and takes
#: whole files (fixtures are per file or per process). TEST_PROCESSES=0 runs in one process.
TEST_PROCESSES ?= 3

test: setup
	@$(UV) run --frozen pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

lint: setup
	@$(UV) run --frozen ruff check .
	@$(UV) run --frozen ruff format --check .
	@$(UV) run --frozen mypy

down: uv
	@$(UV) run --frozen kubegate dev down
