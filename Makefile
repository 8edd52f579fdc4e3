# Quick start (as root on a fresh Debian 12 machine):  make demo  ;  make test
PYTHON ?= python3
DEMO_TREE ?= /srv/ovlrun-demo/sw
APT_PACKAGES = libcap-dev attr fuse3 libfuse3-dev pkg-config tmux sudo
STAMP = .setup.stamp

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(PYTHON) demo/build_tree.py $(DEMO_TREE)
	$(PYTHON) -m ovlrun snapshot build --profile demo
	$(PYTHON) -m ovlrun --profile demo -- demo/job.sh

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check ovlrun tests
	$(PYTHON) -m mypy

bench: setup
	$(PYTHON) bench/run.py

clean:
	rm -f $(STAMP)
