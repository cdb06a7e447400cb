#!/usr/bin/env bash
# Build the `cpu` image for real and run pipeline stages in it against an S3 server on loopback.
#
#   sudo .ci/image.sh            (as root, on a Debian bookworm machine; about 8 minutes, most of
#                                it pip and Docker's vfs driver copying the image layers)
#
# Self-contained: installs Debian's Docker engine and debootstrap, makes the base image with
# debootstrap (no image registry is reachable), starts a private dockerd (vfs storage, no
# iptables, no bridge), builds `--target cpu`, then runs `prepare`, `sample`, `plan training` and
# one training shard (`train --shard 0`, as the WorkflowTemplate runs it) in the image with the Slovenia example uploaded to a moto S3 server on 127.0.0.1,
# and checks the outputs landed in the bucket. Everything it started is stopped and unmounted on
# exit. Exit status: 0 on success, non-zero only when a step really failed.
#
# Environment: TORCH_WHEEL (default: the local CPU wheel under /opt/wheels, copied into the build
# context, never into the repository), PIP_CA (default: /etc/ssl/certs/ca-certificates.crt, the CA
# bundle pip needs behind this machine's TLS interception), PYTHON (a Python 3.11 to run moto and
# boto3 from; default: the project's .venv), KEEP_WORKDIR=1 to keep the temporary folder.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
PIP_CA="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}"
IMAGE=localhost/sitsflow:ci-cpu
BASE_IMAGE=localhost/debian-python:bookworm
START=$(date +%s)

log() { printf '[image.sh %4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (dockerd and debootstrap need it)"

WORK="$(mktemp -d /tmp/sitsflow-image.XXXXXX)"
DOCKERD_PID=""
MOTO_PID=""
DOCKER=/usr/bin/docker  # Debian's client, matching its dockerd

cleanup() {
  local status=$?
  set +e
  if [ -n "$MOTO_PID" ]; then kill "$MOTO_PID" 2>/dev/null; wait "$MOTO_PID" 2>/dev/null; fi
  if [ -S "$WORK/docker.sock" ]; then "$DOCKER" rm -f sitsflow-ci >/dev/null 2>&1; fi
  if [ -f "$WORK/dockerd.pid" ]; then
    DOCKERD_PID="$(cat "$WORK/dockerd.pid")"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then kill -9 "$DOCKERD_PID"; fi
  # dockerd leaves its network namespace (and, on failure, layer mounts) behind.
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt"; done
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then log "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  log "done (exit $status)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. tools --------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
   || [ ! -x /usr/bin/docker ]; then
  log "installing docker.io and debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null \
    || die "apt-get install docker.io debootstrap"
fi
[ -f "$TORCH_WHEEL" ] || die "torch wheel $TORCH_WHEEL not found (set TORCH_WHEEL)"
[ -f "$PIP_CA" ] || die "CA bundle $PIP_CA not found (set PIP_CA)"

PY="${PYTHON:-$REPO/.venv/bin/python}"
if ! "$PY" -c 'import boto3, moto.server' 2>/dev/null; then
  log "creating a small venv with moto[server] and boto3"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "moto[server]>=5" boto3 || die "pip install moto[server] boto3"
  PY="$WORK/venv/bin/python"
fi

# -- 2. base image root: Debian bookworm with Python 3.11 --------------------------------------
log "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*

# -- 3. a private Docker engine ----------------------------------------------------------------
log "starting dockerd"
dockerd --storage-driver vfs --iptables=false --ip-masq=false --bridge=none \
  --data-root "$WORK/root" --exec-root "$WORK/exec" -H "unix://$WORK/docker.sock" \
  --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$WORK/docker.sock"
for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
"$DOCKER" info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not start"; }

tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null || die "docker import"
rm -rf "$WORK/rootfs"

# -- 4. build context: the files the image needs, plus build-extra/ (wheel, CA bundle) ---------
CTX="$WORK/context"
mkdir -p "$CTX/build-extra"
cp "$REPO/Dockerfile" "$REPO/.dockerignore" "$REPO/pyproject.toml" "$CTX/"
if [ -f "$REPO/README.md" ]; then cp "$REPO/README.md" "$CTX/"; else echo "# sitsflow" >"$CTX/README.md"; fi
tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' -c services | tar -C "$CTX" -x
cp "$TORCH_WHEEL" "$CTX/build-extra/"
cp "$PIP_CA" "$CTX/build-extra/ca.crt"

log "docker build --target cpu"
DOCKER_BUILDKIT=0 "$DOCKER" build --network host --target cpu \
  --build-arg BASE="$BASE_IMAGE" \
  --build-arg TORCH_SPEC="/tmp/extra/$(basename "$TORCH_WHEEL")" \
  --build-arg TORCH_INDEX=https://pypi.org/simple \
  --build-arg PIP_CERT=/tmp/extra/ca.crt \
  --build-arg REVISION="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)" \
  -t "$IMAGE" "$CTX" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; die "docker build"; }
rm -rf "$CTX"
log "built $IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# -- 5. the image's contract: entrypoint, non-root user, no secrets in its environment ---------
# (Every container costs a full copy of the image with the vfs driver: few containers are run.)
"$DOCKER" run --rm --network none "$IMAGE" --help >/dev/null || die "sitsflow --help in the image"
CONFIG_USER="$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")"
case "${CONFIG_USER%%:*}" in ""|0|root) die "the image runs as root (USER '$CONFIG_USER')";; esac
if "$DOCKER" image inspect -f '{{join .Config.Env "\n"}}' "$IMAGE" | grep -E '^AWS_|SECRET|TOKEN'; then
  die "the image's environment holds credentials"
