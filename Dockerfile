# The search service (`sbir serve`) and the index jobs (`sbir index ...`) in one image.
#
#   docker build -t sbir .                      # GPU host: CUDA base, torch cu130 + faiss-gpu
#   docker run --gpus all -v sbir-data:/data -p 8000:8000 sbir
#
# BASE_IMAGE: torch 2.14.1 is the CUDA 13.0 build and brings its CUDA libraries as pip wheels
# (nvidia-*), faiss-gpu brings CUDA 12 ones; the base image contributes the CUDA 13.0 user-space
# runtime and the NVIDIA_* settings through which nvidia-container-toolkit mounts the host's driver
# (driver >= 580 for CUDA 13.0). The `base` flavour is enough: the larger `runtime` and
# `cudnn-runtime` flavours would only duplicate libraries the wheels already ship.
# CI builds on a local Debian image with python3 (no registry there) and EXTRAS=cpu.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

# gpu: faiss-gpu (for CUDA hosts); cpu: faiss-cpu. Exactly one of them: both provide `faiss`.
ARG EXTRAS=gpu
# Build-time package sources (a mirror, a wheel folder over HTTP), unset by default: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python: the CUDA images have none (Ubuntu 24.04 gives 3.12); an image that has it is left alone.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/sbir \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/sbir sbir \
    && mkdir -p /data && chown sbir:sbir /data

ENV PATH=/opt/sbir/bin:$PATH \
    VIRTUAL_ENV=/opt/sbir \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change reuses these layers and does
# not reinstall torch. Two layers: torch and torchvision at pyproject's pins with their CUDA wheels
# (about 4.5 GB), then everything else (about 1.1 GB). The builder holds a layer twice while it
# commits it, so two layers need less free disk than one (measured in docs/BENCHMARKS.md), and a
# change to another dependency does not reinstall torch. The CPU image (EXTRAS=cpu) leaves out
# triton (0.9 GB): it compiles GPU kernels for torch.compile, which nothing here uses; pip puts it
# back as torch's dependency in each step, so each step removes it again.
COPY pyproject.toml ./
# (SC2086: the two pins are meant to split into two arguments.)
# hadolint ignore=DL3013,SC2086
RUN pins=$(python3 -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; pins = [d for d in deps if re.split(r'[^A-Za-z0-9_.-]', d)[0] in ('torch', 'torchvision')]; assert len(pins) == 2, pins; print(' '.join(pins))") \
    && pip install ${pins} \
    && if [ "${EXTRAS}" = cpu ]; then pip uninstall -y triton; fi
# hadolint ignore=DL3013
RUN mkdir -p sbir model index_builder service \
    && touch README.md sbir/__init__.py model/__init__.py index_builder/__init__.py service/__init__.py \
    && pip install ".[${EXTRAS}]" \
    && if [ "${EXTRAS}" = cpu ]; then pip uninstall -y triton; fi \
    && pip uninstall -y sbir \
    && rm -rf /src/*

# The code.
COPY . .
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && rm -rf /src/* \
    && python -c "import faiss, torch, service.app, index_builder.build; print('faiss', faiss.__version__, 'torch', torch.__version__)"

USER 10001:10001
WORKDIR /data
# /data/models: checkpoints; /data/photos: the collection; /data/index: ROOT (CURRENT, snapshots/).
VOLUME ["/data"]
# OMP_WAIT_POLICY: OpenMP workers that spin collapse the CPU encoder on a shared host (measured in
# docs/BENCHMARKS.md: an index job 2.5 -> 10.6 photos/s); `sbir serve` sets it by itself, this
# covers the index jobs too. -e OMP_WAIT_POLICY=ACTIVE to undo.
# SBIR_CACHE_DIR: the int8 backbone graph is quantized once (about 10 s) and kept here, on the volume,
# so a restarted container does not quantize it again (model/quantize.py).
ENV SBIR_SNAPSHOT_ROOT=/data/index \
    SBIR_CACHE_DIR=/data/cache \
    SBIR_HOST=0.0.0.0 \
    SBIR_PORT=8000 \
    OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SBIR_PORT', '8000'), timeout=4)"]

# `sbir serve` runs uvicorn in this process (PID 1 without an init): SIGTERM stops it gracefully.
ENTRYPOINT ["sbir"]
CMD ["serve"]
