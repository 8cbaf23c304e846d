#!/usr/bin/env bash
# Nightly: embed the input files that are new since the last run (same job file, same OUTPUT: finished shards
# are kept, new files planned and embedded), then bring the FAISS index up to date (`index update`: new vector
# parts added, vanished ones removed; `index build` when there is no index yet, or when update says a rebuild is
# due; a build takes the job file's `index:` options).
#
# Usage: jobs/cron/nightly.sh JOB.yaml [more `embed-corpus run` arguments, not --output: the job file names it]
#
# Example crontab line (02:30 every night; the script logs to a file itself, cron mails only failures):
#   30 2 * * *  /srv/embed-corpus/jobs/cron/nightly.sh /srv/embed-corpus/jobs/corpus.yaml >/dev/null
#
# Runs never overlap: the script holds an exclusive flock on NIGHTLY_LOCK for its whole run (the embedding
# processes inherit it, so even a killed script's leftover workers keep the lock until they end). A second run
# that finds the lock taken does NOT wait by default: it logs "skipped", prints it, and exits 0, because the run
# holding the lock will embed everything anyway and nightly runs must not pile up behind a long one. Set
# NIGHTLY_WAIT=SECONDS to wait for the lock instead (then exit 0 "skipped" if it is still held).
#
# Environment:
#   EMBED_REPO      directory the job's relative paths are taken from (default: the repository of this script)
#   EMBED_VENV      virtual environment to use (default: EMBED_REPO/.venv when it exists)
#   EMBED_CORPUS    the embed-corpus command (default: from EMBED_VENV, else from PATH)
#   NIGHTLY_LOG     log file, appended to (default: OUTPUT/logs/nightly.log)
#   NIGHTLY_LOCK    lock file (default: OUTPUT/.nightly.lock; one lock per output directory)
#   NIGHTLY_WAIT    seconds to wait for a running night (default 0: skip at once)
#   NIGHTLY_REBUILD auto (default: rebuild when `index update` says it is due) | never | always
#
# Exit codes: 0 done or skipped; 75 the embedding was stopped by a signal (the next run resumes); 2 usage or
# setup error; any other: a step failed (its output is in the log; one line goes to stderr, for cron's mail).
set -uo pipefail

say() { printf '%s nightly[%s]: %s\n' "$(date '+%F %T')" "$$" "$*"; }
fail() { local rc="$1"; shift; say "FAILED: $*"; echo "nightly: FAILED: $* (log: ${log:-none})" >&"${err_fd:-2}"; exit "$rc"; }

if [[ $# -lt 1 ]]; then
    echo "usage: $0 JOB.yaml [embed-corpus run arguments]" >&2
    exit 2
fi
job="$1"
shift
for arg in "$@"; do  # the lock, the log and the index steps follow the job file's output: so must the run
    case "$arg" in
        --output | --output=*)
            echo "nightly: give the output directory in $job, not as $arg (the index steps use the job file's)" >&2
            exit 2 ;;
    esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="${EMBED_REPO:-$(cd "$here/../.." && pwd)}"
cd "$repo" || { echo "nightly: cannot cd to $repo" >&2; exit 2; }
if [[ -z "${EMBED_CORPUS:-}" ]]; then
    venv="${EMBED_VENV:-$repo/.venv}"
    if [[ -f "$venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        . "$venv/bin/activate"
    fi
    EMBED_CORPUS=embed-corpus
fi
corpus_bin="$(command -v "$EMBED_CORPUS")" || { echo "nightly: $EMBED_CORPUS not found" >&2; exit 2; }
# The interpreter of that install reads the job file the way embed-corpus does.
python="$(dirname "$corpus_bin")/python"
[[ -x "$python" ]] || python=python3
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

out="$("$python" -c 'import sys
from pathlib import Path
from pipeline.job.config import load_job_file
print(Path(load_job_file(sys.argv[1]).get("output") or "").resolve())' "$job")" || {
    echo "nightly: cannot read the job file $job" >&2
    exit 2
}
if [[ "$out" == "$PWD" ]]; then
    echo "nightly: $job names no output directory" >&2
    exit 2
fi

mkdir -p "$out/logs"
log="${NIGHTLY_LOG:-$out/logs/nightly.log}"
lock="${NIGHTLY_LOCK:-$out/.nightly.lock}"
exec {err_fd}>&2  # kept for the one-line failure message
exec >> "$log" 2>&1

command -v flock > /dev/null || fail 2 "flock is not installed (util-linux): runs could overlap"
exec {lock_fd}> "$lock" || fail 2 "cannot open the lock file $lock"
wait_s="${NIGHTLY_WAIT:-0}"
if [[ "$wait_s" -gt 0 ]]; then
    say "waiting up to ${wait_s}s for the lock $lock"
    flock -w "$wait_s" "$lock_fd"
else
    flock -n "$lock_fd"
fi
held=$?
if [[ $held -eq 1 ]]; then  # flock's 1: the lock is held (or the wait ran out); anything else is an error
    say "skipped: another nightly run holds $lock"
    echo "nightly: skipped: another run holds $lock (see $log)" >&"$err_fd"
    exit 0
elif [[ $held -ne 0 ]]; then
    fail 2 "flock $lock failed (exit $held)"
fi

say "start: $job -> $out"
# --no-index: the index steps below are this script's (a build, or an update whose rebuild advice it follows)
say "$EMBED_CORPUS run $job --quiet --no-index $*"
"$EMBED_CORPUS" run "$job" --quiet --no-index "$@"
rc=$?
if [[ $rc -eq 75 ]]; then
    fail 75 "the embedding stopped before the end (a signal, or another run replaced its plan); the next run resumes it"
elif [[ $rc -ne 0 ]]; then
    fail "$rc" "embed-corpus run exited $rc"
fi
"$EMBED_CORPUS" status "$out" || fail 1 "embed-corpus status failed"

rebuild="${NIGHTLY_REBUILD:-auto}"
if [[ ! -f "$out/index/info.json" || "$rebuild" == always ]]; then
    say "$EMBED_CORPUS index build $out --job $job"
    "$EMBED_CORPUS" index build "$out" --job "$job" || fail 1 "embed-corpus index build failed"
else
    say "$EMBED_CORPUS index update $out"
    info="$("$EMBED_CORPUS" index update "$out" --json)" || fail 1 "embed-corpus index update failed"
    reasons="$(printf '%s' "$info" | "$python" -c 'import json, sys
print("; ".join(json.load(sys.stdin).get("rebuild_reasons") or []))')" || fail 1 "cannot read the output of index update"
    say "index: $(printf '%s' "$info" | "$python" -c 'import json, sys
i = json.load(sys.stdin)
gone = len(i.get("removed_parts") or [])
print("%s vectors added, %s in all%s" % (i.get("added", 0), i.get("live", i.get("ntotal")),
      ", %d vanished parts removed" % gone if gone else ""))')"
    if [[ -n "$reasons" && "$rebuild" == auto ]]; then
        say "rebuild due: $reasons"
        "$EMBED_CORPUS" index build "$out" --job "$job" || fail 1 "embed-corpus index build failed"
    elif [[ -n "$reasons" ]]; then
        say "rebuild due (NIGHTLY_REBUILD=never, not rebuilding): $reasons"
    fi
fi
say "done"
