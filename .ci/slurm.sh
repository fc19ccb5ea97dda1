#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests marked `slurm` (tests/test_slurm.py).
#
#   bash .ci/slurm.sh up      # install slurm-wlm if missing (apt, needs root), start munged/slurmctld/slurmd
#   bash .ci/slurm.sh down    # stop what `up` started, by PID
#   bash .ci/slurm.sh status  # sinfo
#
# No systemd: the daemons are started directly and all their state (config, spool, logs, PID files) lives in
# $TAR_SLURM_DIR (default ${TMPDIR:-/tmp}/tar_lightning_slurm). Clients find the cluster through
# SLURM_CONF=$TAR_SLURM_DIR/slurm.conf; tests/conftest.py sets it when that file exists.
# A munged that already answers is reused (and then left running by `down`).
set -euo pipefail

DIR="${TAR_SLURM_DIR:-${TMPDIR:-/tmp}/tar_lightning_slurm}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "slurm.sh: $*" >&2; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "slurm-wlm is not installed and this is not root: install it with 'apt-get install -y slurm-wlm'"
        exit 1
    fi
    log "installing slurm-wlm (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    # 80% of physical memory, in MB (slurmd drains a node that claims more than it has)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log"
    cat >"$CONF" <<EOF
# written by .ci/slurm.sh: one node (this machine), all state under $DIR
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=3
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeHostname=localhost CPUs=$cpus RealMemory=$mem
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running: reusing it"
        return
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
    cp /run/munge/munged.pid "$DIR/munged.pid"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"
    exit 1
}

up() {
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        log "already up (SLURM_CONF=$CONF)"
        return
    fi
    install_slurm
    write_conf
    start_munge
    # -i: ignore state from an earlier run of this config (jobs, node state)
    slurmctld -i
    slurmd -N localhost
    for _ in $(seq 300); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        if [[ "$state" == "idle" ]]; then
            log "up: $(sinfo -h -o '%P %D %c %T') (export SLURM_CONF=$CONF)"
            return
        fi
        sleep 0.1
    done
    log "slurm did not become idle (state: '${state:-none}'); logs in $DIR/log"
    exit 1
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 file=$2 pid
    [[ -f "$file" ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored SIGTERM: SIGKILL"
            kill -9 "$pid" || true
        fi
    fi
    rm -f "$file"
}

down() {
    if [[ -f "$CONF" ]] && alive "$DIR/slurmctld.pid"; then
        scancel --quiet --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid munged "$DIR/munged.pid"
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
