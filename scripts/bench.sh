#!/usr/bin/env bash
# Benchmarks docrelay against the conventional baseline (tokio + tokio-tungstenite +
# tokio::sync::broadcast, bench/src/bin/docrelay-baseline.rs) under the same CPU pinning, and
# prints one table with both and their ratio. Every run's JSON lands in target/bench/.
#
#   scripts/bench.sh                     all scenarios, 3 runs each (medians reported)
#   scripts/bench.sh --scenarios fanout  only some: fanout,rooms,storm,idle
#   scripts/bench.sh --runs 1 --quick    shorter windows, for a smoke test
#
# Options:
#   --relay-cpus LIST   CPUs for the server under test (default: 0); docrelay gets one
#                       executor per CPU, the baseline as many worker threads
#   --load-cpu N        CPU for the load generator (default: 1)
#   --runs N            runs per scenario and server (default: 3)
#   --servers LIST      docrelay,baseline (default: both)
#   --scenarios LIST    fanout,rooms,storm,idle (default: all)
#   --quick             shorter measurement windows
#
# Scenarios (see README "Performance"):
#   fanout  1 document, 1 sender, 100 subscribers, 1 KiB payloads; --find-max raises the
#           rate x1.3 per step until delivery < 99% or p99 > 50 ms, then bisects twice
#           between the last rate that held and the one that failed: sustainable
#           deliveries/s
#   rooms   1000 documents x 5 clients, every client sending 1 op/s, 256 B: server CPU%, p99
#   storm   10,000 clients connect, authenticate and join as fast as possible: sessions/s
#   idle    20,000 joined idle clients: server RSS per connection (fewer where
#           `ulimit -n` cannot be raised that far; the script says so)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RELAY_CPUS=0
LOAD_CPU=1
RUNS=3
SERVERS=docrelay,baseline
SCENARIOS=fanout,rooms,storm,idle
QUICK=0
while [ $# -gt 0 ]; do
    case $1 in
        --relay-cpus) RELAY_CPUS=$2; shift 2 ;;
        --load-cpu) LOAD_CPU=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

OUT=target/bench
mkdir -p "$OUT"
log() { printf '[bench] %s\n' "$*" >&2; }

# storm and idle hold 10,000 / 20,000 connections in each process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -H -n)" 2>/dev/null || true
ulimit -l "$(ulimit -H -l)" 2>/dev/null || true
# idle wants 20,000 connections; each process needs one descriptor per
# connection plus a few, so where the limit is lower the largest count that
# fits is used (and said).
IDLE_CONNECTIONS=20000
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 20500 ]; then
    IDLE_CONNECTIONS=$(( ($(ulimit -n) - 500) / 1000 * 1000 ))
    log "ulimit -n is $(ulimit -n) and cannot be raised here: idle uses $IDLE_CONNECTIONS connections instead of 20000"
fi

log "building release binaries (the relay, and the bench member's load generator and baseline)"
cargo build --release -p docrelay -p docrelay-bench >&2
BIN=${CARGO_TARGET_DIR:-target}/release
NCPU=$(echo "$RELAY_CPUS" | tr ',' '\n' | wc -l)

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

# Starts a server pinned to RELAY_CPUS; sets SERVER_PID and SERVER_ADDR.
start_server() {
    local which=$1 logf=$OUT/server.log
    : > "$logf"
    case $which in
        docrelay)
            NO_COLOR=1 RUST_LOG=warn,docrelay::runtime=info taskset -c "$RELAY_CPUS" \
                "$BIN/docrelay" serve --listen 127.0.0.1:0 --cores "$RELAY_CPUS" 2> "$logf" &
            ;;
        baseline)
            NO_COLOR=1 taskset -c "$RELAY_CPUS" \
                "$BIN/docrelay-baseline" --listen 127.0.0.1:0 --threads "$NCPU" 2> "$logf" &
            ;;
    esac
    SERVER_PID=$!
    SERVER_ADDR=
    for _ in $(seq 100); do
        SERVER_ADDR=$(grep -o 'listening on [0-9.:]*' "$logf" | head -1 | awk '{print $3}') || true
        [ -n "$SERVER_ADDR" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$logf" >&2; log "$which exited"; exit 1; }
        sleep 0.1
    done
    [ -n "$SERVER_ADDR" ] || { cat "$logf" >&2; log "$which never listened"; exit 1; }
}

if [ "$QUICK" = 1 ]; then DUR=2; WARM=0.5; else DUR=5; WARM=1; fi

