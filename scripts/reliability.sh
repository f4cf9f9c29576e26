#!/usr/bin/env bash
# Runs the whole reliability and security suite at full size and rewrites
# RELIABILITY.md from the measured numbers.
#
#   scripts/reliability.sh            # everything (about 50 minutes on 2 cores)
#   FUZZ_SECS=60 CRASH_CYCLES=10 POWER_LOSS_CYCLES=5 scripts/reliability.sh   # a quicker pass
#   SKIP_CRASH=1 scripts/reliability.sh   # keep the last tests/crash/run.sh results
#   SKIP_FUZZ=1 scripts/reliability.sh    # keep the last fuzz results
#   SKIP_POWER_LOSS=1 scripts/reliability.sh   # keep the last power-loss results
#   scripts/reliability.sh --table    # only rewrite RELIABILITY.md from the last results
#
# Results land in target/reliability/ (one file per step); RELIABILITY.md is
# generated from them. Every "measured" cell is what the test printed on its
# RELIABILITY lines. Fuzz rows with no results in target/reliability/ are
# carried over from the previous RELIABILITY.md, marked with that run's date.
# The power-loss step needs /dev/fuse and LazyFS (scripts/lazyfs-bin).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=target/reliability
mkdir -p "$OUT"
FUZZ_SECS="${FUZZ_SECS:-600}"
CRASH_CYCLES="${CRASH_CYCLES:-50}"
POWER_LOSS_CYCLES="${POWER_LOSS_CYCLES:-20}"
ONLY_TABLE=0
[ "${1:-}" = "--table" ] && ONLY_TABLE=1

# suite | test | what
TESTS=$(cat <<'LIST'
races_wire|two_thousand_devices_racing_for_500_codes_get_exactly_500|Race over the wire: 2,000 devices connect at once for 500 codes
races_wire|fifty_connections_of_one_device_consume_one_code|Race over the wire: 50 connections of one device at once
races_wire|assignments_racing_with_connects_never_over_assign|Race over the wire: assignments in chunks racing with connects
hostile|a_silent_socket_is_closed_by_the_connect_timeout|Hostile: no CONNECT within the timeout
hostile|a_connect_trickled_one_byte_per_second_is_closed_by_the_connect_timeout|Hostile: CONNECT trickled one byte per second (timeout 2 s)
hostile|oversized_and_malformed_remaining_lengths_are_closed|Hostile: oversized / malformed remaining length, 2 KiB PUBLISH over a 1 KiB limit
hostile|invalid_utf8_in_client_id_or_user_name_is_refused_or_closed|Hostile: invalid UTF-8 and NUL in client id / user name (v4, v5)
hostile|protocol_levels_other_than_4_and_5_get_connack_0x01|Hostile: protocol levels 3 (MQIsdp, MQTT), 6, 0, 255
hostile|a_second_connect_is_a_protocol_error_and_consumes_nothing|Hostile: a second CONNECT carrying another device's credentials
hostile|packets_before_connect_are_closed|Hostile: PUBLISH, SUBSCRIBE, PINGREQ, DISCONNECT, CONNACK, HTTP before CONNECT
hostile|fifteen_thousand_idle_sockets_do_not_stop_the_broker|Hostile: 15,000 idle sockets against the broker binary, then past its fd limit
security|ten_thousand_forged_stale_future_and_replayed_connects_consume_nothing|Security: 10,000 bad-credential connects over the wire
security|device_secret_products_refuse_unregistered_and_product_signed_devices|Security: device-secret product, unregistered / product-signed devices
security|a_device_cannot_write_into_or_read_from_other_namespaces_live_or_retained|Security: other namespaces, admin/#, $SYS/# (live and retained)
security|a_recycled_router_slot_does_not_inherit_another_devices_subscription|Security: recycled router connection slots (5 rounds)
ledger_store|the_data_directory_and_every_file_in_it_are_private|Security: modes of the data directory and every file in it after a broker run
power_loss|a_failing_disk_refuses_the_activation_and_stops_the_broker|Power loss: LazyFS killed under the running broker (every file operation fails)
LIST
)

