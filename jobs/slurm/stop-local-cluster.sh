#!/usr/bin/env bash
# Stop the daemons that start-local-cluster.sh started, by the PIDs it recorded (and only if each PID is still
# that daemon): slurmd, slurmctld, then munged. Safe to run when nothing was started.
set -uo pipefail

state="${SLURM_LOCAL_STATE:-/run/embed-corpus-slurm}"
pids="$state/pids"
say() { echo "stop-local-cluster: $*" >&2; }
# Running, not a zombie: the daemons' parent (start-local-cluster.sh) is gone, whoever adopted them reaps them.
alive() { [[ -r "/proc/$1/stat" && "$(cut -d ' ' -f 3 "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

if [[ ! -s "$pids" ]]; then
    say "no daemons recorded in $pids: nothing to stop"
    exit 0
fi

# Reverse order of starting: the node, the controller, then the authentication they both use.
mapfile -t entries < <(tac "$pids")
for entry in "${entries[@]}"; do
    read -r name pid <<< "$entry"
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]]; then
        say "$name ($pid) is not running"
        continue
    fi
    kill -TERM "$pid"
    for _ in $(seq 50); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        say "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    say "stopped $name ($pid)"
done
rm -f "$pids"
