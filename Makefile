# The README's two commands: `make run` (main job on the embedded default) and
# `make test` (the whole suite, never the benchmarks). Both set up .venv/ themselves.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# Embedded GCS (fake-gcs-server); its buckets live in .gcs/ at the repo root.
GCS_PORT ?= 4443
export DRIVERS_GCS_ROOT ?= $(CURDIR)/.gcs
export STORAGE_EMULATOR_HOST ?= http://127.0.0.1:$(GCS_PORT)

# Debian kernels the embedded default builds drivers for, three releases with three
# compilers, each built in its release's builder image: bullseye's 5.10 (gcc-10),
# bookworm's 6.1 and backported 6.12 (gcc-12), trixie's 6.12 (gcc-14: this host cannot
# build it). `drivers bundle debian --list` shows every kernel the releases offer.
DEMO_KERNELS ?= 5.10.0-46-amd64 6.1.0-56-amd64 6.12.115+deb12-cloud-amd64 \
                6.12.118+deb13-amd64
# The collector's real driver sources (falcosecurity-libs trees, one tarball per driver
# version) and the versions the embedded default prepares from them, TARBALL=VERSION: one
# from 2022 that fails to compile on 6.12, and 8.1.0, which builds there.
# (beside the checkout, else the workplace's /work/shared)
DRIVER_SOURCES ?= $(firstword $(wildcard $(CURDIR)/../shared/data/driver-sources \
                      /work/shared/data/driver-sources) $(CURDIR)/../shared/data/driver-sources)
DEMO_SOURCES ?= stackrox-falcosecurity-libs-2.3.0.tar.gz=2.3.0 \
                falcosecurity-libs-8.1.0+driver.tar.gz=8.1.0
# 2.3.0 fails to compile on the 6.12 kernels (2 kernels x 2 kinds): the run reports those
# failures with their logs and the blocklist line that would cover them, and passes with a
# warning up to this many (the nightly's default is 0: any new failure fails the run).
DEMO_MAX_FAILURES ?= 4

.PHONY: setup run run-cpaas ui test lint bench bench-nightly bench-listing bench-cpaas bench-vmtest \
        bench-scheduler gcs-up gcs-down docker-up
.PHONY: bench-coverage bench-why

setup: $(STAMP)
	@scripts/host-deps.sh
	@scripts/podman-setup.sh >/dev/null

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements-dev.txt
	touch $(STAMP)

gcs-up: setup
	$(BIN)/drivers gcs up --port $(GCS_PORT)

# The embedded default's own config (Debian releases as builders, runtime "docker": each
# shard sandboxed in its release's builder image) for what runs the embedded pipeline;
# the tests choose their own. The Docker API is podman's, on a socket in .cache/podman/.
EMBEDDED_CONFIG := $(CURDIR)/include/drivers/config/embedded.toml
PODMAN_SOCK := $(CURDIR)/.cache/podman/podman.sock
run run-cpaas ui bench-sandbox: export DRIVERS_CONFIG ?= $(EMBEDDED_CONFIG)
run run-cpaas ui: export DOCKER_HOST ?= unix://$(PODMAN_SOCK)

docker-up: setup
	@scripts/podman-service.sh >/dev/null

gcs-down: setup
	$(BIN)/drivers gcs down

# The main job: bundles (and each kernel's bootable image, for the VM load tests) and
# the prepared real sources into the embedded buckets, one real upstream_drivers run (parallel builder
# shards, then every new driver loaded in its own kernel under QEMU), then its summary.
# A second run builds nothing and boots no VM.
# (The JSON those commands print for machines is dropped; their stderr says what they did.)
run: gcs-up docker-up images
	$(BIN)/drivers bundle debian $(DEMO_KERNELS) --upload gs://collector-bundles \
	    --boot-images gs://collector-kernel-images >/dev/null
	for s in $(DEMO_SOURCES); do $(BIN)/drivers sources prepare "$(DRIVER_SOURCES)/$${s%=*}" \
	    --driver-version "$${s##*=}" --upload gs://collector-sources >/dev/null || exit 1; done
	$(BIN)/drivers run-dag upstream_drivers --conf '{"max_failures": $(DEMO_MAX_FAILURES)}'

