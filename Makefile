# The two README commands (`make demo`, `make test`) do all set-up on a fresh machine:
# each creates .venv and installs the project into it when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: all install demo test test-slow test-soak test-real-size bench lint clean

all: install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m training.demo --out demo_out

# Two pytest-xdist workers (a 2-core machine; TEST_WORKERS=N for more cores), one test file each at a
# time, so module fixtures are built once; the heavy files first (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile tests

# Two CPU processes, 200 steps, SIGKILLed and resumed twice, every epoch's samples accounted for
# (tests/test_soak.py). Minutes; in neither the default nor the slow run.
test-soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m soak tests/test_soak.py

# Real model configurations (GroundingDINO-T, SAM ViT-H, CLIP ViT-L-14, Qwen2.5-VL widths, SDXL) with
# random weights through the real preset on CPU: catches what tiny configs hide; the engines' own
# real-size tests (tests/test_engines_*.py: Qwen3-VL, SAM 3, SAM 2.1, the detectors) too. Not in CI's run.
test-real-size: $(STAMP)
	$(BIN)/python -m pytest -q -m real_size tests/test_real_size.py tests/test_engines_*.py

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check datagen training shards benchmarks tests

clean:
	rm -rf demo_out .pytest_cache

# groundingdino-py (the ground stage's engine: groundingdino-py) needs transformers<5 and the project
# needs transformers>=5, so it gets its own venv: the project without its dependency list, plus what
# the ground stage, shards and the tests import.
GDINO_VENV := .venv-gdino
GDINO_STAMP := $(GDINO_VENV)/.installed
.PHONY: test-gdino

$(GDINO_STAMP): pyproject.toml
	test -x $(GDINO_VENV)/bin/python || $(PY) -m venv $(GDINO_VENV)
	$(GDINO_VENV)/bin/python -m pip install -q --upgrade pip
	$(GDINO_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 transformers==4.57.6 \
		'groundingdino-py>=0.4' numpy pillow pandas pyarrow webdataset 'fsspec[http]' pycocotools \
		matplotlib tqdm pyyaml safetensors psutil pydantic pytest pytest-timeout
	$(GDINO_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(GDINO_STAMP)

test-gdino: $(GDINO_STAMP)
	$(GDINO_VENV)/bin/python -m pytest -q tests/test_ground_gdino.py
