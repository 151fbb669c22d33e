#!/usr/bin/env bash
# Benchmarks three Yjs servers in the same run, on the same machine, with the same parameters:
# docrelay's /yjs route, the y-websocket reference server (@y/websocket-server) and Hocuspocus
# (@hocuspocus/server), each alone on one CPU, the load generator (bench/yjs/loadgen.js) on
# another. Prints one markdown table; every server's full result is JSON under target/bench/yjs/.
# Builds nothing: the relay is $DOCRELAY_BIN (default target/release/docrelay); the Node packages
# are bench/yjs/node_modules (`npm ci` there first if missing; package-lock.json pins them).
#
#   scripts/bench-yjs.sh                          all three servers, defaults (about 3 minutes)
#   scripts/bench-yjs.sh --servers docrelay,hocuspocus --docs 50 --providers 4
#   DOCRELAY_BIN=/tmp/docrelay-release scripts/bench-yjs.sh --quick
#
# Options (each also read from the environment variable in brackets):
#   --servers LIST      docrelay,docrelay-durable,y-websocket,hocuspocus (default: all four;
#                       docrelay-durable is docrelay with storage.dir: every update in the
#                       write-ahead log, fsync "batch", before it is passed on) [SERVERS]
#   --server-cpu N      CPU the server runs on (default 1); docrelay gets `cores = [N]` [SERVER_CPU]
#   --load-cpu N        CPU the load generator runs on (default 0) [LOAD_CPU]
#   --docs N            documents (rooms) typed in (default 20) [DOCS]
#   --providers K       providers per document, every one typing (default 5) [PROVIDERS]
#   --rate R            inserts/s per provider in the fixed-rate window (default 10) [RATE]
#   --window S          measured seconds of the fixed-rate window (default 5) [WINDOW]
#   --sweep-window S    measured seconds of each sweep step (default 3) [SWEEP_WINDOW]
#   --idle-conns N      idle connections for the RSS measurement (default 1000) [IDLE_CONNS]
#   --max-p99 MS        p99 bound of the sweep (default 50) [MAX_P99]
#   --quick             shorter windows, one bisection, no retries: a smoke test
#   Anything after `--` goes to loadgen.js as is (node bench/yjs/loadgen.js --help).
#
# What is measured, per server (bench/yjs/loadgen.js and fleet.js say how):
#   deliveries/s at p99 <= 50 ms   the sweep: the rate per provider doubles from 2 x --rate until a
#                                  step fails (delivery p99 over --max-p99, under 99% delivered
#                                  within 3 s, or the generator unable to send the rate), is
#                                  measured once more, then bisected twice; deliveries/s of the
#                                  best step that held (one delivery: one update reaching one of
#                                  the K - 1 other providers of its document)
#   p99 at fixed rate              delivery latency at --rate, from the send to the receiving
#                                  provider having read it (same clock, same thread)
#   server / generator CPU %       utime + stime from /proc/PID/stat over the measured seconds
#                                  (100% = one core)
#   RSS per connection             VmRSS of the server before and after --idle-conns more
#                                  providers connect (rooms of K, synced, one awareness state
#                                  each), divided by --idle-conns
#   lost deliveries, converged     every update must reach the K - 1 others; after each window
#                                  every provider applies what it received, and the K documents
#                                  of each room must hold the same text
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SERVERS=${SERVERS:-docrelay,docrelay-durable,y-websocket,hocuspocus}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
DOCS=${DOCS:-20}
PROVIDERS=${PROVIDERS:-5}
RATE=${RATE:-10}
WINDOW=${WINDOW:-5}
SWEEP_WINDOW=${SWEEP_WINDOW:-3}
IDLE_CONNS=${IDLE_CONNS:-1000}
MAX_P99=${MAX_P99:-50}
QUICK=0
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --servers) SERVERS=$2; shift 2 ;;
        --server-cpu) SERVER_CPU=$2; shift 2 ;;
        --load-cpu) LOAD_CPU=$2; shift 2 ;;
        --docs) DOCS=$2; shift 2 ;;
        --providers) PROVIDERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --sweep-window) SWEEP_WINDOW=$2; shift 2 ;;
        --idle-conns) IDLE_CONNS=$2; shift 2 ;;
        --max-p99) MAX_P99=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[bench-yjs] $*" >&2; }
DOCRELAY_BIN=${DOCRELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/docrelay}
PKG=bench/yjs
OUT=${CARGO_TARGET_DIR:-target}/bench/yjs
mkdir -p "$OUT"

command -v node >/dev/null || { log "node is not installed"; exit 1; }
command -v taskset >/dev/null || { log "taskset (util-linux) is not installed"; exit 1; }
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    log "node $(node -v) is too old: 20 or later"; exit 1
fi
if [ ! -d "$PKG/node_modules/yjs" ] || [ ! -d "$PKG/node_modules/@hocuspocus/server" ] || [ ! -d "$PKG/node_modules/@y/websocket-server" ]; then
    log "installing $PKG's packages (npm ci, as package-lock.json pins them)"
    npm ci --prefix "$PKG" --no-audit --no-fund --loglevel=error >&2
fi
case ",$SERVERS," in
    *,docrelay,*|*,docrelay-durable,*) [ -x "$DOCRELAY_BIN" ] || { log "no relay binary at $DOCRELAY_BIN (set DOCRELAY_BIN; this script builds nothing)"; exit 1; } ;;
