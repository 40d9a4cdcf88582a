# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/flickr8k
CLASS_DATA ?= ../shared/data/caltech101-dev
DEMO_INDEX ?= out/demo-index
QUERY  ?= a dog playing with a ball
EXTRAS ?= cpu,train,ray,dev

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint bench bench-index bench-train bench-quality bench-frontier bench-service bench-ray serve clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

## Index the 1,000 Flickr8k test photos with the offline default encoder, then answer a text query.
demo: setup
	$(PY) -m indexer build $(DATA) --split test --out $(DEMO_INDEX)
	$(PY) -m indexer search $(DEMO_INDEX) "$(QUERY)" -k 5

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: bench-index bench-train bench-quality bench-frontier bench-service bench-ray

bench-index: setup
	$(PY) benchmarks/bench_index.py --data $(DATA)

bench-train: setup
	$(PY) benchmarks/bench_train.py --data $(DATA)

## Dev sweep (Flickr8k dev + Caltech-101 dev) of the shipped default's recipe; appends to benchmarks/results/quality_sweep.jsonl
bench-quality: setup
	$(PY) benchmarks/bench_quality.py --data $(DATA) --class-data $(CLASS_DATA) --run '{}'

## images/s of each candidate encoder on this CPU beside its dev quality (table + plot)
bench-frontier: setup
	$(PY) benchmarks/bench_frontier.py --data $(DATA)

bench-service: setup
	$(PY) benchmarks/bench_service.py --data $(DATA)

bench-ray: setup
	$(PY) benchmarks/bench_ray.py --data $(DATA)

serve: setup
	SERVICE_INDEX_DIR=$(DEMO_INDEX) $(PY) -m service

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
