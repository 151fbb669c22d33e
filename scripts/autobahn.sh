#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (wstest 0.8.2 fuzzingclient, the standard RFC 6455
# conformance suite) against docrelay's testing echo route and prints a summary.
#
#   scripts/autobahn.sh                 install if needed, build, run, summarise
#   scripts/autobahn.sh --install-only  only make sure wstest is installed
#
# What it does:
#   1. installs wstest once, if missing, into $AUTOBAHN_HOME (see below);
#   2. builds the relay (cargo build --release) unless DOCRELAY_BIN is given;
#   3. starts `docrelay serve` on an ephemeral 127.0.0.1 port with the echo route on;
#   4. runs every case except 12.* and 13.* (permessage-deflate, which docrelay does not
#      offer) and stops the relay again (SIGTERM, also on error or Ctrl-C);
#   5. prints per-behavior counts and every case that is not OK / NON-STRICT /
#      INFORMATIONAL (behavior or closing behavior), writes the same to
#      target/autobahn/summary.txt, and exits non-zero if any case FAILED or is
#      UNIMPLEMENTED, or closed with behaviorClose FAILED or UNCLEAN.
#
# wstest needs Python 2, which current systems lack. The installer unpacks a CPython 2.7
# from Debian 11 (bullseye) packages into a private folder (no root needed for that
# folder; the system's apt/dpkg state is not touched) and pip-installs the suite's pinned
# requirements there (about a minute, once). Needs apt-get, dpkg, python3 with pip, a C
# compiler and network access to a Debian mirror and PyPI. On other systems, point
# WSTEST at any working wstest 0.8.2 (e.g. a wrapper around the
# crossbario/autobahn-testsuite docker image).
#
# Environment:
#   AUTOBAHN_HOME     install folder      (default: $HOME/.cache/docrelay-autobahn)
#   WSTEST            use this wstest instead of installing one
#   DOCRELAY_BIN      use this relay binary instead of building one
#   AUTOBAHN_OUT      report folder       (default: target/autobahn/reports)
#   AUTOBAHN_CASES    comma-separated case patterns (default: *)
#   AUTOBAHN_TIMEOUT  limit for the wstest run, seconds (default: 900)
#   AUTOBAHN_CORES    value of `cores` in the relay config (default: first CPU this
#                     process may run on, as a one-element list)
#   DEBIAN_MIRROR     Debian mirror for the bullseye packages (default: the one apt is
#                     configured with, else http://deb.debian.org/debian)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

