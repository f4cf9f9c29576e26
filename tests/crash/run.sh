#!/usr/bin/env bash
# Crash under load, full run: the release broker is flooded by the release
# simulator and killed with SIGKILL at a random moment, CYCLES times (default
# 50); after every kill the store is opened offline and checked (SPEC
# invariants, every acknowledged device holds its code, one code per
# validity period). The test is tests/crash_load.rs; its CI variant runs 5
# cycles against the debug binaries inside `cargo test`.
#
#   tests/crash/run.sh [CYCLES]
#
# Writes target/reliability/crash.json (read by scripts/reliability.sh) and
# the per-cycle log target/reliability/crash.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
CYCLES="${1:-${CRASH_CYCLES:-50}}"
OUT=target/reliability
mkdir -p "$OUT"
cargo build --release -p activation-broker -p activation-simulator --bins
CRASH_CYCLES="$CYCLES" \
CRASH_DEVICES="${CRASH_DEVICES:-4000}" \
CRASH_RATE="${CRASH_RATE:-2000}" \
ACTIVATION_BROKER_BIN="$PWD/target/release/activation-broker" \
ACTIVATION_SIM_BIN="$PWD/target/release/activation-sim" \
CRASH_REPORT="$OUT/crash.json" \
    cargo test --test it -- crash_load:: --nocapture 2>&1 | tee "$OUT/crash.log"
test "${PIPESTATUS[0]}" -eq 0
echo "crash run: $(cat "$OUT/crash.json")"
