#!/usr/bin/env bash
# First activations per second on the ledger's stores, side by side in one
# run with the same client (activation-sim flood, MQTT 3.1.1, release
# build) and the same total concurrency:
#
#   sled, 1 node  |  etcd, 1 node  |  etcd, 2 nodes (the devices split
#   between them, half the concurrency against each)
#
# etcd: a 3-member cluster on loopback started here (--max-txn-ops 1024).
# For each run it also prints the ledger's own figures from /metrics: the
# mean time of one commit (for etcd: one transaction per batch) and the
# mean requests per batch.
#
#   scripts/bench-etcd.sh                    # 20000 devices, 200 in flight
#   DEVICES=50000 CONCURRENCY=400 scripts/bench-etcd.sh
#   KEEP=1 scripts/bench-etcd.sh             # keep the logs (path printed)
#   BASE_BIN=/path/to/older/activation-broker scripts/bench-etcd.sh
#       # also runs the 2-node row with that broker binary, in the same run
#       # (a baseline: e.g. a build from before a change to the etcd writer)
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-20000}
CONCURRENCY=${CONCURRENCY:-200}
ETCD=${ETCD:-/usr/bin/etcd}
export CARGO_INCREMENTAL=0

cargo build --release -q --bin activation-broker -p activation-broker
cargo build --release -q -p activation-simulator --bin activation-sim
BIN=target/release/activation-broker
SIM=target/release/activation-sim

WORK=$(mktemp -d /tmp/bench-etcd.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

PASSWORD=bench-password
HASH=$("$BIN" hash-password --password "$PASSWORD")

# --- etcd: 3 members ---------------------------------------------------------
CLIENT_URLS=()
INITIAL=""
declare -a PEERS
for i in 0 1 2; do
    CLIENT_URLS[$i]="http://127.0.0.1:$(free_port)"
    PEERS[$i]="http://127.0.0.1:$(free_port)"
    INITIAL+="${INITIAL:+,}m$i=${PEERS[$i]}"
done
for i in 0 1 2; do
    "$ETCD" --name "m$i" --data-dir "$WORK/etcd-m$i" \
        --listen-client-urls "${CLIENT_URLS[$i]}" --advertise-client-urls "${CLIENT_URLS[$i]}" \
        --listen-peer-urls "${PEERS[$i]}" --initial-advertise-peer-urls "${PEERS[$i]}" \
        --initial-cluster "$INITIAL" --initial-cluster-state new \
        --initial-cluster-token bench --max-txn-ops 1024 \
        >"$WORK/etcd-m$i.log" 2>&1 &
    PIDS+=($!)
done
ENDPOINTS=$(IFS=,; echo "${CLIENT_URLS[*]}")
for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" endpoint health >/dev/null 2>&1 && break
    sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" endpoint health >/dev/null 2>&1

# --- brokers -----------------------------------------------------------------
# start_broker NAME STORE PREFIX -> sets DEV_PORT ADMIN_PORT HTTP_PORT, PID
start_broker() {
    local name=$1 store=$2 prefix=$3
    DEV_PORT=$(free_port); ADMIN_PORT=$(free_port); HTTP_PORT=$(free_port)
    local eps
    eps=$(printf '"%s",' "${CLIENT_URLS[@]}"); eps=${eps%,}
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/broker.toml" <<EOF
[devices]
bind = "127.0.0.1:$DEV_PORT"
max_pending_per_source = 0
[accounts_listener]
bind = "127.0.0.1:$ADMIN_PORT"
[http]
bind = "127.0.0.1:$HTTP_PORT"
[gate]
source_rate = 0.0
device_rate = 0.0
ban_after_failures = 0
[ledger]
store = "$store"
[ledger.etcd]
endpoints = [$eps]
node = "$name"
prefix = "$prefix"
[[accounts]]
name = "admin"
password_hash = "$HASH"
role = "admin"
EOF
    RUST_LOG=warn "${BROKER:-$BIN}" serve --config "$WORK/$name/broker.toml" --data "$WORK/$name/data" \
        >"$WORK/$name/log" 2>&1 &
    PID=$!
    PIDS+=($PID)
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$DEV_PORT") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "broker $name did not start:" >&2
    cat "$WORK/$name/log" >&2
    exit 1
}

# metric NAME_SUFFIX HTTP_PORT -> the value of activation_ledger_<suffix>
metric() {
    curl -s "http://127.0.0.1:$2/metrics" | awk -v m="activation_ledger_$1" '$1 == m { print $2 }'
}

# flood PORT SECRET FIRST COUNT INFLIGHT OUT.json
flood() {
    "$SIM" flood --host 127.0.0.1 --port "$1" --protocol 4 --product-key bench \
        --product-secret "$2" --start "$3" --devices "$4" --prefix dev- \
        --rate 0 --concurrency "$5" --hold 0 --quiet --json "$6" >/dev/null
}

# setup ADMIN_PORT -> the product secret
setup() {
    "$SIM" setup --port "$1" --password "$PASSWORD" --product-key bench \
        --codes "$DEVICES" --devices "$DEVICES" | awk '/^product secret:/ { print $3 }'
}

accepted() { python3 -c 'import json,sys; print(sum(json.load(open(f))["accepted"] for f in sys.argv[1:]))' "$@"; }
# not_accepted FILE... -> what the others got
not_accepted() {
    python3 -c '
import json, sys
from collections import Counter
c = Counter()
for f in sys.argv[1:]:
    r = json.load(open(f))
    for k, v in r["refused"].items(): c["refused " + k] += v
    c["timeouts"] += r["timeouts"]; c["errors"] += r["errors"]
print(", ".join(f"{k} {v}" for k, v in sorted(c.items()) if v) or "-")' "$@"
}

# commit_stats PORT... -> "mean commit ms, mean batch" over the given nodes
commit_stats() {
    local s=0 c=0 bs=0 bc=0 k=0 r=0 p v
    for p in "$@"; do
        s=$(python3 -c "print($s + $(metric commit_seconds_sum "$p"))")
        c=$(python3 -c "print($c + $(metric commit_seconds_count "$p"))")
        bs=$(python3 -c "print($bs + $(metric batch_size_sum "$p"))")
        bc=$(python3 -c "print($bc + $(metric batch_size_count "$p"))")
        v=$(metric commit_conflicts_total "$p")
        k=$(python3 -c "print($k + ${v:-0})")
        v=$(metric replica_reloads_total "$p")
        # A broker from before the counter existed: not counted.
        if [ -z "$v" ]; then r=-1; elif [ "$r" != -1 ]; then r=$(python3 -c "print($r + $v)"); fi
    done
    python3 -c "print(f'{1000*$s/max($c,1):.2f} ms per commit, {$bs/max($bc,1):.1f} requests per batch, {int($c)} commits, {int($k)} refused as stale, ' + ('full reloads not counted' if $r < 0 else f'{int($r)} full reloads'))"
}

now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/($3-$2):.0f}')"; }

