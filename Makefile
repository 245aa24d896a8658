# nmt: staged recipes. `make recipe=en-de train` runs data -> spm -> train -> eval; every stage is a
# file target under exp/<recipe>/, so make skips what is already up to date.
#
#   make install                       create .venv and install nmt with its extras
#   make test                          run the test suite (installs first)
#   make recipe=de-en spm MIRROR=../shared/data
#   make recipe=de-en train SET="train.max_epochs=3 model.hidden_size=256"

recipe ?= en-de
PYTHON ?= python3
VENV ?= .venv
# The torch requirement installed before nmt itself. On a machine with the CPU wheel on disk,
# `torch==2.13.0` takes it; elsewhere override it, e.g. TORCH="torch" or a CPU index of your own.
TORCH ?= torch==2.13.0
EXP ?= exp/$(recipe)
SET ?=
MIRROR ?=
# Training processes: NPROC=2 runs `nmt train` under torchrun (DistributedDataParallel).
NPROC ?= 1

ifneq ($(MIRROR),)
export NMT_DATA_MIRROR := $(abspath $(MIRROR))
endif

NMT := $(VENV)/bin/nmt
ifeq ($(NPROC),1)
TRAIN := $(NMT) train
else
TRAIN := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m nmt.cli train
endif
NMT_ARGS := $(recipe) --exp $(EXP) $(foreach s,$(SET),--set $(s))
RECIPE_FILE := recipes/$(recipe).yaml
INSTALLED := $(VENV)/.installed

STATS := $(EXP)/data/stats.json
SPM := $(EXP)/spm/manifest.json
MODEL := $(EXP)/model/summary.json
SCORES := $(EXP)/eval/scores.json
REPORT := $(EXP)/compare/report.md
# The fixed-context twin that `compare` sets against $(EXP): the same recipe and SET, no attention.
FIXED := $(EXP)-fixed
FIXED_ARGS := $(recipe) --exp $(FIXED) $(foreach s,$(SET) model.attention=none model.input_feeding=false,--set $(s))
FIXED_STATS := $(FIXED)/data/stats.json
FIXED_SPM := $(FIXED)/spm/manifest.json
FIXED_MODEL := $(FIXED)/model/summary.json
# `make ensemble`: the recipe's own run ($(EXP), its train.seed) and one more run per seed in
# SEEDS, each in $(EXP)-seedN on a copy of $(EXP)'s data and SentencePiece stages (the models of
# an ensemble must share them), each evaluated alone, then decoded together from $(EXP)-ensemble.
# `make -j3 ... SET=train.threads=1` trains the three at once, one core thread each.
SEEDS ?= 2 3
SEED_MODELS := $(foreach s,$(SEEDS),$(EXP)-seed$(s)/model/summary.json)
SEED_SCORES := $(foreach s,$(SEEDS),$(EXP)-seed$(s)/eval/scores.json)
ENSEMBLE := $(EXP)-ensemble
ENSEMBLE_SCORES := $(ENSEMBLE)/eval/scores.json

.PHONY: install test lint data spm train eval compare ensemble bench help
.DEFAULT_GOAL := help

help:
	@echo "make install | test | lint | bench [QUICK=1] [MINUTES=10] [ANCHOR=onmt] [SET=...]"
	@echo "make recipe=NAME data | spm | train | eval | compare | ensemble [SEEDS=\"2 3\"]   [MIRROR=dir] [SET=\"key=value ...\"]"
	@echo "recipes: $(basename $(notdir $(wildcard recipes/*.yaml)))"

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[plot,serve,sweep,dev]"
	touch $@

install: $(INSTALLED)

# The browser test (tests/test_page.py) drives the distribution's Chromium: Playwright's own
# download fetches a browser built for other systems. Order-only, and a file target, so that make
# does nothing when it is there. Without root or apt-get the test skips itself, so say so once
# rather than fail (also when apt-get cannot reach its mirror).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then :; else \
		echo "make test: $(CHROMIUM) is missing and could not be installed (apt-get install chromium as root): the browser test will be skipped"; \
	fi

