# Event Delivery: the operator's interface. `make help` lists the targets.
#
# Local targets run against the emulators (`make emulators` starts them and writes
# .emulators/env.sh, which the other targets source). Cloud targets take
# PROJECT, REGION and BUCKET.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
STATE_DIR ?= .emulators
PROJECT ?= local-project
REGION ?= europe-west1
BUCKET ?= event-delivery-local
STORAGE_ROOT ?= gs://$(BUCKET)
WINDOW_SECONDS ?= 3600
ENV := $(if $(wildcard $(STATE_DIR)/env.sh),. ./$(STATE_DIR)/env.sh &&,)

KEY_ARGS ?=
# Where decrypt records its clear copies and forget looks for them; empty: the tools' default (decrypted-copies
# beside a SQLite keystore; a Bigtable keystore needs one named, a restricted gs:// folder).
COPIES_INVENTORY ?=
COPIES_ARGS := $(if $(COPIES_INVENTORY),--copies_inventory $(COPIES_INVENTORY),)
.PHONY: help install test soak bench test-fast lint format demo emulators emulators-down provision run load audit \
	auditor report forget sweep-keys mutants rewrap decrypt redrive backfill deploy update drain monitoring template \
	gateway gateway-bench

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(INSTALLED): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)  ## Create .venv with the pinned dependencies.

TEST_WORKERS ?= 2
test: $(INSTALLED)  ## Run every test; starts and stops its own emulators [TEST_WORKERS=2 processes].
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

soak: $(INSTALLED)  ## Every type under load for minutes; prints the figures (SOAK_SECONDS=180 SOAK_RATE=4).
	$(PY) -m pytest -m soak -s tests/integration/test_soak.py

bench: $(INSTALLED)  ## Cost per event vs the floor, scaling, memory, latency (about 19 min) [ARGS="--events 50000"].
	$(PY) -m benchmarks.bench $(ARGS)

test-fast: $(INSTALLED)  ## Only the tests that need no emulator.
	$(PY) -m pytest -m "not emulators"

# Mutant-name globs, e.g. MODULES="transforms.dedup.* event_delivery.keys.*"; empty: every module in
# pyproject.toml's [tool.mutmut], resuming from the verdicts already in mutants/.
MODULES ?=
mutants: $(INSTALLED)  ## Mutation testing of the modules that lose or leak data on a wrong line (hours; see docs/development.md) [MODULES="transforms.dedup.*"].
	@mkdir -p mutants
	$(VENV)/bin/mutmut run $(foreach glob,$(MODULES),'$(glob)') > mutants/run.log 2>&1 || { tail -c 2000 mutants/run.log; exit 1; }
	@# One line per module: how many of its mutants each verdict holds; then the survivors by name.
	@$(VENV)/bin/mutmut results --all true | awk '{ split($$1, name, ".x"); $$1 = ""; n[name[1] $$0]++ } \
		END { for (k in n) print k, n[k] }' | sort
	@$(VENV)/bin/mutmut results

lint: $(INSTALLED)  ## ruff check, format check, and the import contracts (imports only go down).
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(INSTALLED)  ## Apply ruff's fixes and formatting.
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(INSTALLED)  ## Every type end to end on fresh emulators (about 2 minutes); output in .demo/.
	$(PY) -m tools.local.demo

emulators: $(INSTALLED)  ## Start the Pub/Sub, GCS and Bigtable emulators; writes $(STATE_DIR)/env.sh.
	$(PY) -m tools.local.emulators up --state_dir $(STATE_DIR)

emulators-down:  ## Stop the emulators.
	$(PY) -m tools.local.emulators down --state_dir $(STATE_DIR)

provision: $(INSTALLED)  ## Topics, subscriptions, buckets with their lifecycle rules, keys; DATAFLOW=1 adds KMS keys, Bigtable, the worker account and its roles [DRY_RUN=1] [ARGS=...].
	$(ENV) $(PY) -m tools.ops.provision --project $(PROJECT) --bucket $(BUCKET) $(KEY_ARGS) \
		$(if $(DATAFLOW),--for_dataflow --region $(REGION),) $(if $(DRY_RUN),--dry_run,) $(ARGS)

run: $(INSTALLED)  ## Run one type's job locally: make run TYPE=play [ARCHIVE=1] [ARGS="--trigger_seconds 10"].
	@test -n "$(TYPE)" || { echo "usage: make run TYPE=<event type> [ARCHIVE=1] [ARGS=...]" >&2; exit 2; }
	$(ENV) $(PY) -m pipelines.delivery --event_type $(TYPE) --project $(PROJECT) \
		--storage_root $(STORAGE_ROOT) --window_seconds $(WINDOW_SECONDS) \
		$(if $(ARCHIVE),--raw_archive_root $(STORAGE_ROOT)/raw,) $(KEY_ARGS) $(ARGS)

