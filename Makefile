# The README's two commands: `make quick` (set up, then the CPU-sized study end to
# end) and `make test` (the suite; .ci/run calls it too). Debian, Python >= 3.11, as root.
#
# Debian's own python3 (and Ubuntu's since 23.04) refuses `pip install` outside a
# virtual environment (PEP 668), so everything installs into $(VENV), made from
# $(PYTHON): PYTHON=python3.12 make ... picks another interpreter; VENV= (empty)
# installs into $(PYTHON) itself, e.g. an environment of your own that is active.
PYTHON ?= python3
VENV ?= .venv
PY := $(if $(VENV),$(VENV)/bin/python,$(PYTHON))
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup venv quick test newest

# The real Fashion-MNIST from Debian's package (offline), then the project with the
# versions the suite last passed with (constraints.txt; torch 2.14.1 installs from
# these machines' disk).
setup: venv
	test -f $(DATA) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'

# Drift, seen before users see it: the newest versions pyproject.toml allows (torch
# still pinned), in an environment of their own ($(NEWEST), hard links to $(VENV)'s
# files, so that only what changed is downloaded), on the smoke set (pytest -m smoke).
NEWEST ?= .venv-newest
newest: setup
	rm -rf $(NEWEST) && cp -al $(VENV) $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	@$(NEWEST)/bin/python -c 'from study import environment; e = environment.collect(); \
	    print("newest allowed versions:", ", ".join(f"{k} {v}" for k, v in e["packages"].items()))'
	$(NEWEST)/bin/python -m pytest -q -m smoke -p no:cacheprovider

# $(VENV) from $(PYTHON), made again if it was made from another Python version;
# Debian ships venv's pip apart, as python3.X-venv: installed when venv fails.
venv:
ifneq ($(VENV),)
	@want=$$($(PYTHON) -c 'import sys; print(sys.version)') || exit 1; \
	if [ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print(sys.version)')" != "$$want" ]; then \
	    echo "$(VENV) was made from another Python; making it again from $(PYTHON)"; rm -rf $(VENV); fi; \
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	    v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    apt-get update -qq && apt-get install -y -qq python$$v-venv && $(PYTHON) -m venv $(VENV); }
endif

# The study, then its report (results/quick/report/report.md and the plots).
quick: setup
	$(PY) -m study.run search_spaces/quick.yaml
	$(PY) -m study.analyze results/quick

# No setup here: the suite runs against whatever $(PY) has (a developer's checkout too). Two
# workers, a test module each at a time (pytest-xdist; the longest modules first: tests/conftest.py):
# the studies the tests run wait on Ray and on subprocesses, so two share 2 cores well.
TEST_WORKERS ?= 2
test:
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
