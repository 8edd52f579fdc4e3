# Quick start, as root on a fresh Debian 12 or 13 machine:
#     make demo    installs ovlrun system-wide (make install), builds a demo tree and its
#                  snapshots, runs a job in it, then publishes the snapshots, fetches them
#                  into a second store (a second node) and runs the job there
#     make test    runs the test suite in a clean venv of Debian's python3
#
# Everything uses Debian's own interpreter, never the first python3 on PATH (a pyenv or
# conda one may carry packages that hide a missing dependency).
SYSTEM_PYTHON ?= /usr/bin/python3
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
SUDOERS_DIR ?= $(SYSCONFDIR)/sudoers.d
LIBDIR = $(PREFIX)/lib/ovlrun
VENV = $(LIBDIR)/venv
LAUNCHER = $(PREFIX)/sbin/ovlrun
USER_COMMAND = $(PREFIX)/bin/ovlrun
PROFILE_DIR = $(SYSCONFDIR)/ovlrun/profiles
DEMO_TREE ?= /srv/ovlrun-demo/sw
# The development venv for tests and lint: made from SYSTEM_PYTHON with only what
# pyproject.toml declares, so an undeclared import fails the suite.
DEV_VENV = .venv
DEV_PYTHON = $(DEV_VENV)/bin/python
# Build and runtime: venv + python-prctl's compiler, headers and libcap.  Tests: FUSE
# (the NFS stand-in), attr, tmux, sudo, erofs-utils (fsck.erofs); the VM tests: qemu,
# busybox, cpio, kmod, xz, zstd, and the kernel NFS server's userland (the guests run it
# from this machine's root); the Slurm 24.11 tests:
# debootstrap; lint: shellcheck (ci/).
RUNTIME_PACKAGES = python3-venv python3-dev gcc libcap-dev sudo
VM_PACKAGES = qemu-system-x86 busybox-static cpio kmod xz-utils zstd nfs-kernel-server
TEST_PACKAGES = attr fuse3 libfuse3-dev pkg-config tmux erofs-utils debootstrap shellcheck $(VM_PACKAGES)
APT_STAMP = .apt.stamp
DEV_STAMP = $(DEV_VENV)/.installed

.PHONY: install uninstall demo test test-fast checkout-readable lint bench vm-test clean

$(APT_STAMP):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$(RUNTIME_PACKAGES) $(TEST_PACKAGES) >/dev/null
	touch $@

# A root-owned venv in $(VENV) with ovlrun installed from a wheel built from this
# checkout (root never runs the checkout's code), the isolated root launcher in
# $(LAUNCHER) (python -I -S, that venv's site-packages after the stdlib), the same
# command for users in $(USER_COMMAND) (status, profile check), $(PROFILE_DIR) and the
# sudoers drop-in (0440, checked with visudo).  Re-running upgrades in place.
install: $(APT_STAMP)
	@test "$$(id -u)" = 0 || { echo "make install: run as root" >&2; exit 1; }
	rm -rf build/wheel $(VENV).new
	umask 022 && $(SYSTEM_PYTHON) -m venv $(VENV).new
	umask 022 && $(VENV).new/bin/python -m pip install -q --upgrade pip
	umask 022 && $(VENV).new/bin/python -m pip wheel -q --no-deps -w build/wheel .
	umask 022 && $(VENV).new/bin/python -m pip install -q build/wheel/ovlrun-*.whl
	rm -rf $(VENV).old
	if [ -d $(VENV) ]; then mv $(VENV) $(VENV).old; fi
	mv $(VENV).new $(VENV)
	rm -rf $(VENV).old
	install -d -m 0755 $(PREFIX)/sbin $(PREFIX)/bin $(PROFILE_DIR)
	$(VENV)/bin/python -I -m ovlrun.cli.install_launcher $(LAUNCHER)
	ln -sfn $(LAUNCHER) $(USER_COMMAND)
	install -d -m 0755 $(SUDOERS_DIR)
	sed 's|/usr/local/sbin/ovlrun|$(LAUNCHER)|' contrib/sudoers.d/ovlrun > $(SUDOERS_DIR)/.ovlrun.new
	chmod 0440 $(SUDOERS_DIR)/.ovlrun.new
	visudo -cqf $(SUDOERS_DIR)/.ovlrun.new
	mv $(SUDOERS_DIR)/.ovlrun.new $(SUDOERS_DIR)/ovlrun
	@echo "installed: $(LAUNCHER) (root launcher), $(USER_COMMAND), $(VENV), $(SUDOERS_DIR)/ovlrun;"
	@echo "profiles go in $(PROFILE_DIR); snapshots in /var/lib/ovlrun"