esac
for cpu in "$SERVER_CPU" "$LOAD_CPU"; do
    taskset -c "$cpu" true 2>/dev/null || { log "CPU $cpu is not available here"; exit 1; }
done
[ "$SERVER_CPU" != "$LOAD_CPU" ] || log "warning: the server and the generator share CPU $SERVER_CPU"

# glommio (docrelay) needs to lock at least 512 KiB; the idle phase needs open files.
ulimit -l unlimited 2>/dev/null || ulimit -l "$(ulimit -H -l)" 2>/dev/null || true
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -H -n)" 2>/dev/null || true
if [ "$(ulimit -l)" != unlimited ] && [ "$(ulimit -l)" -lt 512 ]; then
    log "ulimit -l is $(ulimit -l) KiB and cannot be raised to 512: docrelay will not start"
fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS + DOCS * PROVIDERS + 200)) ]; then
    IDLE_CONNS=$(( $(ulimit -n) - DOCS * PROVIDERS - 200 ))
    log "ulimit -n is $(ulimit -n): the RSS phase uses $IDLE_CONNS idle connections"
fi

LOADGEN_ARGS=(--docs "$DOCS" --providers "$PROVIDERS" --rate "$RATE" --window "$WINDOW"
    --sweep-window "$SWEEP_WINDOW" --idle-conns "$IDLE_CONNS" --max-p99 "$MAX_P99")
if [ "$QUICK" = 1 ]; then
    LOADGEN_ARGS+=(--window 2 --warmup 1 --sweep-window 1.5 --bisect 1 --retries 0)
fi
LOADGEN_ARGS+=("${EXTRA[@]}")

CONFIG=$OUT/docrelay.toml
cat > "$CONFIG" <<EOF
# scripts/bench-yjs.sh: docrelay on one core (one pinned executor), otherwise the defaults
# (auth.mode = "dev": any non-empty token; no storage: rooms in memory, as the other two).
cores = [$SERVER_CPU]
EOF
DURABLE_CONFIG=$OUT/docrelay-durable.toml
rm -rf "$OUT/wal"
cat > "$DURABLE_CONFIG" <<EOF
# scripts/bench-yjs.sh: as docrelay.toml, with the rooms' updates in the write-ahead log.
cores = [$SERVER_CPU]
[storage]
dir = "$OUT/wal"
EOF

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

# Starts a server pinned to SERVER_CPU; sets SERVER_PID and SERVER_ADDR, or returns 1.
start_server() {
    local which=$1 logf=$OUT/$1.server.log
    : > "$logf"
    case $which in
        docrelay|docrelay-durable)
            local config=$CONFIG
            [ "$which" = docrelay ] || config=$DURABLE_CONFIG
            NO_COLOR=1 RUST_LOG=${RUST_LOG:-warn,docrelay::runtime=info} taskset -c "$SERVER_CPU" \
                "$DOCRELAY_BIN" serve --config "$config" --listen 127.0.0.1:0 2> "$logf" &
            ;;
        y-websocket|hocuspocus)
            taskset -c "$SERVER_CPU" node "$PKG/servers.js" "$which" --port 0 2> "$logf" &
            ;;
        *) log "unknown server $which"; return 1 ;;
    esac
    SERVER_PID=$!
    SERVER_ADDR=
    for _ in $(seq 150); do
        SERVER_ADDR=$(grep -v 'metrics listening on' "$logf" | grep -o 'listening on [0-9.:]*' | head -1 | awk '{print $3}') || true
        [ -n "$SERVER_ADDR" ] && return 0
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=
            cat "$logf" >&2
            log "$which exited before listening"
            return 1
        fi
        sleep 0.1
    done
    cat "$logf" >&2
    log "$which never printed 'listening on' within 15 s"
    stop_server
    return 1
}

log "servers on CPU $SERVER_CPU, generator on CPU $LOAD_CPU; node $(node -v); relay $DOCRELAY_BIN"
node "$PKG/check.js" || { log "the generator's hand-encoded updates do not match this yjs"; exit 1; }
START=$(date +%s)
RESULTS=()
IFS=, read -r -a LIST <<< "$SERVERS"
for which in "${LIST[@]}"; do
    rm -f "$OUT/$which.json"
    start_server "$which" || continue
    case $which in
        hocuspocus) proto=hocuspocus ;;
        *) proto=yws ;;
    esac
    log "$which: pid $SERVER_PID at $SERVER_ADDR"
    rc=0
    taskset -c "$LOAD_CPU" node "$PKG/loadgen.js" --url "ws://$SERVER_ADDR/yjs" --protocol "$proto" \
        --name "$which" --server-pid "$SERVER_PID" --json "$OUT/$which.json" "${LOADGEN_ARGS[@]}" || rc=$?
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then log "$which died during the run"; fi
    stop_server
    if [ -s "$OUT/$which.json" ]; then RESULTS+=("$OUT/$which.json"); fi
    [ "$rc" = 0 ] || log "$which: the load generator exited with $rc (see $OUT/$which.json)"
done

log "done in $(( $(date +%s) - START )) s; results in $OUT/"
[ ${#RESULTS[@]} -gt 0 ] || { log "no results"; exit 1; }
echo
node "$PKG/report.js" "${RESULTS[@]}"
