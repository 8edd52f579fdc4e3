# Quick start (as root on a fresh Debian 12 machine):  make demo  ;  make test
PYTHON ?= python3
DEMO_TREE ?= /srv/ovlrun-demo/sw
APT_PACKAGES = libcap-dev attr fuse3 libfuse3-dev pkg-config tmux sudo
STAMP = .setup.stamp

.PHONY: setup demo test test-vm lint bench install clean

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

# Debian 12 (6.1) and 13 (6.12) kernels under qemu (TCG), the launch subset in each; see
# tests/test_vm_kernels.py.  Kernels are downloaded once into /var/cache/ovlrun-vm.
VM_APT_PACKAGES = qemu-system-x86 busybox-static cpio kmod xz-utils zstd
test-vm: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(VM_APT_PACKAGES) >/dev/null
	OVLRUN_VM_TESTS=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_vm_kernels.py

lint: setup
	$(PYTHON) -m ruff check ovlrun tests
	$(PYTHON) -m mypy

# Installs the package and the fast isolated launcher (python -I -S, see ovlrun/wrapper.py)
# that contrib/sudoers.d/ovlrun points at.
install:
	$(PYTHON) -m pip install -q .
	$(PYTHON) -m ovlrun.cli.install_launcher /usr/local/sbin/ovlrun

bench: setup
	$(PYTHON) bench/run.py

clean:
	rm -f $(STAMP)
