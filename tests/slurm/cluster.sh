#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying launch/slurm.sbatch before a real cluster
# does (docs/slurm.md) and for the SLURM test. Needs root and Debian's slurm-wlm and munge.
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch, squeue, scontrol as usual
#   tests/slurm/cluster.sh stop DIR
set -euo pipefail
action=${1:?start or stop} dir=$(realpath -m "${2:?a folder for the cluster state}")
if [ "$action" = stop ]; then
    for daemon in slurmd slurmctld; do
        [ -f "$dir/$daemon.pid" ] && kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
    done
    exit 0
fi
host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire before it runs again (SLURM's default: 120 s), then for the scheduler
# (every 60 s by default): shorter waits, for trying it here.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
MinJobAge=600
KillWait=30
NodeName=$host CPUs=$(nproc) RealMemory=$(( $(free -m | awk '/^Mem:/ {print $2}') / 2 )) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
[ -f /etc/munge/munge.key ] || mungekey -c
mkdir -p /run/munge && chown munge: /run/munge 2>/dev/null || true
pgrep -x munged > /dev/null || munged --force
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do  # up within seconds
    sinfo -h -o %T 2>/dev/null | grep -qx idle && exit 0
    sleep 0.2
done
echo "the node did not come up; see $dir/log" >&2
exit 1
