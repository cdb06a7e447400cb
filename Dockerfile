# sitsflow stage image: each Argo task runs one `sitsflow <stage>` command in it.
#
#   docker build --build-arg BASE=python:3.11-slim --target cpu -t sitsflow:0.1.0 .
#   docker build --build-arg BASE=python:3.11-slim --target gpu -t sitsflow:0.1.0-gpu .
#
# BASE must provide Python 3.11 as `python3` with its venv module (python:3.11-slim, or a Debian
# bookworm root with python3 and python3-venv: .ci/image.sh makes one with debootstrap, since no
# image registry is assumed). Optional build inputs go in a `build-extra/` folder of the build
# context (never committed): a local torch wheel (pass its path, /tmp/extra/<wheel>, as
# TORCH_SPEC) and a CA bundle for pip behind a TLS-intercepting proxy (PIP_CERT=/tmp/extra/ca.crt).
# Nothing secret is baked in: S3 credentials reach the pods as environment variables from a Secret.
#
# The stages are ordered so that the legacy builder (DOCKER_BUILDKIT=0, which builds every stage
# up to the target) never builds the CUDA stage for `--target cpu`.
ARG BASE=python:3.11-slim

# -- build: a virtual environment in /opt/venv with torch and sitsflow -------------------------
# Dependencies are installed before the code is copied: a code change rebuilds only the last,
# small layer, never the torch one.
FROM ${BASE} AS build
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /tmp/src
# The glob keeps this COPY valid when the context has no build-extra/ folder.
COPY pyproject.toml build-extr[a] /tmp/extra/
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} -U pip \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} \
      --extra-index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && /opt/venv/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/requirements.txt
COPY services ./services
# building the package fetches its build backend (setuptools): the CA bundle is still needed here
RUN /opt/venv/bin/python -m pip install -q --no-deps /tmp/src \
 && /opt/venv/bin/python -m pip uninstall -q -y pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
 && rm -rf /tmp/src /tmp/extra

# -- runtime: the base plus an unprivileged user, running sitsflow ----------------------------
FROM ${BASE} AS runtime
# The source revision (e.g. the git commit) is part of every output fingerprint (manifest.py).
ARG REVISION=""
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sitsflow MPLCONFIGDIR=/tmp/matplotlib SITSFLOW_REVISION=${REVISION}
RUN useradd --create-home --home-dir /home/sitsflow --uid 10001 --user-group sitsflow
WORKDIR /home/sitsflow
USER 10001:10001
ENTRYPOINT ["sitsflow"]
CMD ["--help"]

# -- cpu: CPU torch (the default target of CI) -------------------------------------------------
# The virtual environment comes last: every instruction after a large layer costs a full copy
# with Docker's vfs storage driver (CI).
FROM runtime AS cpu
COPY --from=build /opt/venv /opt/venv

# -- gpu: a CUDA build of torch, chosen explicitly from PyTorch's per-CUDA wheel index ----------
# TORCH_CUDA=cu128 (CUDA 12.8): NVIDIA driver R570 or newer on the nodes; GPUs of compute
# capability 7.0 to 12.0 (Volta V100, Turing T4, Ampere A100/A10, Ada L4/L40S, Hopper H100/H200,
# Blackwell B200). PyPI's torch 2.13.0 is a CUDA 13.0 build instead (driver R580+, compute
# capability 7.5+, no Volta): where PyTorch's index is unreachable, take it from PyPI with
# --build-arg GPU_TORCH_INDEX=https://pypi.org/simple --build-arg GPU_TORCH_SPEC=torch==2.13.0
# (own names: the legacy builder also builds the cpu stages, which TORCH_INDEX/TORCH_SPEC set).
# The wheels bring the CUDA runtime; the node brings the driver (docs/deploy.md).
FROM ${BASE} AS build-gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG GPU_TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_CUDA}
ARG GPU_TORCH_SPEC=torch==${TORCH_VERSION}+${TORCH_CUDA}
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /tmp/src
COPY pyproject.toml build-extr[a] /tmp/extra/
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} -U pip \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} \
      --index-url "${GPU_TORCH_INDEX}" "${GPU_TORCH_SPEC}" \
 && /opt/venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None and f'gpu target: torch {torch.__version__} is a CPU build')" \
 && /opt/venv/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} -r /tmp/requirements.txt
COPY services ./services
# building the package fetches its build backend (setuptools): the CA bundle is still needed here
RUN /opt/venv/bin/python -m pip install -q --no-deps /tmp/src \
 && /opt/venv/bin/python -m pip uninstall -q -y pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
 && rm -rf /tmp/src /tmp/extra

FROM runtime AS gpu
# No NVIDIA_VISIBLE_DEVICES=all: a pod that requests no GPU (nb_gpu : 0) must see none; the
# NVIDIA device plugin sets it for the GPUs a pod was given. SITSFLOW_GPUS (set by the
# WorkflowTemplate) makes a pod given a GPU that torch cannot use fail with exit 2.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-gpu /opt/venv /opt/venv
