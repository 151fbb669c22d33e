#!/usr/bin/env bash
# Benchmarks docrelay against the conventional baseline (tokio + tokio-tungstenite +
# tokio::sync::broadcast, bench/src/bin/docrelay-baseline.rs) under the same CPU pinning, and
# prints one table with both and their ratio. Every run's JSON lands in target/bench/.
#
#   scripts/bench.sh                     all scenarios, 3 runs each (medians reported)
#   scripts/bench.sh --scenarios fanout  only some: fanout,rooms,storm,idle,durable
#   scripts/bench.sh --runs 1 --quick    shorter windows, for a smoke test
#   scripts/bench.sh --scenarios durable the cost of durable storage (docrelay only)
#   DURABLE_SHAPES=fanout DURABLE_MODES="memory batch" scripts/bench.sh --scenarios durable
#                                        a subset of its shapes and modes
#   scripts/bench.sh --scenarios cluster one node in memory, one on Redis, two on Redis
#
# Options:
#   --relay-cpus LIST   CPUs for the server under test (default: 0); docrelay gets one
#                       executor per CPU, the baseline as many worker threads
#   --load-cpu N        CPU for the load generator (default: 1)
#   --runs N            runs per scenario and server (default: 3)
#   --servers LIST      docrelay,baseline (default: both; durable runs docrelay only)
#   --scenarios LIST    fanout,rooms,storm,idle,durable (default: fanout,rooms,storm,idle;
#                       durable is not in the default set: its 8 searches for a maximum
#                       take longer than all the others together)
#   --redis-cpu LIST    CPUs for redis-server in the cluster scenario (default: the
#                       relay's, so that a 2-CPU machine keeps the load generator alone)
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
#   durable docrelay only, in four storage modes in the same run: memory only (no
#           [storage]), fsync = "never", "batch" (batch_ms = 2) and "always", each with a
#           fresh storage directory under target/bench/ (removed after the run), on two
#           shapes: rooms (1000 documents x 5 senders, 256 B, no subscribers, from
#           5000 ops/s) and fanout (1 document, 1 sender, 100 subscribers, 1 KiB, from
#           2000 ops/s). --find-max raises the rate x1.5 per step until delivery < 99%,
#           delivery p99 > 50 ms or ack p99 > 5 ms (an ack is sent once the operation
#           is durable), then bisects three times: the maximum sustained operations/s,
#           ack p50/p99 there, and the share of memory-only's maximum in the same
#           shape. A mode whose first step already fails is searched again from an
#           eighth of the starting rate; a failing step is measured once more before it
#           counts as failed (a shared VM has hiccups); a mode the relay refuses to start with is
#           reported as such and the others go on. Summary: target/bench/durable-summary.json
#   cluster docrelay only, three set-ups in the same run: one node in memory (no
#           [cluster]), one node on Redis, and two nodes on one Redis with the clients
#           split between them (subscribers of a document on both nodes, so every
#           operation crosses nodes). Shape: 100 documents x (1 sender + 4
#           subscribers), 256 B. Each set-up is measured at a fixed 1000 ops/s (end-to-end
#           p50/p99, CPU of the nodes and of Redis) and with --find-max (delivery >= 99%,
#           p99 <= 50 ms). Redis: redis-server on a free port in a fresh directory,
#           appendonly yes, appendfsync everysec. Summary: target/bench/cluster-summary.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RELAY_CPUS=0
LOAD_CPU=1
RUNS=3
SERVERS=docrelay,baseline
SCENARIOS=fanout,rooms,storm,idle
QUICK=0
REDIS_CPU=
while [ $# -gt 0 ]; do
    case $1 in
        --relay-cpus) RELAY_CPUS=$2; shift 2 ;;
        --load-cpu) LOAD_CPU=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --redis-cpu) REDIS_CPU=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
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
# The durable scenario's storage directory of the run in progress.
DURABLE_TMP=
cleanup() {
    stop_server
    if [ -n "$DURABLE_TMP" ]; then rm -rf "$DURABLE_TMP"; fi
}
trap cleanup EXIT