# After `make run`: two downstream drivers images made from the drivers it built plus
# downstream extras (s390x, ppc64le) and a compile failure, then the fixed image; each
# through one real cpaas_drivers run. The first run must fail on its compile failure
# (after pushing and packaging); the second passes (a third would say "unchanged").
CPAAS_IMAGES := $(CURDIR)/.cache/cpaas
run-cpaas: gcs-up docker-up
	$(BIN)/drivers image demo --out $(CPAAS_IMAGES) >/dev/null
	! $(BIN)/drivers run-dag cpaas_drivers \
	    --conf '{"source_image": "$(CPAAS_IMAGES)/with-failures.tar"}'
	$(BIN)/drivers run-dag cpaas_drivers --conf '{"source_image": "$(CPAAS_IMAGES)/fixed.tar"}'

# The embedded default's Airflow UI with the driver coverage page, until Ctrl-C.
ui: gcs-up docker-up
	$(BIN)/drivers ui

# DRIVERS_REQUIRE_ALL: a test skipped for a missing host tool fails instead (tests/conftest.py).
test: setup
	DRIVERS_REQUIRE_ALL=1 $(BIN)/pytest -q

# The pipeline through the real scheduler: PostgreSQL, `airflow scheduler`,
# `dag-processor`, `api-server`, `triggerer`, runs triggered through the REST API, the
# scheduler killed mid-run and restarted, a run cancelled. Also part of `make test`.
.PHONY: test-distributed images images-production
test-distributed: setup
	$(BIN)/pytest -q tests/test_distributed.py

# Container images, tagged with pyproject.toml's version (one version source). The Debian
# builders (bullseye, bookworm, trixie) build here with podman from debootstrap'd bases,
# only when missing or stale (`drivers images build [RELEASE...]`; CI runs it before the
# tests). The Airflow image and the production builders (rhel7, rhel8, fc36) pull their
# bases from Docker Hub, quay.io and the Fedora registry: `make images-production`.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= podman
REGISTRY ?= quay.io/stackrox-io
images: setup
	$(BIN)/drivers images build

images-production:
	$(ENGINE) build -f Dockerfile -t $(REGISTRY)/collector-drivers-airflow:$(VERSION) .
	for b in rhel7 rhel8 fc36; do $(ENGINE) build -f images/builder-$$b/Dockerfile \
	    -t $(REGISTRY)/collector-drivers-builder-$$b:$(VERSION) . || exit 1; done

# Part of CI (.ci/run), before the tests.
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Benchmarks, never part of `make test`; figures go to bench/RESULTS.md.
# bench-nightly needs the state `make run` leaves; bench-listing takes ~10 min.
bench: setup
	$(BIN)/python bench/bench_plan.py
	$(BIN)/python bench/bench_packages.py
	$(BIN)/python bench/bench_builder.py

bench-nightly: run
	$(BIN)/python bench/bench_nightly.py

bench-listing: setup
	$(BIN)/python bench/bench_listing.py

# ~25 min the first time (makes a 4 GiB image in bench/out/cpaas/), ~15 min after.
bench-cpaas: setup
	$(BIN)/python bench/bench_cpaas.py

# ~10 min the first time (Debian kernel images and bundles into .cache/).
# `drivers why` as a process over a 1,000,000-record ledger (~2 min).
bench-why: setup
	$(BIN)/python bench/bench_why.py

bench-vmtest: setup
	$(BIN)/python bench/bench_vmtest.py

# ~5 min: the no-op run through the real scheduler (PostgreSQL) and through `dags test`.
bench-scheduler: setup
	$(BIN)/python bench/bench_scheduler.py

# ~5 min: a shard in its sandboxed container against the same shard on the host.
.PHONY: bench-sandbox
bench-sandbox: setup
	$(BIN)/python bench/bench_sandbox.py

# Hours the first time: every kernel bullseye, bookworm and trixie offer (~100), real 2.3.0
# and 8.1.0 drivers in their builder images, VM-tested, published, on its own embedded GCS
# and Airflow home (bench/out/catalogue/); ARGS=--kernels-per-release 1 for a short one.
.PHONY: bench-catalogue
bench-catalogue: setup images
	$(BIN)/python bench/bench_catalogue.py $(ARGS)

# ~1 min: the coverage page with 10,000 kernels x 5 versions, first render in chromium.
bench-coverage: setup
	$(BIN)/python bench/bench_coverage_page.py
