#!/usr/bin/env bash
# Soak test: a release relay with storage on, thousands of clients with mixed behaviours
# (bench/src/bin/docrelay-soak.rs) for N minutes, then checks; exits non-zero if one fails.
# See docs/soak.md.
#
#   scripts/soak.sh                  10 minutes, 2000 clients, 200 documents
#   scripts/soak.sh --minutes 1      a short run
#
# Options:
#   --minutes N        minutes of mixed behaviours after the warm-up (default: 10)
#   --clients N        simulated clients, one connection each at a time (default: 2000;
#                      must stay well below `ulimit -n`, which every process needs one
#                      descriptor per connection of)
#   --docs N           documents (default: 200; client i edits document i % N)
#   --cores LIST       the relay's CPUs, `all` or a list such as 0,1 or 0-3 (default: all)
#   --client-cpus LIST the soak client's CPUs (default: the CPUs the relay does not
#                      use, or all of them when it uses every one, as on a 2-CPU machine)
#   --out DIR          where the logs and summary.json go (default: target/soak)
#   --keep-storage     keep the relay's storage directory (default: removed at the end)
#   --no-build         use the release binaries already built
#   --allow-log REGEX  ERROR lines of the relay's log matching REGEX (Python syntax) are
#                      counted and printed but do not fail check 4 (default: none; for
#                      known, triaged lines only)
#   --                 everything after it goes to docrelay-soak (e.g. -- --hot-rate 6)
#
# The relay runs with: storage.dir = a fresh directory under DIR, fsync = "batch";
# documents.history_ops = 100000 (more than any document gets in a run), idle_unload_ms
# = 2000, ring_capacity = 128 (so that stalls of seconds overflow it); limits.max_sync_bytes
# = 65536 (recoveries take several pages). Checks (docs/soak.md): 1-3 by the client
# (per-client order/gaps/recovery, acked operations in the history, RSS), 4 here: no
# panic and no ERROR line in the relay's log (WARNs counted by message), GET /healthz
# 200 at the end, exit status 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES=10
CLIENTS=2000
DOCS=200
CORES=all
CLIENT_CPUS=
OUT=target/soak
KEEP=0
BUILD=1
ALLOW_LOG=
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --minutes) MINUTES=$2; shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --docs) DOCS=$2; shift 2 ;;
        --cores) CORES=$2; shift 2 ;;
        --client-cpus) CLIENT_CPUS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep-storage) KEEP=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --allow-log) ALLOW_LOG=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

log() { printf '[soak.sh] %s\n' "$*" >&2; }
mkdir -p "$OUT"

ulimit -n "$(ulimit -H -n)" 2>/dev/null || true
ulimit -l "$(ulimit -H -l)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# Each process holds one descriptor per connection; churners and the end-of-run
# history check add a few hundred. Keep a margin of 20% and 1000.
if [ "$NOFILE" != unlimited ] && [ $((CLIENTS + CLIENTS / 5 + 1000)) -gt "$NOFILE" ]; then
    log "--clients $CLIENTS is too close to ulimit -n $NOFILE (need clients + 20% + 1000)"
    exit 2
fi

