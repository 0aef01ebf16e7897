# qsnap — two commands set everything up on a fresh Debian machine:
#   make demo   the main job end to end on the bundled test guest
#   make test   typecheck, lint and the whole test suite (real QEMU, real guest)
SHELL := /bin/bash
.DEFAULT_GOAL := help
BIN := node_modules/.bin
QSNAP := node dist/cli/main.js
# `make vm` keeps the test guest running here, with its QMP socket at $(VM_DIR)/qmp.sock.
VM_DIR ?= .qsnap/vm
# The snapshot store `make snapshot/restore/snapshots` use (qsnap's own default is
# $$XDG_DATA_HOME/qsnap); `make clean` removes this one.
export QSNAP_STORE ?= $(CURDIR)/.qsnap/store
NAME ?= vm-$(shell date +%Y%m%d-%H%M%S)

PHONY_DAEMON := serve test-daemon bench-daemon chromium
.PHONY: $(PHONY_DAEMON) help setup qemu deps build image test test-package typecheck lint unit demo vm vm-stop snapshot restore snapshots bench bench-full bench-snapshot bench-restore bench-store bench-precopy test-faults test-compat fuzz clean

help:
	@echo "make demo      boot the test guest, snapshot it live, show the result"
	@echo "make test      install what is needed, typecheck, lint, run every test"
	@echo "make vm        boot the test guest in the background (QMP: $(VM_DIR)/qmp.sock)"
	@echo "make snapshot NAME=x   snapshot the VM started by make vm into the store ($(QSNAP_STORE))"
	@echo "make snapshots         list the store's snapshots (the parent tree too)"
	@echo "make restore NAME=x    restore snapshot x (the recorded command line; RESTORE_FLAGS=--lazy)"
	@echo "make vm-stop   stop it"
	@echo "make test-faults  every phase x every fault; regenerates docs/faults.md"
	@echo "make test-faults-diagonal  one fault at every phase (CI)"
	@echo "make test-compat  every QEMU set-up of the compatibility table; regenerates it in README.md"
	@echo "make bench     the benchmark suite: every save/restore path side by side (bench/results/)"
	@echo "make bench-full    the same with an 8 GiB guest too, 5 runs"
	@echo "make bench-snapshot qsnap's snapshot against QEMU's own background snapshot (the pause in detail)"
	@echo "make bench-restore  restore and revert benchmark against stock QEMU"
	@echo "make bench-precopy  snapshots of a lazily restored VM against background snapshots"
	@echo "make fuzz      fuzz the readers of untrusted input for FUZZ_MINUTES (10; FUZZ_SEED=n replays a run)"
	@echo "make test-package  npm pack from a clean clone, install it, strict TypeScript, a checkpoint/revert"
	@echo "make serve     run the daemon in the foreground (ws://127.0.0.1:7325/v1, dashboard http://127.0.0.1:7325/)"
	@echo "make test-daemon   the daemon's longer load and fault tests"
	@echo "make bench-daemon  status latency while a 1 GiB snapshot streams, 20x50 load, 1000 malformed frames"
	@echo "make setup     install QEMU, Chromium, npm packages, build, build the guest image"
	@echo "make clean     remove build output, the guest image and .qsnap/"

setup: qemu chromium deps build image

qemu:
	@scripts/ensure-qemu.sh

chromium:
	@scripts/ensure-chromium.sh

# `npm install --no-save` installs the locked versions without rewriting the lockfile. Not
# `npm ci`: npm 11 leaves other platforms' optional packages (biome, rollup, esbuild binaries)
# out of the lockfile and `npm ci` then refuses it as out of sync (npm/cli#8320).
node_modules/.package-lock.json: package-lock.json
	npm install --no-save --no-audit --no-fund
	@touch $@

deps: node_modules/.package-lock.json

build: deps
	$(BIN)/tsc -p tsconfig.build.json

image:
	@scripts/build-image.sh

typecheck: deps
	$(BIN)/tsc -p tsconfig.json --noEmit

lint: deps
	$(BIN)/biome check .

# QSNAP_QEMU10=1: also test against Debian 13's QEMU 10 in a chroot (scripts/qemu-chroot.sh,
# ~30 s and ~380 MB in /var/tmp the first time; root and Debian's mirror needed).
# QEMU 10's own paths (test/compat/qemu10.test.ts) run with the compatibility matrix.
unit: setup
	QSNAP_QEMU10=$${QSNAP_QEMU10:-$$( [ "$$(id -u)" = 0 ] && echo 1 || echo 0 )} $(BIN)/vitest run \
	  --exclude test/compat/qemu10.test.ts