fi

# -- 6. stages in the image against S3 on loopback --------------------------------------------
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m moto.server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID=ci AWS_SECRET_ACCESS_KEY=ci \
  AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 1 50); do
  "$PY" -c "import urllib.request; urllib.request.urlopen('$AWS_ENDPOINT_URL')" 2>/dev/null && break
  sleep 0.2
done

log "uploading the Slovenia example to s3://sitsflow-ci/ on 127.0.0.1:$PORT"
"$PY" - "$REPO/examples/slovenia" <<'PY' || die "upload to moto"
import pathlib, sys
import boto3
root = pathlib.Path(sys.argv[1])
s3 = boto3.client("s3")
s3.create_bucket(Bucket="sitsflow-ci")
for path in [root / "config.cfg", root / "nomenclature.txt", root / "colors.txt",
             *sorted((root / "data").iterdir())]:
    s3.upload_file(str(path), "sitsflow-ci", f"example/{path.relative_to(root)}")
PY

# One container, started once, runs every stage (docker exec): same image, user and environment.
"$DOCKER" run -d --name sitsflow-ci --network host -e AWS_ENDPOINT_URL -e AWS_ACCESS_KEY_ID \
  -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION --entrypoint sleep "$IMAGE" infinity >/dev/null \
  || die "starting the stage container"
RUNTIME_UID="$("$DOCKER" exec sitsflow-ci id -u)"
[ "$RUNTIME_UID" = 10001 ] || die "stages run as uid $RUNTIME_UID, expected 10001 (non-root)"
stage() {  # run one `sitsflow ...` in the image; its stdout is the stage's result
  "$DOCKER" exec sitsflow-ci sitsflow "$@"
}

log "stage: prepare"
PREPARED="$(stage prepare --config s3://sitsflow-ci/example/config.cfg \
  --overrides '["chain.output_path=s3://sitsflow-ci/run", "arg_train.deep_learning_parameters.epochs=2"]')" \
  || die "sitsflow prepare in the image"
CONFIG="$(printf '%s' "$PREPARED" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["config"])')" \
  || die "prepare printed no JSON with a config URI: $PREPARED"
[ "$CONFIG" = s3://sitsflow-ci/run/config/resolved.cfg ] || die "unexpected resolved config $CONFIG"
log "stage: sample"
stage sample --config "$CONFIG" >/dev/null || die "sitsflow sample in the image"
log "stage: plan training"
PLAN="$(stage plan training --config "$CONFIG")" || die "sitsflow plan training in the image"
# the plan is stored in the bucket; its summary says how many shards the fan-out runs
SHARDS="$(printf '%s' "$PLAN" | "$PY" -c 'import json, sys; print(int(json.load(sys.stdin)["shards"]))')" \
  || die "plan training printed no summary with a shard count: $PLAN"
[ "$SHARDS" -ge 1 ] || die "plan training made no shard: $PLAN"
log "stage: train --shard 0 (of $SHARDS), as the WorkflowTemplate's fan-out runs it"
stage train --config "$CONFIG" --shard 0 >/dev/null || die "sitsflow train --shard 0 in the image"

"$PY" - <<'PY' || die "outputs missing from the bucket"
import boto3
keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="sitsflow-ci", Prefix="run/")
        .get("Contents", [])}
expected = ["run/config/resolved.cfg", "run/learningSamples/Samples_region_1_seed0_learn.nc",
            "run/plans/training.json", "run/model/model_1_seed_0_hyp_0.txt"]
missing = [k for k in expected if k not in keys]
assert not missing, f"missing {missing}; found {sorted(keys)}"
print(f"{len(keys)} objects under s3://sitsflow-ci/run/")
PY
log "OK: image built and stages ran against S3 (total $(($(date +%s) - START)) s)"
