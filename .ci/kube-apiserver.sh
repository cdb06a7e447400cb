#!/usr/bin/env bash
# Builds the two programs the tests' real Kubernetes API server needs (tests/kube.py starts them):
#   $SITSFLOW_KUBE_DIR/bin/apiextensions-apiserver   k8s.io/apiextensions-apiserver, built from
#                                                    Debian sid's Go source packages (no Go proxy)
#   $SITSFLOW_KUBE_DIR/bin/etcd                      Debian sid's etcd-server
# SITSFLOW_KUBE_DIR defaults to ~/.cache/sitsflow-kube; cache that directory in CI. When both
# programs are there already the script only prints the directory (fast path). Prints the bin
# directory on stdout; progress goes to stderr.
# apt runs with a private sources list, state and cache under the directory: nothing changes
# system-wide. The first build takes about 7 minutes on 2 cores and 1.5 GB of memory; the
# 2.2 GB source tree is removed afterwards unless SITSFLOW_KUBE_KEEP=1.
set -euo pipefail
DIR="${SITSFLOW_KUBE_DIR:-$HOME/.cache/sitsflow-kube}"
BIN="$DIR/bin"
if [ -x "$BIN/apiextensions-apiserver" ] && [ -x "$BIN/etcd" ]; then
    echo "$BIN"
    exit 0
fi
log() { echo "kube-apiserver.sh: $*" >&2; }
GO=golang-1.26
MIRROR="${SITSFLOW_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
APT="$DIR/apt"
ROOT="$DIR/root"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs" "$BIN"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main" \
    > "$APT/sources.list"
opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
      -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
log "apt index of sid from $MIRROR"
apt-get -q "${opts[@]}" update >&2
pkgs=$(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev \
        | grep -E '^golang-.*-dev$' | sort -u)
pkgs="$pkgs $GO-go $GO-src etcd-server"
log "downloading $(echo "$pkgs" | wc -w) packages"
(cd "$APT/debs" && apt-get -q "${opts[@]}" download $pkgs >&2)
rm -rf "$ROOT"
mkdir -p "$ROOT"
log "unpacking"
for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
log "building k8s.io/apiextensions-apiserver (several minutes)"
(
    export PATH="$ROOT/usr/lib/go-1.26/bin:$PATH" GO111MODULE=off GOPATH="$ROOT/usr/share/gocode" \
           GOTOOLCHAIN=local GOCACHE="$DIR/go-cache" GOFLAGS=-trimpath
    go build -o "$BIN/apiextensions-apiserver.tmp" k8s.io/apiextensions-apiserver
)
cp "$ROOT/usr/bin/etcd" "$BIN/etcd.tmp"
mv "$BIN/etcd.tmp" "$BIN/etcd"
mv "$BIN/apiextensions-apiserver.tmp" "$BIN/apiextensions-apiserver"
if [ "${SITSFLOW_KUBE_KEEP:-0}" != 1 ]; then
    rm -rf "$ROOT" "$APT" "$DIR/go-cache"
fi
log "built in $BIN"
echo "$BIN"
