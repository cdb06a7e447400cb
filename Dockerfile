# sitsflow stage image. Each Argo task runs one `sitsflow <stage>` command in it.
#   docker build --build-arg BASE=python:3.11-slim --target cpu -t sitsflow:0.1.0 .
#   docker build --build-arg BASE=python:3.11-slim --target gpu -t sitsflow:0.1.0-gpu .
# BASE must provide Python 3.11 with pip (no registry is assumed: pass a local base if needed).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN python3 -m pip wheel --no-deps -w /wheels .

FROM ${BASE} AS runtime-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 sitsflow

FROM runtime-base AS cpu
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
RUN python3 -m pip install --extra-index-url "${TORCH_INDEX}" "${TORCH_SPEC}" /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/sitsflow
ENTRYPOINT ["sitsflow"]
CMD ["--help"]

FROM runtime-base AS gpu
ARG TORCH_SPEC="torch==2.13.0"
COPY --from=build /wheels /wheels
RUN python3 -m pip install "${TORCH_SPEC}" /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/sitsflow
ENTRYPOINT ["sitsflow"]
CMD ["--help"]
