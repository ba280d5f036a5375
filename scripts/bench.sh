#!/usr/bin/env bash
# Runs the benchmarks: builds everything in release, installs the peers (HAProxy, nginx) and the
# field's load tools (wrk from Debian, oha from crates.io) if missing, and runs the harness. `--quick` runs a 1-minute subset. With LINKERD2_PROXY_BIN set
# to a linkerd2-proxy binary you built, it is measured too (as root: the harness captures its
# traffic with iptables in a private network namespace, as linkerd-init does in a pod).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in haproxy nginx wrk; do
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
# oha: open-loop load at fixed rates with latency from each request's intended send time.
if ! command -v oha >/dev/null && [ ! -x "$HOME/.cargo/bin/oha" ]; then
  cargo install --locked --quiet oha
fi
cargo build --release --workspace --bins
exec target/release/bench "$@"
