# Two commands for a fresh clone:
#   make run    set everything up, then run the main job (`dvc repro`: the digits benchmark end to end)
#   make test   set everything up, then run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

# Quiet, offline, local: no analytics, no hub downloads, no Ray auth token in $HOME.
export DVC_NO_ANALYTICS := 1
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run study test lint clean hosts-tools

setup: $(VENV)/.installed

# torch first and pinned, through pip (which finds the wheels on local disk where a machine keeps
# them): the registry also serves newer builds, and the GPU machines run torch 2.11, so the package
# itself only asks for torch>=2.4. The rest through uv, which resolves the same versions as pip in
# a seventh of the time; torch is named again so uv keeps the installed build. --compile-bytecode
# writes the .pyc files at install time as pip does: uv leaves them out by default, and where
# PYTHONDONTWRITEBYTECODE is set (CI here) every process then compiled Ray, DVC, diffusers and
# great-expectations from source again (`import great_expectations, ray, diffusers`: 36.5 s
# against 17.0 s with the .pyc files).
TORCH := torch==2.14.1 torchvision==0.29.1
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv==0.13.9
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[pipeline,test]" $(TORCH)
	touch $@

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "Report: reports/digits.md  (metrics: $(BIN)/dvc metrics show)"

# The design study on digits (params.yaml digits.ablation): every variant and seed, then its page.
study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro studies/dvc.yaml
	@echo "Report: reports/ablations.md"

# Two processes, whole files at a time (module fixtures such as a Prefect server start once).
# xdist hands out the files with the most tests first. (Keeping tests/conftest.py's longest-first
# order instead, --no-loadscope-reorder, ran the chain files against each other: 34.6 min of tests in
# one clean-clone run here, against 27.1 min for the default order one run earlier, on a suite with
# a few minutes less work; one run each, so a hint, not a measurement of the cause.)
test: lint hosts-tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadfile --durations=40

# tests/test_multihost.py builds test hosts from network and PID namespaces: iproute2 (`ip`) and
# util-linux (`unshare`, `nsenter`), installed here when missing and we are root (CI is).
hosts-tools:
	@command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq iproute2 util-linux >/dev/null; } \
	  || echo "no iproute2/util-linux and not root: tests/test_multihost.py will be skipped"

# ruff (pyproject.toml [tool.ruff]): pyflakes' checks (unused or undefined names, redefinitions),
# then the formatter's check (`$(BIN)/ruff format .` applies it).
lint: setup
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .

clean:
	rm -rf runs data/digits
