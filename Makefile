# The README's commands. Each sets up .venv first (quick when it is already there).
PY := .venv/bin/python

.PHONY: setup setup-browser demo test test-fast test-multinode sweep
setup:
	@bash scripts/setup.sh

setup-browser:  ## headless Chromium + chromedriver (Debian packages) for the browser test
	@bash scripts/setup-browser.sh

demo: setup  ## train + evaluate the demo on a local Ray, log to MLflow (mlflow.db)
	$(PY) -m jobs.train

test: setup setup-browser  ## the whole suite (what CI runs)
	$(PY) -m pytest tests

test-multinode: setup  ## the 2-node Ray cluster tests alone, over a local S3 server (a few minutes)
	$(PY) -m pytest tests -m multinode

test-fast: setup  ## the tests not marked slow (no Ray, no training job), under 2 minutes
	$(PY) -m pytest tests -m "not slow"

sweep: setup  ## a small ASHA sweep: 4 trials of the tiny config, a few minutes
	$(PY) -m tuning.sweep --config configs/sweep_tiny.yaml
