# Quick start:  make demo   (sets up .venv, trains then deploys on the demo data)
#               make test   (sets up .venv, runs the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test setup bench clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) train_thumbclassifier.py experiments/demo_train.yaml --output $(RUN)/train
	$(PY) deploy_thumbclassifier.py experiments/demo_deploy.yaml --output $(RUN)/deploy --set modelAdr=../$(RUN)/train
	@echo "Demo finished: open $(RUN)/train/report.html and $(RUN)/deploy/report.html"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench.py
