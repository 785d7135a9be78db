# shellcheck shell=bash
# xenbackd-hotplug-common.sh — what xenbackd's hotplug scripts share.
# Sourced (never run) by xenbackd-block and xenbackd-vif-bridge, and for
# `log` and `xenbackd_binary` by xenbackd-udev and xenbackd-daemon; it
# is installed beside them. Sourcing only defines things: the caller sets
# ME (its name) first and calls what it needs.
#
# One deadline per run. libxl gives a hotplug script 40 s
# (LIBXL_HOTPLUG_TIMEOUT) and then kills it, leaving only "timed out" in
# `xl create`'s output. So everything a script waits for (the host-wide
# lock, each xenstore call, xenbackd check-disk, lvchange, udev) shares one
# deadline, HOTPLUG_DEADLINE seconds after the script started (35), and
# the seconds left after it are for writing the reason: no wait has a cap of
# its own. A wait that reaches the deadline fails the run with "timed out
# after N s waiting for WHAT", in `hotplug-error` and in the log.
#
# Environment (all optional):
#   XENBACKD_HOTPLUG_LOG       log file (default /var/log/xenbackd-hotplug.log)
#   XENBACKD_HOTPLUG_LOCK      lock file (default /run/xenbackd/hotplug.lock)
#   XENBACKD_HOTPLUG_DEADLINE  the deadline in seconds (default 35; tests)
#   XENBACKD_BACKEND_DOMID     this (backend) domain's id, for a relative
#                              XENBUS_PATH (default 0, dom0)
#   XENBACKD_BIN               the xenbackd binary (default: PREFIX/sbin
#                              beside PREFIX/lib/xenbackd, then PATH)
#   XENSTORED_PATH             honoured by the xenstore-* tools

readonly LOG_FILE="${XENBACKD_HOTPLUG_LOG:-/var/log/xenbackd-hotplug.log}"
readonly LOCK_FILE="${XENBACKD_HOTPLUG_LOCK:-/run/xenbackd/hotplug.lock}"
readonly LIBXL_HOTPLUG_TIMEOUT=40
readonly HOTPLUG_DEADLINE="${XENBACKD_HOTPLUG_DEADLINE:-35}"
# Writing a failure's reason may take this long after the deadline.
readonly REPORT_TIME=3
# $EPOCHREALTIME without its dot: microseconds.
readonly STARTED_US=${EPOCHREALTIME/./}
readonly DEADLINE_US=$((STARTED_US + HOTPLUG_DEADLINE * 1000000))

BACKEND=""      # absolute xenstore path of the backend directory
FINISHED=0      # set once hotplug-status has been written

# ---------------------------------------------------------------- logging

# One line per step, with the device, so that concurrent runs read apart.
log() {
    local line
    line="$(date '+%Y-%m-%dT%H:%M:%S%z') ${ME}[$$] ${XENBUS_PATH:-?}: $*"
    if ! { printf '%s\n' "$line" >>"$LOG_FILE"; } 2>/dev/null; then
        printf '%s\n' "$line" >&2
    fi
}

# Tools' own error messages go to the log too (libxl discards them); fd 3
# keeps the caller's stderr for the one-line reason.
open_log() {
    mkdir -p "$(dirname "$LOG_FILE")" 2>/dev/null || true
    if { : >>"$LOG_FILE"; } 2>/dev/null; then
        exec 3>&2 2>>"$LOG_FILE"
    else
        exec 3>&2
    fi
}

# The xenbackd binary: $XENBACKD_BIN, else PREFIX/sbin/xenbackd beside this
# file's PREFIX/lib/xenbackd, else the one on PATH, else /usr/local/sbin's.
xenbackd_binary() {
    local here
    if [ -n "${XENBACKD_BIN:-}" ]; then
        echo "$XENBACKD_BIN"
        return
    fi
    here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
    if [ -x "$here/../../sbin/xenbackd" ]; then
        readlink -f "$here/../../sbin/xenbackd"
    elif command -v xenbackd >/dev/null 2>&1; then
        command -v xenbackd
    else
        echo /usr/local/sbin/xenbackd
    fi
}

# ---------------------------------------------------------------- the deadline