run_tests() {
    cargo build --tests -q 2>/dev/null || cargo build --tests
    while IFS='|' read -r suite name what; do
        [ -z "$suite" ] && continue
        local log="$OUT/test-$name.log" start end
        start=$(date +%s.%N)
        cargo test -q --test it -- --exact "$suite::$name" --nocapture >"$log" 2>&1
        local rc=$?
        end=$(date +%s.%N)
        printf '%s\t%s\t%.1f\n' "$name" "$([ $rc -eq 0 ] && echo pass || echo FAIL)" \
            "$(awk "BEGIN{print $end - $start}")" >"$OUT/test-$name.result"
        echo "$(cat "$OUT/test-$name.result")"
    done <<<"$TESTS"
}

run_fuzz() {
    if [ "${SKIP_FUZZ:-0}" = 1 ]; then
        echo "fuzz: kept the last run's results"
        return
    fi
    cargo test --release --test it --no-run
    for t in connect packets admin; do
        FUZZ_SECS="$FUZZ_SECS" FUZZ_SAVE=1 FUZZ_REPORT="$OUT/fuzz-$t.json" \
            cargo test --release --test it -- --ignored --exact "fuzz::fuzz_$t" --nocapture \
            >"$OUT/fuzz-$t.log" 2>&1
        echo "fuzz $t: $?  $(cat "$OUT/fuzz-$t.json" 2>/dev/null)"
    done
    cargo test --test it -- --exact fuzz::corpus_replays_cleanly --nocapture >"$OUT/fuzz-replay.log" 2>&1
    echo "corpus replay: $?"
}

run_power_loss() {
    if [ "${SKIP_POWER_LOSS:-0}" = 1 ]; then
        echo "power loss: kept the last run's results ($(cat "$OUT/power-loss.json" 2>/dev/null))"
        return
    fi
    local lazyfs
    lazyfs=$(scripts/lazyfs-bin)
    cargo build --release -p activation-broker -p activation-simulator --bins
    rm -f "$OUT/power-loss.json"
    LAZYFS_BIN="$lazyfs" \
    POWER_LOSS_CYCLES="$POWER_LOSS_CYCLES" \
    POWER_LOSS_DEVICES="${POWER_LOSS_DEVICES:-4000}" \
    POWER_LOSS_RATE="${POWER_LOSS_RATE:-2000}" \
    ACTIVATION_BROKER_BIN="$PWD/target/release/activation-broker" \
    ACTIVATION_SIM_BIN="$PWD/target/release/activation-sim" \
    POWER_LOSS_REPORT="$OUT/power-loss.json" \
        cargo test --test it -- --exact power_loss::power_loss_keeps_every_acknowledged_activation \
        --nocapture >"$OUT/power-loss.log" 2>&1
    echo "power loss: $? $(cat "$OUT/power-loss.json" 2>/dev/null)"
}

json() { # json FILE KEY
    sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" "$1" 2>/dev/null | head -1
}

