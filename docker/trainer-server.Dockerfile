# syntax=docker/dockerfile:1
# Trainer server: `lockstep trainer` on port 8080; runs, publishes versions to /models, coordinates flips.
#   docker build -f docker/trainer-server.Dockerfile -t trainer-server:0.1.0 .
# CPU torch by default (simulation runs and small fine-tunes); --build-arg TORCH_VARIANT=cu128 for CUDA, the
# image job runs train with on GPU nodes (k8s/training/job.yaml: trainer-server:latest-cu128). TRL is in both.

ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_RELEASE=bookworm

# ---- build: a virtual environment with torch, the pinned runtime dependencies and lockstep ----------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build

# CPU torch: this process needs no GPU (TORCH_VARIANT=cu128 gives a CUDA build, TORCH_INDEX_URL a mirror).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

# torch first and alone, from its own index: anything that pulls torch in later would bring PyPI's build.
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Runtime dependencies at the versions the test suite runs with (pyproject.toml gives the floors).
# A layer of their own so that changing one does not download torch again.
# hadolint ignore=DL3059
RUN pip install \
      "transformers==5.24.0" \
      "tokenizers==0.23.3" \
      "safetensors==0.8.0" \
      "huggingface_hub==2.4.0" \
      "fastapi==0.165.0" \
      "uvicorn[standard]==0.54.0" \
      "httpx==0.28.1" \
      "pydantic==2.14.4" \
      "pydantic-settings==2.16.3" \
      "prometheus_client==0.26.0" \
      "rich==15.0.0" \
      "filelock==4.3.1" \
      "kubernetes==37.0.2" \
      "psutil==7.2.2" \
      "trl==1.16.0" \
      "accelerate==1.16.0" \
      "datasets==5.2.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# --no-deps: nothing unpinned sneaks in; pip check fails the build if pyproject.toml needs more.
RUN pip install --no-deps . && pip check

# ---- runtime: the interpreter, the environment, a numeric non-root user; nothing else -------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="lockstep trainer-server" \
      org.opencontainers.image.description="Lockstep trainer server (torch ${TORCH_VARIANT})" \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid 10001 lockstep \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lockstep

# Owned by root and read-only to the app: the code cannot be changed by the process that runs it.
COPY --from=build /opt/venv /opt/venv

# The root filesystem may be read-only (Kubernetes mounts an emptyDir at /tmp): every cache under /tmp.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

# Liveness only; readiness is for the orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["lockstep"]
CMD ["trainer", "--host", "0.0.0.0", "--port", "8080"]