# Removes what install made; keeps profiles ($(PROFILE_DIR)) and the snapshot store.
uninstall:
	rm -f $(SUDOERS_DIR)/ovlrun $(USER_COMMAND) $(LAUNCHER)
	rm -rf $(LIBDIR)
	@echo "removed ovlrun; kept $(PROFILE_DIR) and /var/lib/ovlrun (remove them by hand if unwanted)"

demo: install
	$(SYSTEM_PYTHON) demo/build_tree.py $(DEMO_TREE)
	install -m 0644 profiles/demo.toml $(PROFILE_DIR)/demo.toml
	$(LAUNCHER) snapshot build --profile demo
	OVLRUN_CMD=$(USER_COMMAND) $(LAUNCHER) --profile demo -- demo/job.sh
	OVLRUN_CMD=$(USER_COMMAND) demo/fleet.sh $(LAUNCHER)

$(DEV_STAMP): pyproject.toml | $(APT_STAMP)
	$(SYSTEM_PYTHON) -m venv $(DEV_VENV)
	$(DEV_PYTHON) -m pip install -q --upgrade pip
	$(DEV_PYTHON) -m pip install -q -e '.[test]'
	touch $@

# Everything: the host suite, Slurm 22.05 and 24.11 end to end, Debian's 6.1 and 6.12
# kernels booted under qemu (OVLRUN_VM_TESTS=0 skips those), and README's quick start in
# fresh Debian 12 and 13 roots (tests/test_quickstart.py).  CI runs this.
test: checkout-readable $(DEV_STAMP)
	OVLRUN_VM_TESTS=$${OVLRUN_VM_TESTS:-1} $(DEV_PYTHON) -m pytest -q

# For development only (CI never uses it): the suite without the tests that build whole
# environments (qemu kernels, the Slurm 24.11 root, the fresh Debian roots).
test-fast: checkout-readable $(DEV_STAMP)
	$(DEV_PYTHON) -m pytest -q -m "not environment"

# The suite runs parts as an unprivileged user (sudo, Slurm jobs, the test user): they
# execute this checkout's .venv/bin/python.  Checked first: a clone in /root (mode 0700)
# would otherwise fail a few tests deep into the run.
checkout-readable:
	@setpriv --reuid=nobody --regid=nogroup --clear-groups test -r $(CURDIR)/Makefile || { \
		echo "make: $(CURDIR) is not readable by other users, and the tests run some commands as one:" \
			"use a checkout outside /root (e.g. /usr/local/src/ovlrun)" >&2; exit 1; }

lint: $(DEV_STAMP)
	$(DEV_PYTHON) -m ruff check ovlrun tests
	$(DEV_PYTHON) -m mypy
	shellcheck -x ci/*.sh

# Debian 12 (6.1) and 13 (6.12) kernels booted under qemu (TCG), the launch subset in
# each (tests/test_vm_kernels.py).  Kernel packages are fetched once into
# /var/cache/ovlrun-vm (apt under a private configuration; the host's sources untouched).
vm-test: $(DEV_STAMP)
	OVLRUN_VM_TESTS=1 $(DEV_PYTHON) -m pytest -q -p no:cacheprovider tests/test_vm_kernels.py

bench: $(DEV_STAMP)
	$(DEV_PYTHON) bench/run.py

clean:
	rm -rf $(APT_STAMP) $(DEV_VENV) build