table() {
    local md=RELIABILITY.md
    # Fuzz rows of the previous table, for targets not rerun.
    local prev_date prev_fuzz
    prev_date=$(sed -n 's/^(\([0-9-]* [0-9:]* UTC\),.*/\1/p' "$md" 2>/dev/null | head -1)
    prev_fuzz=$(grep '^| Fuzz |' "$md" 2>/dev/null || true)
    {
        echo "# Reliability and security suite"
        echo
        echo "Generated by \`scripts/reliability.sh\` from the results in \`target/reliability/\`"
        echo "($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -sr)). Do not edit by hand."
        echo
        echo "| area | what was tried | measured | duration | result |"
        echo "|---|---|---|---:|---|"
        while IFS='|' read -r suite name what; do
            [ -z "$suite" ] && continue
            local r="$OUT/test-$name.result" log="$OUT/test-$name.log"
            [ -f "$r" ] || continue
            local res dur detail
            res=$(cut -f2 "$r"); dur=$(cut -f3 "$r")
            detail=$(grep -h '^RELIABILITY: ' "$log" 2>/dev/null | sed 's/^RELIABILITY: //' | paste -sd ';' - | sed 's/;\([^ ]\)/; \1/g; s/|/\\|/g')
            [ -z "$detail" ] && detail="(the test printed no RELIABILITY line)"
            echo "| ${what%%:*} | ${what#*: } | $detail | ${dur} s | $res |"
        done <<<"$TESTS"
        local p="$OUT/power-loss.json" pl="$OUT/power-loss.log"
        if [ -f "$pl" ]; then
            local detail res=FAIL
            grep -q 'test result: ok' "$pl" && res=pass
            detail=$(grep -h '^RELIABILITY: ' "$pl" | sed 's/^RELIABILITY: //' | paste -sd ';' - | sed 's/;\([^ ]\)/; \1/g; s/|/\\|/g')
            # A failed run has no summary: show where it failed.
            [ -z "$detail" ] && detail=$(grep -h -A1 'panicked at' "$pl" | tail -n 1 | sed 's/|/\\|/g')
            echo "| Power loss | the broker binary with its data directory on LazyFS under an \`activation-sim\` flood ($(json "$p" devices_per_cycle) devices/cycle at $(json "$p" rate)/s, half of them reconnects): SIGSTOP, \`lazyfs::clear-cache\` (every byte not fsynced is dropped), kill -9, remount, offline check, restart, reconnect every device acknowledged in the cycle and $(json "$p" older_sample) older ones | $detail | $(json "$p" seconds) s | $res |"
        fi
        for t in connect packets admin; do
            local f="$OUT/fuzz-$t.json"
            if [ ! -f "$f" ]; then
                grep -F "| Fuzz | target \`$t\`" <<<"$prev_fuzz" | head -1 |
                    sed "/(not rerun: /!s/^| Fuzz | \([^|]*\)|/| Fuzz | \1(not rerun: the run of ${prev_date:-an earlier date}) |/"
                continue
            fi
            local res=pass
            [ "$(json "$f" failures)" != 0 ] || [ "$(json "$f" unexpected_panics)" != 0 ] && res=FAIL
            echo "| Fuzz | target \`$t\` ($(json "$f" profile), $(json "$f" workers) workers, seed $(json "$f" seed)) | $(json "$f" cases) inputs, $(json "$f" answer_kinds) kinds of answer, $(json "$f" failures) hangs/failures, $(json "$f" unexpected_panics) panics ($(json "$f" caught_decoder_panics) caught decoder panics), corpus $(json "$f" corpus_files) files | $(json "$f" seconds) s | $res |"
        done
        if [ ! -f "$OUT/fuzz-replay.log" ]; then
            grep -F '| Fuzz | corpus replay' <<<"$prev_fuzz" | head -1 |
                sed "/(not rerun: /!s/^| Fuzz | \([^|]*\)|/| Fuzz | \1(not rerun: the run of ${prev_date:-an earlier date}) |/"
        fi
        if [ -f "$OUT/fuzz-replay.log" ]; then
            local res=FAIL
            grep -q "test result: ok" "$OUT/fuzz-replay.log" && res=pass
            echo "| Fuzz | corpus replay (\`cargo test --test it fuzz::\`) | $(grep -h 'corpus files replayed' "$OUT/fuzz-replay.log" | paste -sd ';' - | sed 's/;/; /g') | | $res |"
        fi
        local c="$OUT/crash.json"
        if [ -f "$c" ]; then
            echo "| Crash | kill -9 of the broker binary under an \`activation-sim\` flood ($(json "$c" devices_per_cycle) devices/cycle at $(json "$c" rate)/s, half of them reconnects), restart, offline check | $(json "$c" cycles) cycles, $(json "$c" acknowledged) devices acknowledged (CONNACK 0), $(json "$c" consumed) codes consumed, kill $(json "$c" kill_ms_min)–$(json "$c" kill_ms_max) ms after the first CONNACK; invariants held, every acknowledged device kept its one code | $(json "$c" seconds) s | $(grep -q 'test result: ok' "$OUT/crash.log" 2>/dev/null && echo pass || echo FAIL) |"
        fi
        echo
        sed -n '/^<!-- notes -->$/,$p' scripts/reliability-notes.md
    } >"$md"
    echo "wrote $md"
}

if [ $ONLY_TABLE -eq 0 ]; then
    run_tests
    run_power_loss
    run_fuzz
    if [ "${SKIP_CRASH:-0}" = 1 ]; then
        echo "crash: kept the last run's results ($(cat "$OUT/crash.json" 2>/dev/null))"
    else
        CRASH_CYCLES="$CRASH_CYCLES" tests/crash/run.sh "$CRASH_CYCLES" >/dev/null 2>&1
        echo "crash: $? $(cat "$OUT/crash.json" 2>/dev/null)"
    fi
fi
table
