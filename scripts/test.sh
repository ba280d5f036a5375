#!/usr/bin/env bash
# Runs every test. Installs what the tests need first (Debian packages, Python packages,
# cargo-nextest), so it works on a fresh machine with only Rust, Python, Node and gcc.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# curl (HTTP/1.1 and HTTP/2 client in the protocol tests).
command -v curl >/dev/null || apt_install curl ca-certificates

# A real Prometheus scrapes a running mesh in the observability tests; HAProxy and nginx are
# the benchmark harness's peers (its quick run below proves it works).
apt_install prometheus haproxy nginx

# Python peers: grpcio (gRPC interop) and the OpenTelemetry SDK (tracing interop).
if ! python3 -c 'import grpc, opentelemetry.sdk, opentelemetry.propagators.b3, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
  log "installing Python test peers"
  python3 -m pip install --quiet --disable-pip-version-check grpcio opentelemetry-sdk \
    opentelemetry-exporter-otlp-proto-http opentelemetry-propagator-b3
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked --quiet cargo-nextest
fi

# One build for everything: the binaries the end-to-end tests run (trellis, trellis-demo),
# then the tests themselves, sharing the same artifacts.
log "building"
cargo build --workspace --bins
log "testing"
cargo nextest run --workspace --profile ci "$@"

# The benchmark harness, in its 1-minute quick mode, to prove it runs (figures from a debug
# build mean nothing; CI never fails on a figure, only on the harness failing).
log "benchmark harness (quick)"
out=$(mktemp -d)
target/debug/bench --quick --out "$out" > "$out/table.md"
tail -n 20 "$out/table.md"
