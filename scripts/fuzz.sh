#!/usr/bin/env bash
# Builds and runs the cargo-fuzz targets in fuzz/ (docs/fuzzing.md), one after
# the other, each for the given seconds (default 60), one process each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]     (default: every target)
#
# Each run starts from the committed seed corpus fuzz/corpus/TARGET, which it
# only reads: new inputs go to a scratch corpus (a temporary directory, or
# FUZZ_CORPUS_DIR/TARGET when FUZZ_CORPUS_DIR is set, kept for the next run).
# Prints, per target, libFuzzer's final figures (executions, exec/s, cov, ft,
# corpus) and whether it found a crash; a crash input is saved under
# fuzz/artifacts/TARGET/ and the script exits non-zero. Full logs go to
# FUZZ_LOG_DIR (default fuzz/target/logs). Extra libFuzzer flags: FUZZ_ARGS.
#
# Needs nightly Rust (`rustup toolchain install nightly`); installs
# cargo-fuzz with `cargo install` when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET ...]" >&2
    exit 2
fi
all=(http_head ws_frames client_message store_record)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# Per target: the longest input libFuzzer makes. The HTTP head goes past
# limits.max_head_bytes (8192); segments past a few 4096-byte blocks.
declare -A max_len=([http_head]=9000 [ws_frames]=4096 [client_message]=4096 [store_record]=16384)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: nightly Rust is needed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The fuzz crate keeps its own build, whatever CARGO_TARGET_DIR says.
fuzz_target_dir="$root/fuzz/target"
log_dir=${FUZZ_LOG_DIR:-$fuzz_target_dir/logs}
mkdir -p "$log_dir"
if [ ${#targets[@]} -eq 1 ]; then
    cargo +nightly fuzz build --target-dir "$fuzz_target_dir" "${targets[0]}"
else
    cargo +nightly fuzz build --target-dir "$fuzz_target_dir"
fi

# A value from libFuzzer's output: the last match of a pattern's group.
last() { grep -oE "$1" "$2" | tail -n 1 | sed -E "s|$1|\\1|" || true; }

summary=()
failed=0
for t in "${targets[@]}"; do
    if [ ! -d "fuzz/corpus/$t" ]; then
        echo "fuzz.sh: no target $t (fuzz/corpus/$t is missing)" >&2
        exit 2
    fi
    if [ -n "${FUZZ_CORPUS_DIR:-}" ]; then
        scratch="$FUZZ_CORPUS_DIR/$t"
        mkdir -p "$scratch"
    else
        scratch=$(mktemp -d "${TMPDIR:-/tmp}/docrelay-fuzz-$t.XXXXXX")
    fi
    log="$log_dir/$t.log"
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=("-dict=fuzz/dict/$t.dict")
    echo "== $t: ${seconds}s, log $log"
    set +e
    # The scratch corpus first: libFuzzer writes new inputs to the first
    # directory only, so the committed seeds stay as they are.
    # shellcheck disable=SC2086
    cargo +nightly fuzz run --target-dir "$fuzz_target_dir" "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -max_len="${max_len[$t]:-4096}" \
        -timeout=10 -rss_limit_mb=2048 "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    set -e
    execs=$(last 'stat::number_of_executed_units: *([0-9]+)' "$log")
    rate=$(last 'stat::average_exec_per_sec: *([0-9]+)' "$log")
    cov=$(last ' cov: ([0-9]+)' "$log")
    ft=$(last ' ft: ([0-9]+)' "$log")
    corp=$(last ' corp: ([0-9]+/[0-9]+[a-zA-Z]*)' "$log")
    crash=no
    if [ $rc -ne 0 ] || grep -qE 'ERROR: (libFuzzer|AddressSanitizer)|panicked at' "$log"; then
        crash="YES (rc $rc): $(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/Test unit written to //')"
        failed=1
        grep -E 'panicked at|ERROR: ' -A4 "$log" | head -n 20 || true
    fi
    line=$(printf '%-15s executions %-10s exec/s %-7s cov %-6s ft %-6s corpus %-12s crash %s' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crash")
    echo "$line"
    summary+=("$line")
    [ -n "${FUZZ_CORPUS_DIR:-}" ] || rm -rf "$scratch"
done

echo
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit $failed