# CPU lists: `all` -> every CPU of this machine; the client gets the rest.
expand() { # LIST -> one CPU id a line
    local part
    for part in ${1//,/ }; do
        if [[ $part == *-* ]]; then seq "${part%-*}" "${part#*-}"; else echo "$part"; fi
    done
}
NCPU=$(nproc --all)
if [ "$CORES" = all ]; then RELAY_CPUS=$(seq 0 $((NCPU - 1)) | paste -sd,); else RELAY_CPUS=$(expand "$CORES" | paste -sd,); fi
if [ -z "$CLIENT_CPUS" ]; then
    CLIENT_CPUS=$(seq 0 $((NCPU - 1)) | grep -vxF -f <(expand "$RELAY_CPUS") | paste -sd, || true)
    if [ -z "$CLIENT_CPUS" ]; then
        CLIENT_CPUS=$(seq 0 $((NCPU - 1)) | paste -sd,)
        log "the relay uses every CPU ($RELAY_CPUS): the soak client shares them"
    fi
fi
CLIENT_THREADS=$(expand "$CLIENT_CPUS" | wc -l)

if [ "$BUILD" = 1 ]; then
    log "building release binaries (docrelay, docrelay-soak)"
    cargo build --release -p docrelay -p docrelay-bench >&2
fi
BIN=${CARGO_TARGET_DIR:-target}/release

# An absolute path: with a relative storage.dir every log write fails (EBADF, see docs/soak.md).
STORAGE=$(realpath "$(mktemp -d "$OUT/storage.XXXXXX")")
CONFIG=$OUT/relay.toml
RELAY_LOG=$OUT/relay.log
CLIENT_JSON=$OUT/client.json
SUMMARY=$OUT/summary.json
rm -f "$CLIENT_JSON" "$SUMMARY"
cat > "$CONFIG" <<EOF
listen = "127.0.0.1:0"

[limits]
max_sync_bytes = 65536

[documents]
history_ops = 100000
idle_unload_ms = 2000
ring_capacity = 128

[storage]
dir = "$STORAGE"
fsync = "batch"
EOF

RELAY_PID=
cleanup() {
    if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
        kill -KILL "$RELAY_PID" 2>/dev/null || true
        wait "$RELAY_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = 0 ]; then rm -rf "$STORAGE"; fi
}
trap cleanup EXIT

NO_COLOR=1 RUST_LOG=${RUST_LOG:-info} taskset -c "$RELAY_CPUS" \
    "$BIN/docrelay" serve --config "$CONFIG" --cores "$RELAY_CPUS" 2> "$RELAY_LOG" &
RELAY_PID=$!
ADDR=
for _ in $(seq 300); do
    ADDR=$(grep -o 'listening on [0-9.:]*' "$RELAY_LOG" | head -1 | awk '{print $3}') || true
    [ -n "$ADDR" ] && break
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
        cat "$RELAY_LOG" >&2
        log "the relay exited at start"
        exit 1
    fi
    sleep 0.1
done
if [ -z "$ADDR" ]; then
    cat "$RELAY_LOG" >&2
    log "the relay never listened"
    exit 1
fi
log "relay pid $RELAY_PID on $ADDR, CPUs $RELAY_CPUS, storage $STORAGE; client on CPUs $CLIENT_CPUS ($CLIENT_THREADS threads)"

START=$(date +%s)
CLIENT_RC=0
taskset -c "$CLIENT_CPUS" "$BIN/docrelay-soak" --addr "$ADDR" --relay-pid "$RELAY_PID" \
    --clients "$CLIENTS" --docs "$DOCS" --minutes "$MINUTES" --threads "$CLIENT_THREADS" \
    --idle-unload-ms 2000 --json "$CLIENT_JSON" "${EXTRA[@]}" | tee "$OUT/client.txt" || CLIENT_RC=$?
log "soak client exited with $CLIENT_RC"

# Diagnostic for a failed RSS check: is the memory leaked, or freed and kept by glibc's
# malloc? malloc_trim(0) in the relay (through gdb) returns what is free to the system.
TRIM_KIB=
if command -v gdb >/dev/null && [ -s "$CLIENT_JSON" ] && kill -0 "$RELAY_PID" 2>/dev/null \
    && python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["checks"]["rss"]["pass"] else 1)' "$CLIENT_JSON"; then
    :
elif command -v gdb >/dev/null && kill -0 "$RELAY_PID" 2>/dev/null; then
    log "RSS check failed: calling malloc_trim(0) in the relay (gdb) to tell leaked from retained memory"
    timeout 60 gdb -p "$RELAY_PID" -batch -ex 'call (int) malloc_trim(0)' >/dev/null 2>&1 || true
    TRIM_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$RELAY_PID/status" 2>/dev/null || true)
fi

# Check 4: healthy at the end, exits 0 on SIGTERM, no panic or ERROR in its log.
HEALTH=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://$ADDR/healthz" || true)
STILL_RUNNING=0
kill -0 "$RELAY_PID" 2>/dev/null && STILL_RUNNING=1
kill -TERM "$RELAY_PID" 2>/dev/null || true
EXIT_RC=timeout
for _ in $(seq 300); do
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
        EXIT_RC=0
        wait "$RELAY_PID" || EXIT_RC=$?
        break
    fi
    sleep 0.1
