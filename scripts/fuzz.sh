#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after another:
#   scripts/fuzz.sh [SECONDS] [TARGET...]        (default: 60 seconds, every target)
# Targets are fuzz/fuzz_targets/*.rs; their bodies and properties are in crates/fuzzing.
# What a run learns stays in fuzz/corpus/ (not kept in git). A crash is copied to
# fuzz/regressions/TARGET/, which `cargo test -p trellis-fuzzing` replays on every run of the
# suite, and the script fails. Needs cargo-fuzz (installed when missing) and a nightly
# toolchain for the address sanitizer; without nightly it runs without a sanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(config_load request_head jwt csr delta)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked --quiet cargo-fuzz
fi
fuzz=(cargo fuzz)
sanitizer=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  # Stable rustc accepts the instrumentation flags cargo-fuzz passes when told to.
  export RUSTC_BOOTSTRAP=1
  sanitizer=(--sanitizer none)
fi

status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "== fuzzing $t for ${secs}s"
  log="fuzz/artifacts/$t/last-run.log"
  if ! "${fuzz[@]}" run "${sanitizer[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee "$log" | grep -E '^(#[0-9]+.*DONE|Done|==[0-9]+==|stat::number_of_executed_units|SUMMARY|thread .* panicked)' ; then
    :
  fi
  if grep -qE 'SUMMARY|panicked|deadly signal|ERROR: libFuzzer' "$log"; then
    mkdir -p "fuzz/regressions/$t"
    for a in fuzz/artifacts/"$t"/crash-* fuzz/artifacts/"$t"/timeout-* fuzz/artifacts/"$t"/oom-*; do
      [ -e "$a" ] && cp "$a" "fuzz/regressions/$t/" && echo "   kept $a in fuzz/regressions/$t/"
    done
    echo "!! $t failed: see $log"
    status=1
  fi
done
exit $status
