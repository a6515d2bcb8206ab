# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the pipeline on the bundled real sample (sample_data/)
#   make test   create .venv, install, run the test suite (what CI runs; `make test-fast` skips the slow tests)
#
# torch: the venv gets $(TORCH) unless torch is already importable in it. The default is the CPU
# build this project's dev machines keep on disk; with a GPU use your CUDA build, e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
# or point VENV at an environment that already has CUDA torch: make demo VENV=/path/to/env

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DATA ?= sample_data
OUT ?= processed_dataset
# What train.py starts from: lite (a small model trained from scratch, offline), or a CLIPSeg Hub id
# or folder (`hf download CIDAS/clipseg-rd64-refined --local-dir models/clipseg-rd64-refined` on a
# machine with internet, then MODEL=models/clipseg-rd64-refined EVAL_MODEL=runs/demo/best).
MODEL ?= lite
# What predict.py and evaluate.py use in the demo: the shipped model, trained on the full exports.
EVAL_MODEL ?= models/liteseg
RUN ?= runs/demo
EPOCHS ?= 3

.PHONY: setup setup-app demo demo-tiny train-lite app test test-fast lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) preprocess_masks.py --data-root $(DATA) --out $(OUT)
	rm -rf $(RUN)/predictions $(RUN)/report  # an earlier demo's, made with $(EVAL_MODEL), not this run
	$(PY) train.py --data $(OUT) --model $(MODEL) --out $(RUN) --epochs $(EPOCHS) --batch-size 8 --overwrite
	$(PY) predict.py --model $(EVAL_MODEL) --image $(DATA)/*/valid --prompt "segment crack" \
		--prompt "segment taping area" --out $(RUN)/predictions --overlay
	$(PY) evaluate.py --model $(EVAL_MODEL) --data $(OUT) --split valid --out $(RUN)/report

# The shipped model (models/liteseg) from scratch: the two Roboflow exports in $(RAW) (cracks-3ii36/,
# drywall-join-detect/), LiteSeg with its pyramid context block (lite-ctx), 24 epochs, the first 14 on 256 px
# images and each batch of the last 10 on 384 or 448 px ones (progressive resizing; validated and used at the
# model's 448 px): 79.9 minutes on a 2-core AMD EPYC with AVX512-BF16 (models/liteseg/README.md).
# LITE_TRAIN_SIZES=384 trains the last 10 epochs at 384 px alone: the recipe shipped on 2026-12-05 (0.511 / 0.752,
# 70.7 to 74.9 minutes); LITE_TRAIN_SIZES= (empty) at 448 px alone: the recipe shipped until then (0.508 / 0.762;
# its one run timed on the AMD EPYC: 90.4 minutes). Earlier: LITE_MODEL=lite LITE_EPOCHS=20 LITE_LOW_RES_EPOCHS=10
# LITE_LOW_RES_SIZE=320 LITE_TRAIN_SIZES= (0.480 / 0.759), the same with LITE_MODEL=lite-ctx (0.495 / 0.763).
# Trains into runs/liteseg, copies its best/ and training record into models/liteseg
# (replacing the shipped model: `git checkout models/liteseg` restores it), and writes the valid-split report
# there. The shipped model's cracks train set is this project's 2,642-photo subset (RAW=../shared/data).
# LITE_FLAGS: more train.py flags, e.g. LITE_FLAGS="--seed 1 --ema 0.999".
RAW ?= data/raw
LITE_EPOCHS ?= 24
LITE_LOW_RES_EPOCHS ?= 14
LITE_LOW_RES_SIZE ?= 256
LITE_TRAIN_SIZES ?= 384 448
LITE_MODEL ?= lite-ctx
LITE_FLAGS ?=
train-lite: setup
	$(PY) preprocess_masks.py --data-root $(RAW) --out data/full
	$(PY) train.py --data data/full --model $(LITE_MODEL) --out runs/liteseg --epochs $(LITE_EPOCHS) --batch-size 16 --lr 2e-3 \
		--low-res-epochs $(LITE_LOW_RES_EPOCHS) --low-res-size $(LITE_LOW_RES_SIZE) \
		$(if $(LITE_TRAIN_SIZES),--train-sizes $(LITE_TRAIN_SIZES)) --patience 0 --overwrite $(LITE_FLAGS)
	mkdir -p models/liteseg
	cp runs/liteseg/best/config.json runs/liteseg/best/model.safetensors runs/liteseg/best/defectseg.json \
		runs/liteseg/metrics.csv runs/liteseg/curves.png models/liteseg/
	$(PY) evaluate.py --model models/liteseg --data data/full --split valid --out models/liteseg/report --examples 2

# The CLIPSeg pipeline offline, on a tiny randomly initialised CLIPSeg (numbers are meaningless:
# it shows the flow and the outputs where the hub cannot be reached).
demo-tiny: setup
	$(PY) -m defectseg.tiny models/tiny-clipseg
	$(MAKE) demo MODEL=models/tiny-clipseg RUN=runs/demo-tiny EPOCHS=2 EVAL_MODEL=runs/demo-tiny/best

# The inspectors' web app (app.py, docs/app.md): gradio is an optional extra beside the core install.
$(VENV)/.app-installed: $(VENV)/.installed requirements-app.txt
	$(PY) -m pip install -q -r requirements-app.txt
	touch $@

setup-app: $(VENV)/.app-installed

app: setup-app
	$(PY) app.py

# Each test's name as it runs (a long one is never mistaken for a hang) and the slowest at the end.
test: setup
	$(PY) -m pytest -v --durations=15

# The edit loop: everything but the tests marked slow (end-to-end runs, DDP, overfitting, full data).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(OUT) runs reports predictions .pytest_cache