done
RELAY_PID_DONE=$RELAY_PID
if [ "$EXIT_RC" = timeout ]; then kill -KILL "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; fi
RELAY_PID=
ELAPSED=$(( $(date +%s) - START ))
STORAGE_BYTES=$(du -sb "$STORAGE" 2>/dev/null | cut -f1 || echo 0)

python3 - "$CLIENT_JSON" "$RELAY_LOG" "$SUMMARY" "$HEALTH" "$EXIT_RC" "$STILL_RUNNING" "$CLIENT_RC" \
    "$ELAPSED" "$RELAY_CPUS" "$CLIENT_CPUS" "$MINUTES" "$STORAGE_BYTES" "$RELAY_PID_DONE" "$ALLOW_LOG" "$TRIM_KIB" <<'PY'
import json, re, sys, collections
(client_json, relay_log, summary, health, exit_rc, still_running, client_rc,
 elapsed, relay_cpus, client_cpus, minutes, storage_bytes, pid, allow_log, trim_kib) = sys.argv[1:]
allow = re.compile(allow_log) if allow_log else None
try:
    with open(client_json) as f:
        c = json.load(f)
except Exception as e:
    c = {"error": f"no client results ({e})", "checks": {}}

levels = collections.Counter()
warns = collections.Counter()
errors = collections.Counter()
allowed = collections.Counter()
panics = []
line_re = re.compile(r'\s(TRACE|DEBUG|INFO|WARN|ERROR)\s+(.*)$')
with open(relay_log, errors="replace") as f:
    for line in f:
        line = line.rstrip("\n")
        if "panicked" in line or "RUST_BACKTRACE" in line:
            panics.append(line[:300])
        m = line_re.search(line)
        if not m:
            continue
        level, rest = m.groups()
        levels[level] += 1
        # `span{..}: target: message key=value ...` -> `target: message`
        parts = rest.split(": ")
        tgt = next((i for i, p in enumerate(parts) if p.startswith("docrelay")), None)
        msg = ": ".join(parts[tgt:]) if tgt is not None else rest
        msg = re.split(r'\s\w+=', msg, maxsplit=1)[0]
        if level == "WARN":
            warns[msg] += 1
        elif level == "ERROR" and allow and allow.search(line):
            allowed[msg] += 1
        elif level == "ERROR":
            errors[msg] += 1

check4 = (not panics and not errors and health == "200" and exit_rc == "0" and still_running == "1")
checks = c.get("checks", {})
checks["relay_health"] = {
    "pass": check4,
    "panics": len(panics), "panic_lines": panics[:5],
    "error_lines": sum(errors.values()), "errors_by_message": dict(errors),
    "allowed_error_lines": sum(allowed.values()), "allowed_errors_by_message": dict(allowed), "allow_regex": allow_log,
    "warn_lines": sum(warns.values()), "warns_by_message": dict(warns),
    "log_lines_by_level": dict(levels),
    "running_at_end": still_running == "1", "healthz": health, "exit_status_on_sigterm": exit_rc,
}
c["checks"] = checks
c["relay"] = {"pid": int(pid), "cpus": relay_cpus, "storage_bytes_at_end": int(storage_bytes or 0)}
c["client_cpus"] = client_cpus
if trim_kib:
    c.setdefault("rss_kib", {})["after_malloc_trim"] = int(trim_kib)
    checks.get("rss", {})["after_malloc_trim_kib"] = int(trim_kib)
c["wall_secs"] = int(elapsed)
c["command"] = f"scripts/soak.sh --minutes {minutes}"
names = [("order_gaps_recovery", "1 order, gaps, lag recovery"), ("acked_in_history", "2 acked ops in history"),
         ("rss", "3 RSS bounded"), ("relay_health", "4 no panic/ERROR, healthz, exit 0")]
ok = all(checks.get(k, {}).get("pass") for k, _ in names) and client_rc == "0"
c["pass"] = ok
with open(summary, "w") as f:
    json.dump(c, f, indent=2)