echo "# First activations: sled vs etcd (1 and 2 nodes)"
echo "settings: $DEVICES devices (one first activation each, MQTT 3.1.1, hold 0), $CONCURRENCY in flight in total,"
echo "          release build, rate limits off, etcd $("$ETCD" --version | head -1 | awk '{print $3}') x3 members on loopback (--max-txn-ops 1024),"
echo "          $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "${BASE_BIN:-}" ] && echo "baseline (base): $BASE_BIN"
echo
printf '| %-14s | %10s | %12s | %-60s | %s |\n' "store, nodes" "accepted" "activations/s" "ledger commits" "not accepted"
printf '|%s|%s|%s|%s|%s|\n' "----------------" "------------" "--------------" "--------------------------------------------------------------" "---"

# sled, 1 node
start_broker sled1 sled unused/; P1=$PID; D1=$DEV_PORT; A1=$ADMIN_PORT; H1=$HTTP_PORT
SECRET=$(setup "$A1")
t0=$(now); flood "$D1" "$SECRET" 1 "$DEVICES" "$CONCURRENCY" "$WORK/sled1.json"; t1=$(now)
n=$(accepted "$WORK/sled1.json")
printf '| %-14s | %10s | %12s | %-60s | %s |\n' "sled, 1" "$n" "$(rate "$n" "$t0" "$t1")" "$(commit_stats "$H1")" "$(not_accepted "$WORK/sled1.json")"
kill "$P1"; wait "$P1" 2>/dev/null || true

# etcd, 1 node
start_broker e1 etcd run1/; P1=$PID; D1=$DEV_PORT; A1=$ADMIN_PORT; H1=$HTTP_PORT
SECRET=$(setup "$A1")
t0=$(now); flood "$D1" "$SECRET" 1 "$DEVICES" "$CONCURRENCY" "$WORK/etcd1.json"; t1=$(now)
n=$(accepted "$WORK/etcd1.json")
printf '| %-14s | %10s | %12s | %-60s | %s |\n' "etcd, 1" "$n" "$(rate "$n" "$t0" "$t1")" "$(commit_stats "$H1")" "$(not_accepted "$WORK/etcd1.json")"
kill "$P1"; wait "$P1" 2>/dev/null || true

# etcd, 2 nodes: half the devices and half the concurrency against each
# two_nodes LABEL PREFIX (the broker binary: $BROKER, else $BIN)
two_nodes() {
    start_broker e2a etcd "$2/"; PA=$PID; DA=$DEV_PORT; AA=$ADMIN_PORT; HA=$HTTP_PORT
    start_broker e2b etcd "$2/"; PB=$PID; DB=$DEV_PORT; HB=$HTTP_PORT
    SECRET=$(setup "$AA")
    half=$((DEVICES / 2))
    t0=$(now)
    flood "$DA" "$SECRET" 1 "$half" $((CONCURRENCY / 2)) "$WORK/$2a.json" &
    FA=$!
    flood "$DB" "$SECRET" $((half + 1)) $((DEVICES - half)) $((CONCURRENCY / 2)) "$WORK/$2b.json" &
    FB=$!
    wait "$FA" "$FB"
    t1=$(now)
    n=$(accepted "$WORK/$2a.json" "$WORK/$2b.json")
    printf '| %-14s | %10s | %12s | %-60s | %s |\n' "$1" "$n" "$(rate "$n" "$t0" "$t1")" "$(commit_stats "$HA" "$HB")" "$(not_accepted "$WORK/$2a.json" "$WORK/$2b.json")"
    kill "$PA" "$PB"; wait "$PA" "$PB" 2>/dev/null || true
}
two_nodes "etcd, 2" run2
if [ -n "${BASE_BIN:-}" ]; then
    BROKER=$BASE_BIN two_nodes "etcd, 2 (base)" run3
fi
