#!/usr/bin/env bash
# Runs every test. Installs what the tests need first (Debian packages, Python packages,
# cargo-nextest, the Kubernetes test cluster built with Go), so it works on a fresh machine with
# only the toolchains (Rust, Go, Python, Node, gcc).
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
  # The tests run these programs themselves; their packages' system services (nginx on port 80,
  # prometheus on 9090, haproxy) must not start: policy-rc.d 101 tells Debian's maintainer
  # scripts not to start services during the install...
  local policy=/usr/sbin/policy-rc.d placed=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" && placed=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$placed" ] || $sudo rm -f "$policy"
  # ...and on a machine with systemd they are disabled and stopped, so none starts at boot.
  if [ -d /run/systemd/system ]; then
    for svc in nginx haproxy prometheus prometheus-node-exporter redis-server postgresql; do
      $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
  fi
}

# curl (HTTP/1.1 and HTTP/2 client in the protocol tests).
command -v curl >/dev/null || apt_install curl ca-certificates

# A real Prometheus scrapes a running mesh in the observability tests; HAProxy and nginx are
# the benchmark harness's peers and wrk its closed-loop tool (its quick run below proves it works). iptables: transparent
# capture in the Kubernetes tests' Pod network namespaces; openssl checks sidecar certificates.
apt_install prometheus haproxy nginx wrk iptables openssl

# Real TCP servers and clients through the mesh: Redis (redis-server, redis-cli, redis-benchmark)
# and PostgreSQL (postgres, psql, pgbench).
apt_install redis-server redis-tools postgresql

# The Kubernetes tests' control plane (etcd, kube-apiserver, kube-controller-manager, kubectl)
# and helm, built from their Go modules once and cached by version (~20 min the first time on
# 2 cores, nothing after).
log "test cluster binaries"
TRELLIS_TESTCLUSTER_BIN="$(scripts/testcluster.sh)"
export TRELLIS_TESTCLUSTER_BIN

# Python peers: grpcio (gRPC interop), the OpenTelemetry SDK and its OTLP exporters (tracing
# interop; the console's OTLP/gRPC and OTLP/HTTP receivers) and websockets (WebSocket through the
# proxies).
if ! python3 -c 'import grpc, websockets, opentelemetry.sdk, opentelemetry.propagators.b3, opentelemetry.exporter.otlp.proto.http, opentelemetry.exporter.otlp.proto.grpc' 2>/dev/null; then
  log "installing Python test peers"
  python3 -m pip install --quiet --disable-pip-version-check grpcio websockets opentelemetry-sdk \
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-grpc opentelemetry-propagator-b3
fi

# The console's browser tests: Debian's Chromium and Firefox ESR (the stock browser, over
# WebDriver BiDi), driven by playwright-core (pinned in crates/cli/tests/console/package-lock.json
# to a version whose BiDi commands Firefox ESR implements; npm caches it, so a second run
# downloads nothing).
apt_install chromium firefox-esr
if ! (cd crates/cli/tests/console && node -e '
  const locked = require("./package-lock.json").packages["node_modules/playwright-core"].version;
  process.exit(require("./node_modules/playwright-core/package.json").version === locked ? 0 : 1)' 2>/dev/null); then
  log "installing the console tests' browser driver (playwright-core)"
  npm ci --prefix crates/cli/tests/console --no-audit --no-fund --loglevel=error
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
trap 'rm -rf "$out"' EXIT
target/debug/bench --quick --out "$out" > "$out/table.md"
# The latency and saturation tables, each with its header row.
sed -n '/^### Latency/,/^### Resources/p' "$out/table.md" | sed '$d'

# Every fuzz target for a few seconds under libFuzzer (the seeds and every crash ever found are
# also replayed by the tests above); `scripts/fuzz.sh 1800` is the long run.
log "fuzz targets (10 s each)"
scripts/fuzz.sh 10

