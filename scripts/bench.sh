#!/usr/bin/env bash
# Runs the benchmarks: builds everything in release, installs the peers (HAProxy, nginx) if
# missing, and runs the harness. `--quick` runs a 1-minute subset.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in haproxy nginx; do
  command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --workspace --bins
exec target/release/bench "$@"
