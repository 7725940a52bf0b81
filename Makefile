# Quick start:  make demo   (sets up .venv with the runtime only, trains then deploys on the demo data)
#               make test   (sets up .venv, runs the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
# thumbclf itself with its ray extra (executor: ray), so that the tests cover it;
# `pip install .` alone needs no Ray
# exact versions the tests passed with; `make test CONSTRAINTS=` installs without them
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test setup runtime bench lock clean-demo docs browser slurm orthanc

# the runtime only (thumbclf and its dependencies, no test tools, no extras): what the demo needs
$(VENV)/.runtime: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) -e .
	touch $@

runtime: $(VENV)/.runtime

# the runtime and the test tools (requirements.txt);
# reinstalled whenever a file that decides what gets installed changes
$(VENV)/.installed: requirements.txt pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# the optional parts (pyproject's extras), so that the tests cover them too; the demo needs none
EXTRAS := ray,openvino,docs,dicomweb
$(VENV)/.extras: $(VENV)/.installed
	$(PY) -m pip install --quiet $(PIN) --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

demo: runtime
	$(PY) train_thumbclassifier.py experiments/demo_train.yaml --output $(RUN)/train
	$(PY) deploy_thumbclassifier.py experiments/demo_deploy.yaml --output $(RUN)/deploy --set modelAdr=../$(RUN)/train
	@echo "Demo finished: open $(RUN)/train/report.html and $(RUN)/deploy/report.html"

# the review page's tests drive Chromium (Selenium): installed from Debian's packages when missing
# and run as root; otherwise those tests are skipped and say why
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium or chromedriver missing (not root, or no apt-get): the browser tests" \
		"will be skipped; install them with: sudo apt-get install chromium chromium-driver"; fi

# the SLURM array test (tests/workflows/test_shards.py) starts a single-node SLURM as root:
# Debian's slurmctld, slurmd and munge, installed when missing; otherwise it is skipped and says why
slurm:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends slurmctld slurmd slurm-client munge; \
	else echo "slurmctld, slurmd or munged missing (not root, or no apt-get): the SLURM test" \
		"will be skipped; install them with: sudo apt-get install slurmctld slurmd slurm-client munge"; fi

# the DICOMweb tests (tests/inputs/test_dicomweb.py) start Debian's Orthanc with its DICOMweb
# plugin on 127.0.0.1, installed when missing and run as root; otherwise they are skipped
orthanc:
	@if command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends orthanc orthanc-dicomweb; \
	else echo "Orthanc or orthanc-dicomweb missing (not root, or no apt-get): the DICOMweb tests" \
		"will be skipped; install them with: sudo apt-get install orthanc orthanc-dicomweb"; fi

# the tests on two pytest-xdist workers, each test module on one worker (its module fixtures
# built once; tests/conftest.py); `make test TEST_WORKERS=0` runs them all in one process
TEST_WORKERS ?= 2
test: setup $(VENV)/.extras browser slurm orthanc
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the docs extra only (MkDocs and its plugins), on top of the runtime
$(VENV)/.docs: $(VENV)/.runtime
	$(PY) -m pip install --quiet $(PIN) -e ".[docs]"
	touch $@

# the documentation site, built strictly (a broken link or a stale reference fails) into site/;
# it opens from the disk: site/index.html
docs: $(VENV)/.docs
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: setup
	$(PY) bench/bench.py

# write the versions installed in .venv to constraints.txt (keeps its header); see the README
lock: setup
	grep '^#' constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --all --exclude pip --exclude-editable --exclude thumbclf >> constraints.txt.new
	mv constraints.txt.new constraints.txt
