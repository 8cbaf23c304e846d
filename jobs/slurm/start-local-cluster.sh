#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, as root, for CI and tests/test_slurm.py: munge, slurmctld and
# slurmd (Debian's packages, installed with apt-get when missing). The daemons' PIDs go to $STATE/pids, so that
# stop-local-cluster.sh stops exactly these and nothing else. Idempotent: a cluster already answering is left
# as it is. Not for a real cluster node: it writes /etc/slurm/slurm.conf (and refuses to replace one it did not
# write).
#
# Environment: SLURM_LOCAL_STATE (default /run/embed-corpus-slurm): PIDs and daemon logs.
set -euo pipefail

state="${SLURM_LOCAL_STATE:-/run/embed-corpus-slurm}"
conf=/etc/slurm/slurm.conf
marker="# written by embed-corpus jobs/slurm/start-local-cluster.sh"

say() { echo "start-local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | head -n 1; }

if command -v sinfo >/dev/null && [[ -n "$(node_state)" ]]; then
    say "a cluster is already answering (node $(node_state)); leaving it as it is"
    exit 0
fi
[[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts the daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

if [[ -e "$conf" ]] && ! grep -qxF "$marker" "$conf"; then
    die "$conf exists and was not written by this script: this looks like a real Slurm node; not touching it"
fi
# Settings for a quick test cluster (and only for one): a job that requeued itself may start again after
# cred_expire (default 120 s) and is then started by the next scheduling pass (every 60 s, backfill 30 s), so
# AuthInfo=cred_expire=10 and 2 s passes; MinJobAge=4 keeps `sbatch --wait` polling every 2 s (it backs off to
# 8 s and 32 s while MinJobAge allows), at the cost of finished jobs leaving `squeue`/`scontrol` after seconds.
mkdir -p /etc/slurm
cat > "$conf" <<EOF
$marker
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=4
NodeName=localhost CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

mkdir -p "$state" /run/munge /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown munge:munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating a munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
: > "$state/pids"

# Each daemon runs in the foreground of its own background process (-F / -D), so $! is the daemon itself.
setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F >> "$state/munged.log" 2>&1 &
echo "munged $!" >> "$state/pids"
for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.2
done
munge -n | unmunge >/dev/null || die "munged does not answer (see $state/munged.log)"

# -c: start without the job state of an earlier run of this throw-away cluster.
slurmctld -D -c >> "$state/slurmctld.log" 2>&1 &
echo "slurmctld $!" >> "$state/pids"
slurmd -D -N localhost >> "$state/slurmd.log" 2>&1 &
echo "slurmd $!" >> "$state/pids"

for _ in $(seq 120); do
    case "$(node_state)" in
        idle | mixed | allocated) say "cluster up: node localhost $(node_state), $(nproc) CPUs (PIDs in $state/pids)"
                                  exit 0 ;;
    esac
    sleep 0.5
done
say "the node did not become idle within 60 s: sinfo says '$(node_state)'; logs in $state and /var/log/slurm"
exit 1