GATEWAY_PORT ?= 8080
gateway: $(INSTALLED)  ## Serve POST /v1/events/<type> into the local topics (after make emulators provision) [GATEWAY_PORT=8080] [ARGS=...].
	$(ENV) $(PY) -m gateway --project $(PROJECT) --port $(GATEWAY_PORT) --spill_dir .gateway-spill $(ARGS)

gateway-bench: $(INSTALLED)  ## The gateway's requests/s, p50/p99 and non-200 share, then through a Pub/Sub outage (about 1 minute) [ARGS="--concurrency 64"].
	$(PY) -m benchmarks.gateway_bench $(ARGS)

load: $(INSTALLED)  ## Publish generated traffic: make load TYPE=play [ARGS="--count 5000 --rate 500"].
	@test -n "$(TYPE)" || { echo "usage: make load TYPE=<event type> [ARGS=...]" >&2; exit 2; }
	$(ENV) $(PY) -m tools.local.loadgen --project $(PROJECT) --event_type $(TYPE) $(ARGS)

audit: $(INSTALLED)  ## Count every message's outcome and check the output contract.
	$(ENV) $(PY) -m tools.ops.audit --storage_root $(STORAGE_ROOT) --window_seconds $(WINDOW_SECONDS) \
		$(if $(TYPE),--event_type $(TYPE),)

auditor: $(INSTALLED)  ## Count what is published per type and hour, for make audit: make auditor [TYPE=play] [ARGS="--allowed_lateness_seconds 30"].
	$(ENV) $(PY) -m pipelines.auditor --event_types $(or $(TYPE),all) --project $(PROJECT) \
		--storage_root $(STORAGE_ROOT) --window_seconds $(WINDOW_SECONDS) $(ARGS)

report: $(INSTALLED)  ## One offline HTML page of every type's hours against its SLOs: make report [TYPE=play] [OUTPUT=.demo/report.html].
	$(ENV) $(PY) -m tools.ops.report --storage_root $(STORAGE_ROOT) --window_seconds $(WINDOW_SECONDS) \
		$(if $(TYPE),--event_type $(TYPE),) --output $(or $(OUTPUT),.demo/report.html)

# Forget's values can come from a data subject's request: make neither expands them nor pastes them
# into a recipe's text. The recipe reads them, quoted, from its environment.
override SUBJECT := $(value SUBJECT)
override FILE := $(value FILE)
override COPIES := $(value COPIES)
export SUBJECT FILE COPIES

forget: $(INSTALLED)  ## Crypto-shred subjects, unless decrypted copies hold them: make forget FILE=ids.txt | FILE=- (ids on stdin) [COPIES=purge|keep] [KEY_ARGS=...].
	@test -n "$$SUBJECT$$FILE" || { echo "usage: make forget FILE=<ids, one per line> | FILE=- < ids [COPIES=purge|keep]" >&2; exit 2; }
	@# Not echoed: a subject id is personal data and stays out of terminal and CI logs.
	@if [ -n "$$SUBJECT" ]; then set -- --subject "$$SUBJECT"; else set -- --subjects_file "$$FILE"; fi; \
		$(ENV) $(PY) -m pipelines.forget "$$@" --decrypted_copies "$${COPIES:-list}" $(COPIES_ARGS) $(KEY_ARGS)

sweep-keys: $(INSTALLED)  ## Delete the keys nothing points to and the quarantine keys past their retention; run daily [KEY_ARGS=...].
	$(ENV) $(PY) -m pipelines.forget --sweep_orphans $(KEY_ARGS)

rewrap: $(INSTALLED)  ## Replace the key-wrapping keys under the KEK's primary version, re-wrap every key [ARGS="--rotate_local_key" | "--destroy_kek_version 1"].
	$(ENV) $(PY) -m pipelines.rewrap $(KEY_ARGS) $(ARGS)

decrypt: $(INSTALLED)  ## Decrypted copy, recorded for forget: make decrypt TYPE=search START=2026-11-29T00 END=2026-11-29T06 OUTPUT=dir.
	@test -n "$(TYPE)" -a -n "$(START)" -a -n "$(END)" -a -n "$(OUTPUT)" || \
		{ echo "usage: make decrypt TYPE=<type> START=<hour> END=<hour> OUTPUT=<root> [KEY_ARGS=...]" >&2; exit 2; }
	$(ENV) $(PY) -m pipelines.decrypt --event_type $(TYPE) --input_root $(STORAGE_ROOT)/delivered \
		--storage_root $(STORAGE_ROOT) --output_root $(OUTPUT) --start $(START) --end $(END) $(COPIES_ARGS) $(KEY_ARGS)

redrive: $(INSTALLED)  ## Replay dead letters: make redrive TYPE=search START=... END=... [FIX=strip_unknown_fields].
	@test -n "$(TYPE)" -a -n "$(START)" -a -n "$(END)" || \
		{ echo "usage: make redrive TYPE=<type> START=<hour> END=<hour> [FIX=<fix>] [KEY_ARGS=...]" >&2; exit 2; }
	$(ENV) $(PY) -m pipelines.redrive --event_type $(TYPE) --storage_root $(STORAGE_ROOT) --start $(START) \
		--end $(END) --window_seconds $(WINDOW_SECONDS) $(if $(FIX),--fix $(FIX),) $(KEY_ARGS)

