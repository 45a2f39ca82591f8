# The README's two commands: `make quick` (set up, then the CPU-sized study end to
# end) and `make test` (the suite; .ci/run calls it too). Debian, Python >= 3.11, as root.
PYTHON ?= python3
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup quick test

# The real Fashion-MNIST from Debian's package (offline), torch pinned to the
# versions that install from these machines' disk, then the project.
setup:
	test -f $(DATA) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[dev]'

quick: setup
	$(PYTHON) -m study.run search_spaces/quick.yaml

# No setup here: the suite runs against whatever is installed (a developer's checkout too).
test:
	$(PYTHON) -m pytest -q