test: setup typecheck lint unit

# The matrix's diagonal (one fault per phase, rotating; .ci/run runs it): `make test` runs only
# a few sample cells of each group.
test-faults-diagonal: setup
	QSNAP_FAULTS=diagonal $(BIN)/vitest run test/faults

# The whole phase × fault matrix (make test runs a few sample cells of it), then docs/faults.md from
# what it observed — failed cells included, as FAILED; the target fails if any cell did.
test-faults: setup
	QSNAP_FAULTS=full $(BIN)/vitest run test/faults; status=$$?; \
	  QSNAP_FAULTS=render $(BIN)/vitest run test/faults/table.test.ts && exit $$status

# Every set-up of test/compat/setups.ts on QEMU 7.2 (and 10.0 as root) and QEMU 10's own
# paths (qemu10.test.ts: point-in-time checks with negative controls), then the README's
# compatibility table from what they observed (docs/compat.json).
test-compat: setup
	QSNAP_COMPAT=full QSNAP_QEMU10=$${QSNAP_QEMU10:-$$( [ "$$(id -u)" = 0 ] && echo 1 || echo 0 )} \
	  $(BIN)/vitest run test/compat/setups.test.ts test/compat/qemu10.test.ts
	QSNAP_COMPAT=render $(BIN)/vitest run test/compat/setups.test.ts -t 'compatibility table'

# The fuzzer of test/fuzz for FUZZ_MINUTES, from a fresh seed (printed; FUZZ_SEED=n repeats a
# run). A finding is shrunk and written to test/fuzz/regressions/, which make test replays.
FUZZ_MINUTES ?= 10
fuzz: deps qemu
	FUZZ_MINUTES=$(FUZZ_MINUTES) FUZZ_SAVE=1 $(BIN)/vitest run test/fuzz/fuzz.test.ts

# About a minute (two TypeScript builds): the package as a user installs it (test/harness/package.test.ts).
test-package: deps
	QSNAP_TEST_PACKAGE=1 $(BIN)/vitest run test/harness/package.test.ts

demo: setup
	node scripts/demo.mjs

vm: setup
	node scripts/vm.mjs start $(VM_DIR)

vm-stop:
	@if [ -f dist/cli/main.js ]; then node scripts/vm.mjs stop $(VM_DIR); fi

snapshot: build
	$(QSNAP) snapshot --qmp $(VM_DIR)/qmp.sock --name $(NAME)

snapshots: build
	@$(QSNAP) list
	@echo
	@$(QSNAP) list --tree

restore: build
	@if [ -z "$(filter command line,$(origin NAME))" ]; then echo "make restore NAME=<snapshot> (see make snapshots)"; exit 2; fi
	$(QSNAP) restore $(NAME) $(RESTORE_FLAGS)

# The benchmark suite (bench/, docs/benchmarks.md): 256 MiB, 1 GiB and 2 GiB guests, 3 runs, QEMU
# 7.2 and (as root) 10; results in bench/results/. BENCH_FLAGS=--quick for one small run.
bench: setup
	node scripts/bench.mjs $(BENCH_FLAGS)

# The same with an 8 GiB guest too and 5 runs (`node scripts/bench.mjs --full`).
bench-full: setup
	node scripts/bench.mjs --full $(BENCH_FLAGS)

# The older single-purpose benches: qsnap's snapshot against QEMU's background snapshot to
# /dev/null and to a file (the pause broken down), and restore/revert against stock QEMU.
bench-snapshot: setup
	node scripts/bench-snapshot.mjs

bench-restore: setup
	node scripts/bench-restore.mjs

bench-store: setup
	node scripts/bench-store.mjs

bench-precopy: setup
	node scripts/bench-precopy.mjs

# The daemon in the foreground: QSNAP_STORE as above; SERVE_FLAGS="--max-streams 1" etc.
serve: build
	$(QSNAP) serve $(SERVE_FLAGS)

# The daemon's longer runs: its other operations (launch, inspect, verify, cancel, delete, gc,
# revert, the CLI with --daemon), then the full load (20 clients x 50 requests), 1000 malformed
# frames with the memory figure, and the status latency while a 1 GiB snapshot streams.
test-daemon: setup
	QSNAP_DAEMON_LONG=1 $(BIN)/vitest run test/daemon/ops.test.ts
	node scripts/bench-daemon.mjs --check

bench-daemon: setup
	node scripts/bench-daemon.mjs --json

clean: vm-stop
	rm -rf dist images/build .qsnap