now_us() { echo "${EPOCHREALTIME/./}"; }

# Microseconds as seconds with one decimal ("2.5 s" reads better than "2 s").
seconds_text() {
    local us=$1
    ((us < 0)) && us=0
    printf '%d.%d s' $((us / 1000000)) $((us % 1000000 / 100000))
}

# LEFT: what is left of the deadline, as seconds for timeout(1) and flock(1);
# returns 1 when nothing is.
LEFT=0
set_left() {
    local left_us=$((DEADLINE_US - ${EPOCHREALTIME/./}))
    ((left_us > 0)) || return 1
    printf -v LEFT '%d.%03d' $((left_us / 1000000)) $((left_us % 1000000 / 1000))
}

timed_out() {
    local what=$1 since_us=$2
    fatal "timed out after $(seconds_text $(($(now_us) - since_us))) waiting for $what" \
        "(the hotplug deadline, ${HOTPLUG_DEADLINE} s of libxl's ${LIBXL_HOTPLUG_TIMEOUT} s, has passed)"
}

# bounded WHAT CMD...: runs CMD until the deadline at most. Its exit status
# is the caller's to judge, unless it was still running at the deadline:
# then the run fails, naming WHAT and how long it waited.
bounded() {
    local what=$1 since status=0
    shift
    since=$(now_us)
    set_left || timed_out "$what" "$since"
    timeout -k 1 "$LEFT" "$@" || status=$?
    if ((status == 124 || status == 137)) && ! set_left; then timed_out "$what" "$since"; fi
    return "$status"
}

# capture VAR WHAT CMD...: `bounded`, with CMD's standard output (trailing
# newlines dropped) in the variable VAR. Not $(...): a timeout in a
# subshell could not end the script. Needs arm_traps's SCRATCH.
SCRATCH=""
capture() {
    local -n _capture_into=$1
    local what=$2 status=0
    shift 2
    bounded "$what" "$@" >"$SCRATCH" || status=$?
    _capture_into=$(<"$SCRATCH")
    return "$status"
}

# ---------------------------------------------------------------- xenstore

# -R (raw: no escaping of the value) exists in Xen ≥ 4.x's tools; use it
# when there, so paths with backslashes survive (arm_traps looks: `-h`
# answers at once, without xenstored).
XS_RAW=()

# xs_read VAR PATH: the value, or status 1 when the node does not exist.
xs_read() { capture "$1" "xenstore-read $2" xenstore-read "${XS_RAW[@]}" "$2"; }

xs_exists() { bounded "xenstore-exists $1" xenstore-exists "$1"; }

# Writes PATH VALUE pairs in one transaction.
xs_write() {
    log "write $*"
    bounded "xenstore-write of $1" xenstore-write "${XS_RAW[@]}" "$@"
}

