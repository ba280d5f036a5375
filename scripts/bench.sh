#!/usr/bin/env bash
# Runs the benchmarks: builds everything in release, installs the peers (HAProxy, nginx) if
# missing, and runs the harness. `--quick` runs a 1-minute subset. With LINKERD2_PROXY_BIN set
# to a linkerd2-proxy binary you built, it is measured too (as root: the harness captures its
# traffic with iptables in a private network namespace, as linkerd-init does in a pod).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in haproxy nginx; do
  command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || missing+=("$p")
done
if [ -n "${LINKERD2_PROXY_BIN:-}" ] && ! command -v iptables >/dev/null && [ ! -x /usr/sbin/iptables ]; then
  missing+=(iptables)
fi
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --workspace --bins
exec target/release/bench "$@"