# Two test processes: most tests train tiny single-threaded models, so two cores halve the time.
TEST_WORKERS ?= 2
test: $(INSTALLED) | $(CHROMIUM)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --durations=15 tests

lint: $(INSTALLED)
	$(VENV)/bin/ruff check nmt tests bench

# The speed/quality benchmark (bench/run.py): QUICK=1 for a few minutes, ANCHOR=joey|onmt|fairseq
# to run that toolkit's anchor script from ../shared/bench/anchors in the same invocation.
# SET="train.compile=true ..." overrides recipe keys of nmt's training run; MINUTES=10 sets the
# training budget of every toolkit (default 20).
QUICK ?=
ANCHOR ?=
MINUTES ?=
bench: $(INSTALLED)
	$(VENV)/bin/python bench/run.py $(if $(QUICK),--quick) $(if $(MINUTES),--minutes $(MINUTES)) $(foreach a,$(ANCHOR),--anchor $(a)) $(foreach s,$(SET),--set $(s))

# The stages. Installing is order-only: reinstalling must not make trained models look stale.
$(STATS): $(RECIPE_FILE) | $(INSTALLED)
	$(NMT) data $(NMT_ARGS)

$(SPM): $(STATS) | $(INSTALLED)
	$(NMT) spm $(NMT_ARGS)

$(MODEL): $(SPM) | $(INSTALLED)
	$(TRAIN) $(NMT_ARGS)

$(SCORES): $(MODEL) | $(INSTALLED)
	$(NMT) evaluate $(NMT_ARGS)

# Attention versus fixed context: the twin goes through the same stages in $(FIXED), then
# `nmt compare` decodes the first test set with both models.
$(FIXED_STATS): $(RECIPE_FILE) | $(INSTALLED)
	$(NMT) data $(FIXED_ARGS)

$(FIXED_SPM): $(FIXED_STATS) | $(INSTALLED)
	$(NMT) spm $(FIXED_ARGS)

$(FIXED_MODEL): $(FIXED_SPM) | $(INSTALLED)
	$(TRAIN) $(FIXED_ARGS)

$(REPORT): $(MODEL) $(FIXED_MODEL) | $(INSTALLED)
	$(NMT) compare $(EXP) $(FIXED) --out $(EXP)/compare

# A seed's run: the stages it shares are copied from $(EXP) (again whenever they are newer), then
# the recipe trains with train.seed=N; an interrupted run resumes from its last.pt as usual.
$(EXP)-seed%/model/summary.json: $(SPM) | $(INSTALLED)
	mkdir -p $(EXP)-seed$*
	cp -r $(EXP)/data $(EXP)/spm $(EXP)-seed$*/
	$(TRAIN) $(recipe) --exp $(EXP)-seed$* $(foreach s,$(SET) train.seed=$*,--set $(s))

# Each seed is scored alone too: the mean and spread of single models is set against the ensemble.
$(EXP)-seed%/eval/scores.json: $(EXP)-seed%/model/summary.json | $(INSTALLED)
	$(NMT) evaluate $(recipe) --exp $(EXP)-seed$* $(foreach s,$(SET) train.seed=$*,--set $(s))

# (The seed models are named here so that make keeps them: else they would be intermediate files.)
$(ENSEMBLE_SCORES): $(SCORES) $(SEED_MODELS) $(SEED_SCORES) | $(INSTALLED)
	mkdir -p $(ENSEMBLE)
	cp -r $(EXP)/data $(ENSEMBLE)/
	$(NMT) evaluate $(recipe) --exp $(ENSEMBLE) $(foreach s,$(SET),--set $(s)) --model $(EXP) $(foreach s,$(SEEDS),--model $(EXP)-seed$(s))

data: $(STATS)
spm: $(SPM)
train: $(SCORES)
eval: $(SCORES)
compare: $(REPORT)
ensemble: $(ENSEMBLE_SCORES)