# LS_KEY, LS_VALUE: one line of `xenstore-ls -f` ("PATH = \"VALUE\"").
LS_KEY="" LS_VALUE=""
split_ls_line() {
    LS_KEY=${1%% = \"*}
    LS_VALUE=${1#* = \"}
    LS_VALUE=${LS_VALUE%\"}
    LS_VALUE=${LS_VALUE//\\\\/\\}
}

# BKEY[KEY]: the backend directory's own keys, from one xenstore-ls;
# returns 1 when the directory is gone.
declare -A BKEY=()
# shellcheck disable=SC2034  # BKEY is read by the sourcing script
read_backend_keys() {
    local listing line
    BKEY=()
    capture listing "xenstore-ls -f $BACKEND" xenstore-ls -f "$BACKEND" 2>/dev/null || return 1
    while IFS= read -r line; do
        split_ls_line "$line"
        [[ $LS_KEY == "$BACKEND"/* && $LS_KEY != "$BACKEND"/*/* ]] || continue
        BKEY[${LS_KEY#"$BACKEND"/}]=$LS_VALUE
    done <<<"$listing"
}

# ---------------------------------------------------------------- outcome

# Reports failure to libxl and xenbackd, and exits 1. hotplug-error goes in
# the same transaction as hotplug-status, so a watcher of hotplug-status
# always finds the reason. Nothing is written if the backend directory is
# already gone (a write would create it again). The report has REPORT_TIME
# seconds of its own: the deadline may be spent.
fatal() {
    local reason="$*"
    log "error: $reason"
    printf '%s: %s\n' "$ME" "$reason" >&3 2>/dev/null || true
    if [ -n "$BACKEND" ] && [ "$FINISHED" = 0 ]; then
        FINISHED=1
        local report_end_us=$(($(now_us) + REPORT_TIME * 1000000))
        if timeout "$REPORT_TIME" xenstore-exists "$BACKEND" 2>/dev/null; then
            timeout "$(report_time_left "$report_end_us")" xenstore-write "${XS_RAW[@]}" \
                "$BACKEND/hotplug-error" "$reason" "$BACKEND/hotplug-status" error ||
                log "could not write hotplug-status=error within ${REPORT_TIME} s"
        else
            log "backend directory is gone (or xenstore did not answer within ${REPORT_TIME} s); nothing written"
        fi
    fi
    exit 1
}

# Seconds from now to $1 (microseconds), at least 0.1: the report's time.
report_time_left() {
    local left_ms=$((($1 - $(now_us)) / 1000))
    ((left_ms >= 100)) || left_ms=100
    printf '%d.%03d' $((left_ms / 1000)) $((left_ms % 1000))
}

# Writes KEY VALUE pairs (relative to the backend) and hotplug-status =
# connected in one transaction. A reason left by an earlier failed run
# ($1 = 1: there is one) would mislead whoever reads it: removed first.
succeed() {
    local stale_error=$1 args=()
    shift
    while (($# >= 2)); do
        args+=("$BACKEND/$1" "$2")
        shift 2
    done
    if [ "$stale_error" = 1 ]; then
        bounded "xenstore-rm of the old hotplug-error" xenstore-rm "$BACKEND/hotplug-error" || true
    fi
    xs_write "${args[@]}" "$BACKEND/hotplug-status" connected || fatal "cannot write hotplug-status"
    FINISHED=1
    log "hotplug-status=connected ($(seconds_text $(($(now_us) - STARTED_US))))"
}

# Any unexpected failure (set -e) still leaves a reason in xenstore. In a
# subshell ($(...)) just pass the status up: the main shell reports it.
on_err() {
    [ "$BASHPID" = "$$" ] || exit "$2"
    fatal "internal error in $ME at line $1 (exit $2)"
}

on_exit() { [ -z "$SCRATCH" ] || rm -f "$SCRATCH" "$SCRATCH".*; }

# ---------------------------------------------------------------- one run

# BACKEND from XENBUS_PATH (relative to this domain's home, or absolute);
# exits 1 without it.
resolve_backend() {
    if [ -z "${XENBUS_PATH:-}" ]; then
        log "XENBUS_PATH is not set"
        printf '%s: XENBUS_PATH is not set\n' "$ME" >&3
        exit 1
    fi
    case $XENBUS_PATH in
    /*) BACKEND=$XENBUS_PATH ;;
    *) BACKEND="/local/domain/${XENBACKD_BACKEND_DOMID:-0}/$XENBUS_PATH" ;;
    esac
}

# One hotplug script at a time on this host: a sharing check must not race
# another guest's add of the same disk. The wait counts against the deadline.
take_lock() {
    local since
    since=$(now_us)
    mkdir -p "$(dirname "$LOCK_FILE")"
    exec 9>>"$LOCK_FILE"
    set_left || timed_out "the hotplug lock $LOCK_FILE" "$since"
    if ! flock -w "$LEFT" 9; then
        timed_out "the hotplug lock $LOCK_FILE (held by another hotplug script)" "$since"
    fi
    log "lock taken after $(seconds_text $(($(now_us) - since)))"
}

# The traps every hotplug run sets before its first step, and its scratch
# file (SCRATCH, and SCRATCH.* beside it, removed at exit).
arm_traps() {
    trap on_exit EXIT
    SCRATCH=$(mktemp "${TMPDIR:-/tmp}/xenbackd-hotplug.XXXXXX")
    trap 'on_err $LINENO $?' ERR
    if xenstore-read -h 2>&1 | grep -q -- '-R'; then XS_RAW=(-R); fi
}
