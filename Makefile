# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/flickr8k
DEMO_INDEX ?= out/demo-index
QUERY  ?= a dog playing with a ball
EXTRAS ?= cpu,train,ray,dev

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint chaos bench bench-index bench-train bench-service bench-uploads bench-ray serve clean

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

## The crash harness's long run: SIGKILL at every file-system event of build/rebuild/add/remove, ENOSPC at every
## write, timed kills, a file-size limit and (as root) a small tmpfs; the suite runs a seeded sample of it.
chaos: setup
	nice -n 10 $(PY) -m tests.chaos --seed $${SEED:-0}

bench: bench-index bench-train bench-service bench-ray

bench-index: setup
	$(PY) benchmarks/bench_index.py --data $(DATA)

bench-train: setup
	$(PY) benchmarks/bench_train.py --data $(DATA)

bench-service: setup
	$(PY) benchmarks/bench_service.py --data $(DATA)

bench-uploads: setup
	$(PY) benchmarks/bench_uploads.py --data $(DATA)

bench-ray: setup
	$(PY) benchmarks/bench_ray.py --data $(DATA)

serve: setup
	SERVICE_INDEX_DIR=$(DEMO_INDEX) $(PY) -m service

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
