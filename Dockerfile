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
COPY services ./services
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} -U pip \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} \
      --extra-index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} /tmp/src \
 && /opt/venv/bin/python -m pip uninstall -q -y pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
 && rm -rf /tmp/src /tmp/extra

# -- runtime: the base plus an unprivileged user, running sitsflow ----------------------------
FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sitsflow MPLCONFIGDIR=/tmp/matplotlib
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

# -- gpu: CUDA torch from PyPI (its wheels bring the CUDA runtime; the node brings the driver) --
FROM build AS build-gpu
ARG TORCH_GPU_SPEC="torch==2.13.0"
ARG PIP_CERT=""
COPY pyproject.toml build-extr[a] /tmp/extra/
RUN /opt/venv/bin/python -m ensurepip -q \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} \
      --force-reinstall --no-deps "${TORCH_GPU_SPEC}" \
 && /opt/venv/bin/python -m pip install -q ${PIP_CERT:+--cert "$PIP_CERT"} "${TORCH_GPU_SPEC}" \
 && /opt/venv/bin/python -m pip uninstall -q -y pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
 && rm -rf /tmp/extra

FROM runtime AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-gpu /opt/venv /opt/venv
