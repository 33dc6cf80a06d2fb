#!/usr/bin/env bash
# A real Slurm cluster on localhost, for testing slurm/*.sh (as root; Debian's slurm-wlm + munge).
# Usage: bash slurm/local_cluster.sh start DIR    one node, /etc/slurm/slurm.conf
#        bash slurm/local_cluster.sh start2 DIR   two nodes n1 (127.0.0.1) and n2 (127.0.0.2): two slurmd on this host
#                                                 (Debian's Slurm has multiple-slurmd support), DIR/slurm.conf: clients
#                                                 need SLURM_CONF=DIR/slurm.conf; ports apart from the one-node cluster's
#        bash slurm/local_cluster.sh stop DIR
set -euo pipefail
action=${1:?start or stop}
dir=$(mkdir -p "${2:?scratch dir}" && cd "$2" && pwd)
host=$(hostname -s)
# Nodes are declared as the GPU nodes the scripts ask for (32 CPUs each: their own --cpus-per-task fits, so README
# commands run as written); config_overrides lets slurmd declare more CPUs than this host has. The partition is
# named gpu, as in the README's examples. GPUs: SBATCH_GPUS_PER_NODE=0 (the README's CPU form).
# A requeued job is eligible again after cred_expire + 1 s (11 s here) but started by the main scheduling loop's next
# pass (every 60 s by default, the backfill's 30 s): each second here, so a preempted job's rerun starts in 11 s.
common_settings() {  # what both clusters' slurm.conf say
  cat <<'CONF'
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=5
SlurmdParameters=config_overrides
CONF
}
case "$action" in
  start)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" /etc/slurm
    cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
$(common_settings)
NodeName=$host CPUs=32 RealMemory=1000 State=UNKNOWN
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    [ -f /etc/munge/munge.key ] || mungekey -c
    install -d -o munge -g munge -m 755 /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    slurmctld
    slurmd
    for _ in $(seq 1 50); do
      if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then echo "slurm up: $(sinfo -h)"; exit 0; fi
      sleep 0.2
    done
    echo "slurm did not come up; see $dir/log" >&2; exit 1 ;;
  start2)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=local2
# Job ids apart from the one-node cluster's: both on one host, a job's rendezvous port follows its id.
FirstJobId=5000
SlurmctldHost=$host
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
$(common_settings)
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=32 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.2 Port=17002 CPUs=32 RealMemory=1000 State=UNKNOWN
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    [ -f /etc/munge/munge.key ] || mungekey -c
    install -d -o munge -g munge -m 755 /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    slurmctld
    slurmd -N n1
    slurmd -N n2
    for _ in $(seq 1 100); do
      if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then echo "slurm up: $(sinfo -h)"; exit 0; fi
      sleep 0.2
    done
    echo "slurm did not come up; see $dir/log" >&2; exit 1 ;;
  stop)
    for pid_file in "$dir"/slurmd*.pid "$dir/slurmctld.pid"; do
      if [ -f "$pid_file" ]; then kill "$(cat "$pid_file")" 2>/dev/null || true; fi
    done ;;
  *) echo "usage: $0 start|start2|stop DIR" >&2; exit 2 ;;
esac