scenario_args() {
    case $1 in
        fanout) echo "--docs 1 --subs 100 --senders 1 --payload 1024 --find-max --rate 500 --step 1.3 --refine 2 --duration $DUR --warmup $WARM" ;;
        rooms) echo "--docs 1000 --subs 0 --senders 5 --payload 256 --rate 5000 --duration $((DUR * 2)) --warmup $WARM" ;;
        storm) echo "--mode storm --connections 10000 --concurrency 1000" ;;
        idle) echo "--mode idle --connections $IDLE_CONNECTIONS --concurrency 1000" ;;
    esac
}

for scenario in ${SCENARIOS//,/ }; do
    for server in ${SERVERS//,/ }; do
        for run in $(seq "$RUNS"); do
            start_server "$server"
            json=$OUT/$scenario-$server-$run.json
            log "$scenario / $server / run $run on $SERVER_ADDR (server CPUs $RELAY_CPUS, load CPU $LOAD_CPU)"
            # shellcheck disable=SC2046
            taskset -c "$LOAD_CPU" "$BIN/docrelay-load" --addr "$SERVER_ADDR" --cpu "$LOAD_CPU" \
                --relay-pid "$SERVER_PID" --relay-cpus "$RELAY_CPUS" --label "$scenario-$server" --doc-prefix "$scenario$run" \
                --json "$json" $(scenario_args "$scenario") >&2 || log "load generator failed ($scenario/$server/$run)"
            stop_server
        done
    done
done

python3 - "$OUT" "$RUNS" "$SCENARIOS" "$SERVERS" "$RELAY_CPUS" "$LOAD_CPU" <<'PY'
import json, os, statistics, sys, platform, datetime
out, runs, scenarios, servers, relay_cpus, load_cpu = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(','), sys.argv[4].split(','), sys.argv[5], sys.argv[6]

def load(s, srv):
    res = []
    for r in range(1, runs + 1):
        p = os.path.join(out, f"{s}-{srv}-{r}.json")
        if os.path.exists(p):
            with open(p) as f:
                res.append(json.load(f))
    return res

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

# (metric label, extractor, better: 'high' or 'low', unit)
metrics = {
    "fanout": [("sustained deliveries/s", lambda j: (j.get("best") or {}).get("deliveries_per_sec"), "high", ""),
               ("p99 at that rate (ms)", lambda j: ((j.get("best") or {}).get("p99_us") or 0) / 1000, "low", ""),
               ("server CPUs busy % then", lambda j: (j.get("best") or {}).get("relay_cpus_busy_pct"), "low", ""),
               ("load CPU busy % then", lambda j: (j.get("best") or {}).get("load_cpu_busy_pct"), "low", "")],
    "rooms": [("server CPUs busy %", lambda j: (j.get("best") or {}).get("relay_cpus_busy_pct"), "low", ""),
              ("server process CPU%", lambda j: (j.get("best") or {}).get("relay_cpu_pct"), "low", ""),
              ("p99 (ms)", lambda j: ((j.get("best") or {}).get("p99_us") or 0) / 1000, "low", ""),
              ("delivery ratio", lambda j: (j.get("best") or {}).get("delivery_ratio"), "high", "")],
    "storm": [("sessions/s", lambda j: j.get("sessions_per_sec"), "high", "")],
    "idle": [("bytes per idle connection", lambda j: j.get("bytes_per_connection"), "low", "")],
}
rows, summary = [], {"date": datetime.datetime.utcnow().isoformat() + "Z", "host": platform.node(),
                     "cpus": os.cpu_count(), "relay_cpus": relay_cpus, "load_cpu": load_cpu, "runs": runs, "scenarios": {}}
for s in scenarios:
    summary["scenarios"][s] = {}
    for label, f, better, _ in metrics.get(s, []):
        vals = {srv: med([f(j) for j in load(s, srv)]) for srv in servers}
        d, b = vals.get("docrelay"), vals.get("baseline")
        ratio = (d / b) if (d is not None and b not in (None, 0)) else None
        rows.append((s, label, d, b, ratio))
        summary["scenarios"][s][label] = {"docrelay": d, "baseline": b, "ratio": ratio}
fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}")
print(f"\nmedians of {runs} run(s); server on CPU {relay_cpus}, load generator on CPU {load_cpu}; {platform.node()}, {os.cpu_count()} CPUs")
print(f"{'scenario':<8} {'metric':<28} {'docrelay':>14} {'baseline':>14} {'docrelay/baseline':>18}")
for s, label, d, b, r in rows:
    print(f"{s:<8} {label:<28} {fmt(d):>14} {fmt(b):>14} {('-' if r is None else f'{r:.2f}x'):>18}")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"\nJSON: {out}/summary.json and {out}/<scenario>-<server>-<run>.json")
PY