# Starts a server pinned to RELAY_CPUS; sets SERVER_PID and SERVER_ADDR. An
# optional second argument is a configuration file for docrelay (`--config`).
# Returns 1 (with the server's log on stderr and the reason in SERVER_ERROR)
# if it exits or never listens.
start_server() {
    local which=$1 config=${2:-} logf=$OUT/server.log
    local config_args=()
    [ -z "$config" ] || config_args=(--config "$config")
    : > "$logf"
    SERVER_ERROR=
    case $which in
        docrelay)
            NO_COLOR=1 RUST_LOG=warn,docrelay::runtime=info taskset -c "$RELAY_CPUS" \
                "$BIN/docrelay" serve "${config_args[@]}" --listen 127.0.0.1:0 --cores "$RELAY_CPUS" 2> "$logf" &
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
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=
            SERVER_ERROR=$( (grep -m1 '^docrelay: ' "$logf" || tail -n 1 "$logf") | cut -c1-400)
            SERVER_ERROR=${SERVER_ERROR:-exited without a message}
            cat "$logf" >&2
            log "$which exited"
            return 1
        fi
        sleep 0.1
    done
    if [ -z "$SERVER_ADDR" ]; then
        cat "$logf" >&2
        log "$which never listened"
        SERVER_ERROR="never printed 'listening on' within 10 s"
        stop_server
        return 1
    fi
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

# durable has its own loop and summary (below); the others share this one.
MAIN_SCENARIOS=
DURABLE=0
CLUSTER=0
for scenario in ${SCENARIOS//,/ }; do
    case $scenario in
        durable) DURABLE=1 ;;
        cluster) CLUSTER=1 ;;
        fanout|rooms|storm|idle) MAIN_SCENARIOS=${MAIN_SCENARIOS:+$MAIN_SCENARIOS,}$scenario ;;
        *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
done

for scenario in ${MAIN_SCENARIOS//,/ }; do
    for server in ${SERVERS//,/ }; do
        for run in $(seq "$RUNS"); do
            start_server "$server" || exit 1
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

if [ -n "$MAIN_SCENARIOS" ]; then
python3 - "$OUT" "$RUNS" "$MAIN_SCENARIOS" "$SERVERS" "$RELAY_CPUS" "$LOAD_CPU" <<'PY'
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
fi

# ---------------------------------------------------------------------------
# cluster: one node in memory, one node on Redis, two nodes on one Redis.

if [ "$CLUSTER" = 1 ]; then
command -v redis-server >/dev/null 2>&1 || { log "cluster: redis-server not found (apt-get install redis-server)"; exit 1; }
REDIS_CPU=${REDIS_CPU:-$RELAY_CPUS}
CLUSTER_SETUPS="memory redis1 redis2"
CLUSTER_SHAPE="--docs 100 --subs 4 --senders 1 --payload 256"
CLUSTER_RATE=1000
REDIS_PID=
REDIS_DIR=
NODE_PIDS=()
stop_cluster() {
    for pid in "${NODE_PIDS[@]}"; do SERVER_PID=$pid; stop_server; done
    NODE_PIDS=()
    if [ -n "$REDIS_PID" ]; then kill -TERM "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
    REDIS_PID=
    if [ -n "$REDIS_DIR" ]; then rm -rf "$REDIS_DIR"; fi
    REDIS_DIR=
}
trap 'stop_cluster; cleanup' EXIT
start_redis() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    REDIS_DIR=$(mktemp -d "$PWD/$OUT/redis.XXXXXX")
    taskset -c "$REDIS_CPU" redis-server --port "$port" --bind 127.0.0.1 --dir "$REDIS_DIR" \
        --appendonly yes --appendfsync everysec --save "" > "$REDIS_DIR/log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
        sleep 0.05
    done
    REDIS_URL="redis://127.0.0.1:$port/"
}
# Starts the set-up; sets CLUSTER_ADDRS (comma-separated) and NODE_PIDS.
start_setup() { # setup
    local nodes=1 config=
    case $1 in
        memory) ;;
        redis1|redis2)
            [ "$1" = redis2 ] && nodes=2
            start_redis
            config=$REDIS_DIR/docrelay.toml
            printf '[cluster]\nredis_url = "%s"\n' "$REDIS_URL" > "$config"
            ;;
    esac
    CLUSTER_ADDRS=
    for _ in $(seq "$nodes"); do
        start_server docrelay "$config" || return 1
        NODE_PIDS+=("$SERVER_PID")
        CLUSTER_ADDRS=${CLUSTER_ADDRS:+$CLUSTER_ADDRS,}$SERVER_ADDR
    done
}
for run in $(seq "$RUNS"); do
    for setup in $CLUSTER_SETUPS; do
        for what in fixed max; do
            json=$OUT/cluster-$setup-$what-$run.json
            rm -f "$json"
            if ! start_setup "$setup"; then
                log "cluster / $setup: did not start: $SERVER_ERROR"
                stop_cluster
                continue
            fi
            pids=$(IFS=,; echo "${NODE_PIDS[*]}")
            case $what in
                fixed) args="--rate $CLUSTER_RATE --duration $((DUR * 2)) --warmup $WARM" ;;
                max) args="--find-max --rate 2000 --step 1.4 --refine 2 --confirm 1 --duration $DUR --warmup $WARM" ;;
            esac
            log "cluster / $setup / $what / run $run on $CLUSTER_ADDRS (nodes and Redis on CPU $RELAY_CPUS/$REDIS_CPU, load CPU $LOAD_CPU)"
            # shellcheck disable=SC2086
            taskset -c "$LOAD_CPU" "$BIN/docrelay-load" --addr "$CLUSTER_ADDRS" --cpu "$LOAD_CPU" \
                --relay-pid "$pids" ${REDIS_PID:+--redis-pid $REDIS_PID} --relay-cpus "$RELAY_CPUS" \
                --label "cluster-$setup-$what" --doc-prefix "cluster$run$setup$what" --json "$json" \
                $CLUSTER_SHAPE $args >&2 || log "load generator failed (cluster/$setup/$what/$run)"
            stop_cluster
        done
    done
