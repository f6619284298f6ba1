#!/bin/bash
# A one-node SLURM cluster on this machine, for the test suite (root only).
#   slurm/local_cluster.sh start   # installs slurmctld slurmd slurm-client munge if missing, starts them
#   slurm/local_cluster.sh stop    # stops only the daemons this script started (by pid)
#   slurm/local_cluster.sh env     # prints `export SLURM_CONF=...` for the client commands
# State, logs and slurm.conf live in $IFC_DS_SLURM_DIR (default /tmp/ifc_ds_slurm).
set -euo pipefail
dir="${IFC_DS_SLURM_DIR:-/tmp/ifc_ds_slurm}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

need_root() { [ "$(id -u)" -eq 0 ] || { echo "local_cluster.sh: needs root" >&2; exit 3; }; }

install() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing slurm + munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
    mkdir -p "$dir/state" "$dir/spool"
    cat > "$conf" <<CONF
ClusterName=ifcds
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back before it may start again (120 s by default, most of the
# requeue test's time); 30 s still leaves a loaded 2-core node time to launch a step on its credential
AuthInfo=cred_expire=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6917
SlurmdPort=6918
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- munged --force
        pgrep -u munge -n munged >> "$dir/started.pids"
    fi
}

start() {
    need_root
    install
    mkdir -p "$dir"
    : > "$dir/started.pids"
    write_conf
    start_munge
    # -c: start clean, so jobs left by a killed controller never block the node
    slurmctld -c -f "$conf"
    for _ in $(seq 50); do [ -s "$dir/slurmctld.pid" ] && break; sleep 0.2; done
    cat "$dir/slurmctld.pid" >> "$dir/started.pids"
    slurmd -c -f "$conf"
    for _ in $(seq 50); do [ -s "$dir/slurmd.pid" ] && break; sleep 0.2; done
    cat "$dir/slurmd.pid" >> "$dir/started.pids"
    for _ in $(seq 120); do
        state="$(sinfo -h -o %t 2>/dev/null | head -1)"
        [ "$state" = "idle" ] && { echo "slurm up: SLURM_CONF=$conf"; return 0; }
        [ "${state%\*}" = "down" ] || [ "${state%\*}" = "drain" ] && scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "local_cluster.sh: node did not become idle (state: ${state:-none}); see $dir/*.log" >&2
    stop
    exit 4
}

stop() {
    [ -f "$dir/started.pids" ] || return 0
    while read -r pid; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done < "$dir/started.pids"
    sleep 1
    while read -r pid; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    done < "$dir/started.pids"
    rm -f "$dir/started.pids"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