backfill: $(INSTALLED)  ## Re-deliver hours from the raw archive: make backfill TYPE=play START=... END=... [OUTPUT=root].
	@test -n "$(TYPE)" -a -n "$(START)" -a -n "$(END)" || \
		{ echo "usage: make backfill TYPE=<type> START=<hour> END=<hour> [OUTPUT=<root>] [KEY_ARGS=...]" >&2; exit 2; }
	$(ENV) $(PY) -m pipelines.backfill --event_type $(TYPE) --raw_archive_root $(STORAGE_ROOT)/raw \
		--storage_root $(or $(OUTPUT),$(STORAGE_ROOT)/backfill) --start $(START) --end $(END) \
		--window_seconds $(WINDOW_SECONDS) $(KEY_ARGS) $(ARGS)

deploy: $(INSTALLED)  ## Start Dataflow jobs: make deploy TYPE=play | TIER=high [TEMPLATE=gs://.../delivery.json [IMAGE=...]] [CODEC=snappy] [DRY_RUN=1].
	@test -n "$(TYPE)$(TIER)" || { echo "usage: make deploy TYPE=<type> | TIER=<tier> [TEMPLATE=gs://...] [DRY_RUN=1]" >&2; exit 2; }
	$(ENV) $(PY) -m tools.ops.deploy --project $(PROJECT) --region $(REGION) --bucket $(BUCKET) \
		$(if $(TYPE),--event_type $(TYPE),--tier $(TIER)) $(if $(DRY_RUN),--dry_run,) \
		$(if $(TEMPLATE),--template $(TEMPLATE),) $(if $(IMAGE),--image $(IMAGE),) $(if $(CODEC),--codec $(CODEC),)

template: $(INSTALLED)  ## The delivery job's Flex Template: metadata from the registry and options, image from ./Dockerfile (Cloud Build) [IMAGE=...] [DRY_RUN=1].
	$(PY) -m tools.ops.flex_template --project $(PROJECT) --region $(REGION) --bucket $(BUCKET) \
		$(if $(IMAGE),--image $(IMAGE),) $(if $(DRY_RUN),--dry_run,)

update: $(INSTALLED)  ## Update Dataflow jobs in place (same run, same hours): make update TYPE=play | TIER=high [TEMPLATE=gs://...] [CODEC=...] [DRY_RUN=1].
	@test -n "$(TYPE)$(TIER)" || { echo "usage: make update TYPE=<type> | TIER=<tier> [DRY_RUN=1]" >&2; exit 2; }
	$(ENV) $(PY) -m tools.ops.deploy --project $(PROJECT) --region $(REGION) --bucket $(BUCKET) \
		$(if $(TYPE),--event_type $(TYPE),--tier $(TIER)) --update $(if $(DRY_RUN),--dry_run,) \
		$(if $(TEMPLATE),--template $(TEMPLATE),) $(if $(IMAGE),--image $(IMAGE),) $(if $(CODEC),--codec $(CODEC),)

drain: $(INSTALLED)  ## Drain Dataflow jobs (they stop; open hours stay staged for the next run): make drain TYPE=play | TIER=high.
	@test -n "$(TYPE)$(TIER)" || { echo "usage: make drain TYPE=<type> | TIER=<tier> [DRY_RUN=1]" >&2; exit 2; }
	$(PY) -m tools.ops.deploy --project $(PROJECT) --region $(REGION) --bucket $(BUCKET) \
		$(if $(TYPE),--event_type $(TYPE),--tier $(TIER)) --drain $(if $(DRY_RUN),--dry_run,)

.PHONY: tables
tables: $(INSTALLED)  ## BigQuery external tables over each type's delivered hours (dt, hr): make tables PROJECT=my-project BUCKET=... [DATASET=event_delivery] [LOCATION=EU] [TYPE=search] [DRY_RUN=1].
	$(ENV) $(PY) -m tools.ops.tables --project $(PROJECT) --bucket $(BUCKET) $(if $(DATASET),--dataset $(DATASET),) \
		$(if $(LOCATION),--location $(LOCATION),) $(if $(TYPE),--event_type $(TYPE),) $(if $(DRY_RUN),--dry_run,)

monitoring: $(INSTALLED)  ## Alert policies and a dashboard per tier, from the registry, into Cloud Monitoring: make monitoring PROJECT=my-project [TIER=high] [CHANNELS="<channel names>"] [DRY_RUN=1].
	$(PY) -m tools.ops.monitoring --project $(PROJECT) $(if $(TIER),--tier $(TIER),) $(if $(DRY_RUN),--dry_run,) \
		$(foreach channel,$(CHANNELS),--notification_channel $(channel))