done
python3 - "$OUT" "$RUNS" "$CLUSTER_SETUPS" "$RELAY_CPUS" "$REDIS_CPU" "$LOAD_CPU" "$CLUSTER_RATE" <<'PY'
import json, os, statistics, sys, platform, datetime
out, runs, setups, relay_cpus, redis_cpu, load_cpu, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def load(setup, what, r):
    p = os.path.join(out, f"cluster-{setup}-{what}-{r}.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        res = json.load(f)
    if what == "max":
        return res.get("best")
    steps = res.get("steps") or []
    return steps[-1] if steps else None
summary = {"date": datetime.datetime.utcnow().isoformat() + "Z", "host": platform.node(), "cpus": os.cpu_count(),
           "relay_cpus": relay_cpus, "redis_cpu": redis_cpu, "load_cpu": load_cpu, "runs": runs, "fixed_rate": rate,
           "shape": "100 documents x (1 sender + 4 subscribers), 256 B", "setups": {}}
for s in setups:
    fixed = [load(s, "fixed", r) for r in range(1, runs + 1)]
    best = [load(s, "max", r) for r in range(1, runs + 1)]
    g = lambda xs, k: med([x.get(k) for x in xs if x])
    summary["setups"][s] = {
        "max_ops_per_sec": g(best, "ops_per_sec"),
        "max_p99_ms": (lambda v: None if v is None else v / 1000)(g(best, "p99_us")),
        "fixed_p50_ms": (lambda v: None if v is None else v / 1000)(g(fixed, "p50_us")),
        "fixed_p99_ms": (lambda v: None if v is None else v / 1000)(g(fixed, "p99_us")),
        "fixed_ack_p50_ms": (lambda v: None if v is None else v / 1000)(g(fixed, "ack_p50_us")),
        "fixed_delivery_ratio": g(fixed, "delivery_ratio"),
        "fixed_nodes_cpu_pct": g(fixed, "relay_cpu_pct"),
        "fixed_redis_cpu_pct": g(fixed, "redis_cpu_pct"),
        "max_nodes_cpu_pct": g(best, "relay_cpu_pct"),
        "max_redis_cpu_pct": g(best, "redis_cpu_pct"),
        "runs_measured": sum(1 for b in best if b),
    }
fmt = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
names = {"memory": "1 node, memory", "redis1": "1 node on Redis", "redis2": "2 nodes on Redis"}
print(f"\ncluster: medians of {runs} run(s); nodes on CPU {relay_cpus}, Redis on CPU {redis_cpu}, load generator on CPU {load_cpu}; {platform.node()}, {os.cpu_count()} CPUs")
print(f"{'set-up':<18} {'max ops/s':>10} {'p50 @' + str(rate):>10} {'p99 @' + str(rate):>10} {'ack p50':>8} {'nodes CPU':>10} {'Redis CPU':>10} {'max: nodes/Redis CPU':>21}")
for s in setups:
    m = summary["setups"][s]
    print(f"{names.get(s, s):<18} {fmt(m['max_ops_per_sec']):>10} {fmt(m['fixed_p50_ms'], 2):>8}ms {fmt(m['fixed_p99_ms'], 2):>8}ms {fmt(m['fixed_ack_p50_ms'], 2):>6}ms "
          f"{fmt(m['fixed_nodes_cpu_pct']):>9}% {fmt(m['fixed_redis_cpu_pct']):>9}% {fmt(m['max_nodes_cpu_pct']):>10}% / {fmt(m['max_redis_cpu_pct'])}%")
with open(os.path.join(out, "cluster-summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"\nJSON: {out}/cluster-summary.json and {out}/cluster-<set-up>-<fixed|max>-<run>.json")
PY
fi

[ "$DURABLE" = 1 ] || exit 0

# ---------------------------------------------------------------------------
# durable: docrelay in four storage modes x two shapes, find-max with an ack
# latency bound; run by run, every (shape, mode) in turn, so that a drift of
# the machine during the run touches all modes alike.

# (DURABLE_SHAPES and DURABLE_MODES from the environment take a subset.)
DURABLE_SHAPES=${DURABLE_SHAPES:-rooms fanout}
DURABLE_MODES=${DURABLE_MODES:-memory never batch always}
ACK_P99_MS=5

durable_args() { # shape start-rate
    local common="--find-max --rate $2 --step 1.5 --refine 3 --confirm 1 --max-ack-p99-ms $ACK_P99_MS --duration $DUR --warmup $WARM"
    case $1 in
        rooms) echo "--docs 1000 --subs 0 --senders 5 --payload 256 $common" ;;
        fanout) echo "--docs 1 --subs 100 --senders 1 --payload 1024 $common" ;;
    esac
}
durable_start_rate() { case $1 in rooms) echo 5000 ;; fanout) echo 2000 ;; esac; }