def g(*path, default="-"):
    v = c
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return default
        v = v[p]
    return v

mib = lambda k: "-" if k in (None, "-") else f"{k / 1024:.1f}"
print()
print("==================== docrelay soak summary ====================")
print(f"command: scripts/soak.sh --minutes {minutes}   (wall {elapsed} s; relay CPUs {relay_cpus}, client CPUs {client_cpus})")
print(f"clients {g('clients')}, documents {g('documents')} ({g('hot_documents')} hot), "
      f"per core at start: documents {g('documents_per_core_at_start')}, sessions {g('sessions_per_core_at_start')}")
print(f"behaviours {g('behaviour_secs', default=0):.0f} s; phases {g('phases')}")
print(f"ops: sent {g('ops','sent')}, acked {g('ops','acked')}, unavailable {g('ops','unavailable')}, "
      f"unacked at a drop {g('ops','unacked_at_drop')}, delivered {g('ops','delivered')}, in history {g('ops','in_history')}")
print(f"lag: {g('lag','lagged_notices')} lagged notices, {g('lag','recoveries')} recoveries, "
      f"{g('lag','sync_requests')} sync requests / {g('lag','sync_pages')} pages / {g('lag','sync_ops')} ops")
print(f"connections: {g('connections','connects')} connects, {g('connections','reconnects')} reconnects "
      f"({g('connections','vanishes')} vanishes, {g('connections','rejoins_with_since')} rejoins with since, "
      f"{g('connections','continuations_complete')} continuations complete, {g('connections','churn_cycles')} churn cycles), "
      f"{g('connections','lost')} lost")
print(f"relay RSS: start {mib(g('rss_kib','start', default=None))} MiB, max {mib(g('rss_kib','max', default=None))} MiB, "
      f"end {mib(g('rss_kib','end', default=None))} MiB (bound {mib(g('rss_kib','bound', default=None))} MiB), "
      f"after reload+unload {mib(g('rss_kib','after_reload_and_unload', default=None))} MiB; "
      f"storage at end {int(storage_bytes or 0) / 2**20:.0f} MiB")
for key, name in names:
    ch = checks.get(key, {})
    status = "PASS" if ch.get("pass") else "FAIL"
    if key == "order_gaps_recovery":
        detail = f"{ch.get('violations','-')} violations on {ch.get('clients_with_violations','-')} clients {ch.get('by_kind', {})}"
    elif key == "acked_in_history":
        detail = f"{ch.get('acked_checked','-')} acked ops checked, {ch.get('missing','-')} missing, {ch.get('mismatched','-')} mismatched, {len(ch.get('documents_with_problems', []))} documents with problems"
    elif key == "rss":
        detail = f"end {mib(ch.get('end_kib'))} MiB vs bound {mib(ch.get('bound_kib'))} MiB ({ch.get('rule','-')})"
        if ch.get("after_malloc_trim_kib"):
            detail += f"; {mib(ch['after_malloc_trim_kib'])} MiB after malloc_trim(0) in the relay (freed memory kept by glibc malloc, not leaked, if it drops to about the start)"
    else:
        detail = (f"panics {ch['panics']}, ERROR lines {ch['error_lines']}, WARN lines {ch['warn_lines']}, "
                  f"healthz {ch['healthz']}, exit on SIGTERM {ch['exit_status_on_sigterm']}")
    print(f"check {name}: {status} - {detail}")
for msg, n in sorted(warns.items(), key=lambda kv: -kv[1]):
    print(f"  WARN x{n}: {msg}")
for msg, n in sorted(errors.items(), key=lambda kv: -kv[1]):
    print(f"  ERROR x{n}: {msg}")
for msg, n in sorted(allowed.items(), key=lambda kv: -kv[1]):
    print(f"  ERROR x{n} (allowed by --allow-log): {msg}")
for p in panics[:5]:
    print(f"  panic: {p}")
print(f"overall: {'PASS' if ok else 'FAIL'}   (JSON: {summary})")
sys.exit(0 if ok else 1)
PY