AUTOBAHN_HOME=${AUTOBAHN_HOME:-$HOME/.cache/docrelay-autobahn}
WORK=$REPO/target/autobahn
REPORTS=${AUTOBAHN_OUT:-$WORK/reports}
case $REPORTS in /*) ;; *) REPORTS=$REPO/$REPORTS ;; esac
SUMMARY=$WORK/summary.txt
RUN_TIMEOUT=${AUTOBAHN_TIMEOUT:-900}
START_TIMEOUT=30
AGENT=docrelay
ECHO_PATH=/ws/echo

log() { printf '[autobahn] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# 1. wstest
# ---------------------------------------------------------------------------------------

# Pinned like crossbario/autobahn-testsuite docker/Dockerfile and
# autobahntestsuite/requirements.txt (the last versions that work on Python 2.7).
write_requirements() {
    cat > "$1" <<'REQ'
incremental==16.10.1
pyOpenSSL==19.1.0
cryptography==3.3.2
zope.interface==4.6.0
Twisted==19.10.0
txaio==2.1.0
jinja2==2.11.3
markupsafe==1.1.1
Werkzeug==1.0.1
klein==17.10.0
service_identity==18.1.0
unittest2==1.1.0
six==1.16.0
autobahn[twisted,accelerate]==0.10.9
autobahntestsuite==0.8.2
REQ
}

# The Debian mirror apt is configured with (deb822 .sources or one-line .list style),
# skipping the security archive and non-Debian repositories.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local m
    m=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
           grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
         } | grep -i 'debian' | grep -vi 'security' | head -1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

install_wstest() {
    local home=$1 root=$1/root
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        die "installing wstest needs apt-get and dpkg (Debian/Ubuntu); set WSTEST to an existing wstest 0.8.2 instead"
    fi
    command -v python3 >/dev/null || die "python3 is needed"

    local arch multiarch
    arch=$(dpkg --print-architecture)
    case $arch in
        amd64) multiarch=x86_64-linux-gnu ;;
        arm64) multiarch=aarch64-linux-gnu ;;
        *) die "unsupported architecture $arch for the bullseye python2.7 packages" ;;
    esac

    log "installing wstest 0.8.2 on a private CPython 2.7 into $home (about a minute, once)"
    # A half-finished earlier attempt: start the unpacked tree over (the .deb cache stays).
    rm -rf "$root" "$home/wstest" "$home/env.sh"
    mkdir -p "$home/apt/lists/partial" "$home/apt/cache/archives/partial" \
             "$home/debs" "$home/boot" "$root"

    # Ask apt (with private lists and cache) for the Debian 11 packages of python2.7.
    local mirror sec signed=""
    mirror=$(debian_mirror)
    sec=${DEBIAN_SECURITY_MIRROR:-}
    if [ -z "$sec" ]; then
        sec=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
                 grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                   | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
               } | grep -i 'security' | head -1 || true)
    fi
    [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] \
        && signed="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    {
        echo "deb ${signed}$mirror bullseye main"
        [ -z "$sec" ] || echo "deb ${signed}$sec bullseye-security main"
    } > "$home/bullseye.list"
    # Private lists and cache; downloads run as the invoking user (apt's _apt sandbox
    # user cannot write into a home folder).
    local apt_opts=(-o Dir::Etc::SourceList="$home/bullseye.list" -o Dir::Etc::SourceParts=/dev/null
                    -o Dir::State::Lists="$home/apt/lists" -o Dir::Cache="$home/apt/cache"
                    -o APT::Sandbox::User="$(id -un)")
    log "fetching bullseye python2.7 packages from $mirror"
    apt-get "${apt_opts[@]}" update -qq
    (cd "$home/debs" && apt-get "${apt_opts[@]}" download -qq \
        python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib libpython2.7 \
        libpython2.7-dev python2.7-dev libssl1.1 libffi7)
    local d
    for d in "$home"/debs/*.deb; do dpkg -x "$d" "$root"; done
    [ -x "$root/usr/bin/python2.7" ] || die "python2.7 did not unpack into $root"

    # pip/setuptools/wheel for Python 2 (the last releases that support it).
    python3 -m pip download -q --no-deps -d "$home/boot" \
        'pip==20.3.4' 'setuptools==44.1.1' 'wheel==0.36.2'

    cat > "$home/env.sh" <<ENV
export PY2ROOT=$root
export PYTHONHOME=$root/usr
export LD_LIBRARY_PATH=$root/usr/lib/$multiarch\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export PATH=$root/usr/local/bin:$root/usr/bin:\$PATH
export CFLAGS="-I$root/usr/include/python2.7 -I$root/usr/include/$multiarch/python2.7 -I$root/usr/include"
export LDFLAGS="-L$root/usr/lib/$multiarch"
ENV
    write_requirements "$home/requirements.txt"
    (
        # shellcheck source=/dev/null
        . "$home/env.sh"
        py=$root/usr/bin/python2.7
        pipflags=(-q --disable-pip-version-check --no-python-version-warning --no-warn-script-location)
        "$py" "$home/boot/pip-20.3.4-py2.py3-none-any.whl/pip" install "${pipflags[@]}" \
            --no-index --find-links "$home/boot" pip==20.3.4 setuptools==44.1.1 wheel==0.36.2
        "$py" -m pip install "${pipflags[@]}" 'incremental==16.10.1'
        "$py" -m pip install "${pipflags[@]}" --no-build-isolation -r "$home/requirements.txt"
    )
    [ -f "$root/usr/local/bin/wstest" ] || die "pip did not install wstest into $root/usr/local/bin"

    # The wrapper is written last: its presence marks a finished install.
    cat > "$home/wstest" <<W
#!/usr/bin/env bash
. "$home/env.sh"
exec python2.7 -W ignore "$root/usr/local/bin/wstest" "\$@"
W
    chmod +x "$home/wstest"
    log "installed: $home/wstest"
}

if [ -n "${WSTEST:-}" ]; then
    command -v "$WSTEST" >/dev/null || die "WSTEST=$WSTEST is not executable"
else
    WSTEST=$AUTOBAHN_HOME/wstest
    if [ ! -x "$WSTEST" ] || [ ! -f "$AUTOBAHN_HOME/root/usr/local/bin/wstest" ]; then
        install_wstest "$AUTOBAHN_HOME"
    fi
fi
if [ "${1:-}" = "--install-only" ]; then
    log "wstest ready: $WSTEST"
    exit 0
fi

# ---------------------------------------------------------------------------------------
# 2. relay
# ---------------------------------------------------------------------------------------

if [ -n "${DOCRELAY_BIN:-}" ]; then
    BIN=$DOCRELAY_BIN
else
    log "cargo build --release"
    cargo build --release
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/docrelay
    case $BIN in /*) ;; *) BIN=$REPO/$BIN ;; esac
fi
[ -x "$BIN" ] || die "relay binary $BIN not found or not executable"

mkdir -p "$WORK"
CONFIG=$WORK/relay.toml
SPEC=$WORK/spec.json
RELAY_LOG=$WORK/relay.log
rm -f "$SUMMARY"

if [ -n "${AUTOBAHN_CORES:-}" ]; then
    CORES=$AUTOBAHN_CORES
else
    # One core is plenty for the suite; take one this process is allowed to run on
    # (CPU 0 may be outside a container's cpuset).
    CORES="[$(python3 -c 'import os; print(min(os.sched_getaffinity(0)))' 2>/dev/null || echo 0)]"
fi

cat > "$CONFIG" <<TOML
# Written by scripts/autobahn.sh
listen = "127.0.0.1:0"
cores = $CORES

[limits]
# Autobahn 9.* sends messages of up to 16 MiB.
max_message_bytes = 20971520

[testing]
# Every message is echoed back on the connection that sent it.
echo_path = "$ECHO_PATH"
TOML

RELAY_PID=
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$?
    if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
        kill -TERM "$RELAY_PID" 2>/dev/null || true
        local _
        for _ in $(seq 1 100); do
            kill -0 "$RELAY_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$RELAY_PID" 2>/dev/null; then
            log "relay (pid $RELAY_PID) ignored SIGTERM for 10 s; killing it"
            kill -KILL "$RELAY_PID" 2>/dev/null || true
        fi
        local st=0
        wait "$RELAY_PID" 2>/dev/null || st=$?
        [ "$st" -eq 0 ] || log "warning: relay exited with status $st after SIGTERM (log: $RELAY_LOG)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting $BIN serve --config $CONFIG (log: $RELAY_LOG)"
# NO_COLOR keeps tracing's ANSI escapes out of the log so the address can be parsed.
NO_COLOR=1 RUST_LOG=${RUST_LOG:-info} "$BIN" serve --config "$CONFIG" >"$RELAY_LOG" 2>&1 &
RELAY_PID=$!

ADDR=
deadline=$((SECONDS + START_TIMEOUT))
while [ -z "$ADDR" ]; do
    ADDR=$(sed -E 's/\x1b\[[0-9;]*m//g' "$RELAY_LOG" \
             | grep -oE 'listening on [^0-9[]*(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]+' \
             | head -1 | grep -oE '(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]+$' || true)
    [ -n "$ADDR" ] && break
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
        st=0; wait "$RELAY_PID" || st=$?; RELAY_PID=
        tail -n 30 "$RELAY_LOG" >&2 || true
        die "relay exited (status $st) before it was listening"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 30 "$RELAY_LOG" >&2 || true
        die "no 'listening on' line from the relay within ${START_TIMEOUT}s"
    fi
    sleep 0.1
done
URL="ws://$ADDR$ECHO_PATH"
log "relay listening on $ADDR; echo route $URL"

# ---------------------------------------------------------------------------------------
# 3. fuzzingclient
# ---------------------------------------------------------------------------------------

rm -rf "$REPORTS"
mkdir -p "$REPORTS"
python3 - "$SPEC" "$REPORTS" "$AGENT" "$URL" "${AUTOBAHN_CASES:-*}" <<'PY'
import json, sys
spec, outdir, agent, url, cases = sys.argv[1:]
with open(spec, "w") as f:
    json.dump({
        "outdir": outdir,
        "servers": [{"agent": agent, "url": url}],
        "cases": [c.strip() for c in cases.split(",") if c.strip()],
        # permessage-deflate: docrelay does not offer compression.
        "exclude-cases": ["12.*", "13.*"],
        "exclude-agent-cases": {},
    }, f, indent=2)
    f.write("\n")
PY

log "wstest -m fuzzingclient -s $SPEC (limit ${RUN_TIMEOUT}s)"
wst=0
timeout --foreground -k 30 "$RUN_TIMEOUT" "$WSTEST" -m fuzzingclient -s "$SPEC" >"$WORK/wstest.log" 2>&1 || wst=$?
if [ "$wst" -eq 124 ] || [ "$wst" -eq 137 ]; then
    tail -n 20 "$WORK/wstest.log" >&2 || true
    die "wstest did not finish within ${RUN_TIMEOUT}s (log: $WORK/wstest.log)"
fi
[ "$wst" -eq 0 ] || log "warning: wstest exited with status $wst (log: $WORK/wstest.log)"

RELAY_ALIVE=yes
kill -0 "$RELAY_PID" 2>/dev/null || RELAY_ALIVE=no
if [ "$RELAY_ALIVE" = no ]; then
    log "warning: the relay died during the run; last lines of $RELAY_LOG:"
    tail -n 30 "$RELAY_LOG" >&2 || true
fi
[ -f "$REPORTS/index.json" ] || { tail -n 20 "$WORK/wstest.log" >&2 || true; die "no $REPORTS/index.json"; }

# ---------------------------------------------------------------------------------------
# 4. summary
# ---------------------------------------------------------------------------------------

summary_rc=0
python3 - "$REPORTS/index.json" "$SUMMARY" "$URL" "$RELAY_ALIVE" "$REPO" <<'PY' || summary_rc=$?
import json, os, sys
from collections import Counter

index_path, summary_path, url, relay_alive, repo = sys.argv[1:]
with open(index_path) as f:
    index = json.load(f)

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
FAILING = {"FAILED", "UNIMPLEMENTED"}
# behaviorClose: OK, INFORMATIONAL, WRONG CODE and FAILED BY CLIENT (the suite's report
# shows these two as non-strict / almost), UNCLEAN and FAILED (shown as failures: the
# connection was dropped without a clean close, or failed by the wrong endpoint).
CLOSE_ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
CLOSE_FAILING = {"FAILED", "UNCLEAN"}

def case_key(cid):
    return tuple(int(p) if p.isdigit() else p for p in cid.split("."))

def excluded(cid):
    return cid.split(".")[0] in ("12", "13")

def rel(p):
    try:
        r = os.path.relpath(p, repo)
        return p if r.startswith("..") else r
    except ValueError:
        return p

lines = []
failed_total = 0
for agent in sorted(index):
    cases = index[agent]
    behavior = Counter(c.get("behavior", "?") for c in cases.values())
    close = Counter(c.get("behaviorClose", "?") for c in cases.values())
    lines.append("Autobahn|Testsuite 0.8.2 fuzzingclient: agent %s, %s" % (agent, url))
    lines.append("cases run: %d (12.* and 13.* excluded: permessage-deflate not offered)" % len(cases))
    order = BEHAVIORS + sorted(set(behavior) - set(BEHAVIORS))
    lines.append("behavior:       " + "  ".join("%s %d" % (b, behavior.get(b, 0)) for b in order))
    lines.append("behaviorClose:  " + "  ".join("%s %d" % (b, n) for b, n in sorted(close.items())))
    bad = []
    for cid in sorted(cases, key=case_key):
        c = cases[cid]
        b, bc = c.get("behavior", "?"), c.get("behaviorClose", "?")
        if b in ACCEPTED and bc in CLOSE_ACCEPTED:
            continue
        counts = (b in FAILING or bc in CLOSE_FAILING) and not excluded(cid)
        if counts:
            failed_total += 1
        report = c.get("reportfile")
        bad.append("  %-9s behavior=%-13s close=%-13s remoteCloseCode=%-5s %s%s" % (
            cid, b, bc, c.get("remoteCloseCode"),
            rel(os.path.join(os.path.dirname(index_path), report)) if report else "",
            "" if counts else "  (not counted)"))
    if bad:
        lines.append("cases not OK / NON-STRICT / INFORMATIONAL (%d):" % len(bad))
        lines.extend(bad)
    else:
        lines.append("every case OK, NON-STRICT or INFORMATIONAL")
if relay_alive != "yes":
    lines.append("the relay died during the run (see target/autobahn/relay.log)")
    failed_total += 1
lines.append("reports: %s" % rel(os.path.join(os.path.dirname(index_path), "index.html")))
lines.append("RESULT: %s" % ("FAIL (%d failing)" % failed_total if failed_total else "PASS"))
text = "\n".join(lines) + "\n"
sys.stdout.write(text)
with open(summary_path, "w") as f:
    f.write(text)
sys.exit(1 if failed_total else 0)
PY
log "summary written to $SUMMARY"
[ "$wst" -eq 0 ] || exit 1
exit "$summary_rc"