# Writes the configuration of a storage mode into a fresh directory (set as
# DURABLE_TMP) and prints its path; memory-only has none.
durable_config() { # mode
    [ "$1" = memory ] && return 0
    DURABLE_TMP=$(mktemp -d "$PWD/$OUT/durable-tmp.XXXXXX") || return 1
    mkdir "$DURABLE_TMP/data" || return 1
    {
        echo "[storage]"
        echo "dir = \"$DURABLE_TMP/data\""
        echo "fsync = \"$1\""
        [ "$1" = batch ] && echo "batch_ms = 2"
    } > "$DURABLE_TMP/docrelay.toml"
    echo "$DURABLE_TMP/docrelay.toml"
}

# Waits (at most 120 s) until the share of time tasks stalled on I/O over
# the last 10 s (/proc/pressure/io, "some avg10") is under 1%; without PSI,
# 5 s.
wait_for_quiet_disk() {
    if [ ! -r /proc/pressure/io ]; then sleep 5; return; fi
    local i stalled
    for i in $(seq 120); do
        stalled=$(awk '/^some/ { sub("avg10=", "", $2); print int($2) }' /proc/pressure/io)
        [ "${stalled:-0}" -lt 1 ] && { [ "$i" -gt 1 ] && log "durable: disk quiet after ${i} s"; return; }
        sleep 1
    done
    log "durable: the disk is still busy after 120 s (I/O stalls ${stalled}% over 10 s); going on"
}

