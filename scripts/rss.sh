#!/usr/bin/env bash
# Memory given back: the relay's RSS at start, with many idle sessions, after
# they left, and after a large history was unloaded (README, "Memory"). One
# relay on one core; the load generator on another.
#
#   scripts/rss.sh                      the release build as it is
#   scripts/rss.sh --bin PATH           another relay binary (e.g. one built
#                                       with --no-default-features: glibc malloc)
#   scripts/rss.sh --connections 5000,15000 --history-mb 600
#
# Prints one line per phase and writes target/bench/rss-LABEL.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=target/release/docrelay
LOAD=target/release/docrelay-load
CONNECTIONS=5000,15000
HISTORY_MB=600
LABEL=
RELAY_CPU=0
LOAD_CPU=1
while [ $# -gt 0 ]; do
    case $1 in
        --bin) BIN=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --history-mb) HISTORY_MB=$2; shift 2 ;;
        --label) LABEL=$2; shift 2 ;;
        --relay-cpu) RELAY_CPU=$2; shift 2 ;;
        --load-cpu) LOAD_CPU=$2; shift 2 ;;
        -h|--help) sed -n 2,12p "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
LABEL=${LABEL:-$(basename "$BIN")}
[ -x "$BIN" ] && [ -x "$LOAD" ] || cargo build --release -p docrelay -p docrelay-bench
ulimit -n "$(ulimit -H -n)" 2>/dev/null || true

OUT=target/bench
mkdir -p "$OUT"
TMP=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

# Small unload delay so that an emptied document is freed within the run.
cat > "$TMP/docrelay.toml" <<CONF
[limits]
max_connections = 19000
[documents]
idle_unload_ms = 1000
history_ops = 10000
CONF
NO_COLOR=1 RUST_LOG=${RUST_LOG:-warn,docrelay::runtime=info} taskset -c "$RELAY_CPU" "$BIN" serve --config "$TMP/docrelay.toml" \
    --listen 127.0.0.1:0 --cores "$RELAY_CPU" 2> "$TMP/relay.log" &
PID=$!
ADDR=
for _ in $(seq 100); do
    ADDR=$(grep -o 'listening on [0-9.:]*' "$TMP/relay.log" | head -1 | awk '{print $3}') || true
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$TMP/relay.log" >&2; echo "relay did not start" >&2; exit 1; }

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$PID/status"; }
settle() { sleep 3; rss; }
phases=()
note() { # name kib
    printf '%-34s %8d KiB\n' "$1" "$2"
    phases+=("\"$1\":$2")
}
note "start" "$(settle)"
for n in ${CONNECTIONS//,/ }; do
    taskset -c "$LOAD_CPU" "$LOAD" --mode idle --addr "$ADDR" --connections "$n" --relay-pid "$PID" \
        --doc-prefix "idle$n" --label "idle-$n" | sed 's/^/  /'
    note "after $n sessions left" "$(settle)"
done
# A history of about HISTORY_MB over documents of 10,000 operations of 1 KB
# (documents.history_ops), then the senders leave and the documents are
# unloaded.
docs=$(( (HISTORY_MB + 10) / 11 ))
taskset -c "$LOAD_CPU" "$LOAD" --addr "$ADDR" --docs "$docs" --subs 0 --senders 1 --payload 1000 \
    --window 8 --duration 20 --warmup 0 --doc-prefix history > "$TMP/history.out" 2>&1 || true
note "history of ~${HISTORY_MB} MB held" "$(rss)"
note "after the history was unloaded" "$(settle)"
grep -q "panicked" "$TMP/relay.log" && { echo "the relay panicked:" >&2; cat "$TMP/relay.log" >&2; exit 1; }
(IFS=,; echo "{\"label\":\"$LABEL\",${phases[*]}}") > "$OUT/rss-$LABEL.json"
cp "$TMP/relay.log" "$OUT/rss-$LABEL.log"
echo "wrote $OUT/rss-$LABEL.json (history: $docs documents; sender: $(tail -1 "$TMP/history.out" | tr -s ' ' | cut -c1-60))"