# One find-max of (shape, mode) from a starting rate on a fresh relay (and a
# fresh storage directory). Returns 1 if the relay did not start (the reason
# is then in SERVER_ERROR), 0 otherwise.
durable_attempt() { # shape mode run rate json
    local shape=$1 mode=$2 run=$3 rate=$4 json=$5 config
    if ! config=$(durable_config "$mode") || { [ "$mode" != memory ] && [ -z "$config" ]; }; then
        SERVER_ERROR="cannot write a storage directory and configuration under $OUT"
        return 1
    fi
    if [ -n "$config" ]; then DURABLE_TMP=$(dirname "$config"); fi
    if ! start_server docrelay "$config"; then
        if [ -n "$DURABLE_TMP" ]; then rm -rf "$DURABLE_TMP"; DURABLE_TMP=; fi
        return 1
    fi
    log "durable / $shape / $mode / run $run from $rate ops/s on $SERVER_ADDR (server CPUs $RELAY_CPUS, load CPU $LOAD_CPU${config:+, storage in $DURABLE_TMP/data})"
    # shellcheck disable=SC2046
    taskset -c "$LOAD_CPU" "$BIN/docrelay-load" --addr "$SERVER_ADDR" --cpu "$LOAD_CPU" \
        --relay-pid "$SERVER_PID" --relay-cpus "$RELAY_CPUS" --label "durable-$shape-$mode" \
        --doc-prefix "durable$run$shape$mode$rate" --json "$json" $(durable_args "$shape" "$rate") >&2 \
        || log "load generator failed (durable/$shape/$mode/$run)"
    stop_server
    if [ -n "$DURABLE_TMP" ]; then
        # Deleting a run's segments (up to gigabytes after a fast mode) makes
        # the file system free their extents (and, mounted with `discard`,
        # trim them) over the next seconds, and every fdatasync waits for
        # that: measured, the next mode's ack p99 was 25-121 ms at 250 ops/s,
        # against 1.3 ms on a quiet disk. The deletion is committed (syncfs)
        # and the next relay waits until the disk is quiet again.
        rm -rf "$DURABLE_TMP"
        DURABLE_TMP=
        sync -f "$OUT" 2>/dev/null || sync
        wait_for_quiet_disk
    fi
    return 0
}

FS_TYPE=$(stat -f -c %T "$OUT" 2>/dev/null || echo unknown)
log "durable: storage directories under $OUT ($FS_TYPE)"
for run in $(seq "$RUNS"); do
    for shape in $DURABLE_SHAPES; do
        for mode in $DURABLE_MODES; do
            json=$OUT/durable-$shape-$mode-$run.json
            err=$OUT/durable-$shape-$mode-$run.error
            rm -f "$json" "$err"
            rate=$(durable_start_rate "$shape")
            if ! durable_attempt "$shape" "$mode" "$run" "$rate" "$json"; then
                log "durable / $shape / $mode / run $run: the relay did not start: $SERVER_ERROR"
                echo "relay did not start: $SERVER_ERROR" > "$err"
                continue
            fi
            if [ -f "$json" ] && grep -q '"best":null' "$json"; then
                rate=$((rate / 8))
                log "durable / $shape / $mode / run $run: no step held; again from $rate ops/s"
                if ! durable_attempt "$shape" "$mode" "$run" "$rate" "$json"; then
                    echo "relay did not start: $SERVER_ERROR" > "$err"
                fi
            fi
        done
    done
done

python3 - "$OUT" "$RUNS" "$DURABLE_SHAPES" "$DURABLE_MODES" "$RELAY_CPUS" "$LOAD_CPU" "$ACK_P99_MS" "$FS_TYPE" <<'PY'
import json, os, re, statistics, sys, platform, datetime
out, runs, relay_cpus, load_cpu = sys.argv[1], int(sys.argv[2]), sys.argv[5], sys.argv[6]
shapes, modes, ack_bound, fs_type = sys.argv[3].split(), sys.argv[4].split(), float(sys.argv[7]), sys.argv[8]

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

rows, summary = [], {"date": datetime.datetime.utcnow().isoformat() + "Z", "host": platform.node(),
                     "cpus": os.cpu_count(), "relay_cpus": relay_cpus, "load_cpu": load_cpu, "runs": runs,
                     "storage_fs": fs_type,
                     "criteria": {"min_delivery": 0.99, "max_p99_ms": 50, "max_ack_p99_ms": ack_bound},
                     "shapes": {}}
for shape in shapes:
    summary["shapes"][shape] = {}
    for mode in modes:
        bests, notes = [], []
        for r in range(1, runs + 1):
            base = os.path.join(out, f"durable-{shape}-{mode}-{r}")
            if os.path.exists(base + ".error"):
                with open(base + ".error") as f:
                    # The run's storage directory (gone now) differs per run.
                    notes.append(re.sub(r'"[^"]*/durable-tmp\.[^"/]*/data"', '"<fresh dir>"', f.read().strip()))
            elif os.path.exists(base + ".json"):
                with open(base + ".json") as f:
                    res = json.load(f)
                best = res.get("best")
                if best is None:
                    # Why: the lowest rate tried and what it measured.
                    low = min(res.get("steps") or [{}], key=lambda st: st.get("rate", 0))
                    notes.append("no rate held" + ("" if "rate" not in low else
                        f" (at {low['rate']:.0f} ops/s: ack p99 {low.get('ack_p99_us', 0) / 1000:.2f} ms, "
                        f"delivery p99 {low.get('p99_us', 0) / 1000:.2f} ms, "
                        f"delivered {low.get('delivery_ratio', 0) * 100:.1f}%)"))
                else:
                    bests.append(best)
            else:
                notes.append("load generator wrote no results")
        ops = med([b.get("ops_per_sec") for b in bests])
        p50 = med([b.get("ack_p50_us") for b in bests])
        p99 = med([b.get("ack_p99_us") for b in bests])
        summary["shapes"][shape][mode] = {
            "ops_per_sec": ops,
            "rate": med([b.get("rate") for b in bests]),
            "ack_p50_ms": None if p50 is None else p50 / 1000,
            "ack_p99_ms": None if p99 is None else p99 / 1000,
            "delivery_p99_ms": (lambda v: None if v is None else v / 1000)(med([b.get("p99_us") for b in bests])),
            "relay_cpus_busy_pct": med([b.get("relay_cpus_busy_pct") for b in bests]),
            "runs_measured": len(bests),
            "notes": sorted(set(notes)),
        }
        rows.append((shape, mode))
    memory = summary["shapes"][shape].get("memory", {}).get("ops_per_sec")
    for mode in modes:
        m = summary["shapes"][shape][mode]
        m["of_memory_only"] = (m["ops_per_sec"] / memory) if (m["ops_per_sec"] is not None and memory) else None

fmt = lambda v, d: "-" if v is None else f"{v:,.{d}f}"
print(f"\ndurable: medians of {runs} run(s); max sustained operations/s with delivery >= 99%, delivery p99 <= 50 ms "
      f"and ack p99 <= {ack_bound:g} ms; server on CPU {relay_cpus}, load generator on CPU {load_cpu}; "
      f"storage on {fs_type}; {platform.node()}, {os.cpu_count()} CPUs")
print(f"{'shape':<7} {'mode':<7} {'ops/s':>10} {'ack p50 (ms)':>13} {'ack p99 (ms)':>13} {'% of memory-only':>17}  note")
for shape, mode in rows:
    m = summary["shapes"][shape][mode]
    pct = "-" if m["of_memory_only"] is None else f"{m['of_memory_only'] * 100:.0f}%"
    note = "; ".join(m["notes"])
    if m["notes"] and m["runs_measured"]:
        note = f"{m['runs_measured']}/{runs} runs measured; {note}"
    print(f"{shape:<7} {mode:<7} {fmt(m['ops_per_sec'], 0):>10} {fmt(m['ack_p50_ms'], 2):>13} {fmt(m['ack_p99_ms'], 2):>13} {pct:>17}  {note[:160]}")
with open(os.path.join(out, "durable-summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"\nJSON: {out}/durable-summary.json and {out}/durable-<shape>-<mode>-<run>.json")
PY
