#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for tests and for trying `mohico submit`.
#
#   slurm/local-cluster.sh start    install (if missing) and start munged, slurmctld and two
#                                   slurmd daemons (nodes n1, n2 on 127.0.0.1 ports 17001-17002),
#                                   then wait until sinfo shows both nodes up. Idempotent.
#   slurm/local-cluster.sh status   exit 0 when the cluster answers with both nodes up, else 1
#   slurm/local-cluster.sh stop     cancel the cluster's jobs and stop the daemons it started
#
# Needs root (it writes /etc/slurm/slurm.conf and runs the daemons) and Debian's packages
# slurmctld, slurmd, slurm-client and munge (slurm-wlm 22.05 on Debian 12), which `start`
# installs with apt-get; `apt-get update` runs only when the package lists do not know them.
# Exit codes: 0 ok, 1 failure (the daemons' logs are printed), 77 the packages cannot be
# installed (tests skip on 77 and fail on anything else).
#
# Environment: SLURM_LOCAL_WAIT (seconds to wait for the nodes, default 60).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
LOGDIR=/var/log/slurm
WAIT=${SLURM_LOCAL_WAIT:-60}

say() { echo "[local-cluster] $*"; }
die() { say "error: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it writes $CONF and starts the SLURM daemons)"
}

have_packages() {
    [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/bin/sinfo ] \
        && [ -x /usr/bin/sbatch ] && [ -x /usr/sbin/munged ]
}

install_packages() {
    have_packages && return 0
    command -v apt-get >/dev/null || { say "apt-get not found: install slurmctld, slurmd, slurm-client and munge by hand" >&2; exit 77; }
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
        say "apt-get update (the package lists do not know ${pkgs[*]})"
        apt-get update -qq || { say "apt-get update failed: cannot install ${pkgs[*]}" >&2; exit 77; }
    fi
    say "apt-get install ${pkgs[*]}"
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { say "apt-get install ${pkgs[*]} failed" >&2; exit 77; }
    have_packages || { say "installed ${pkgs[*]} but the daemons are missing" >&2; exit 77; }
}

render_conf() {
    local host mem cpus
    host=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)   # = `free -m` total
    cpus=$(nproc)
    cat <<EOF
# Written by mohico slurm/local-cluster.sh: two fake nodes on this machine.
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001-17002 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

pid_alive() {  # pidfile -> 0 if the process it names runs
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Both nodes answer and are usable (idle, or busy with jobs).
nodes_up() {
    local states
    states=$(timeout 10 sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        echo "$states" | grep -Eq "^$n (idle|alloc|mix|comp)\$" || return 1
    done
}

status() {
    have_packages || { say "not installed"; return 1; }
    local ok=0
    pid_alive /run/munge/munged.pid || { say "munged is not running"; ok=1; }
    pid_alive /run/slurmctld.pid || { say "slurmctld is not running"; ok=1; }
    for n in "${NODES[@]}"; do
        pid_alive "/run/slurmd-$n.pid" || { say "slurmd -N $n is not running"; ok=1; }
    done
    if [ $ok = 0 ] && nodes_up; then
        say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
        return 0
    fi
    return 1
}

show_logs() {
    for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-n1.log "$LOGDIR"/slurmd-n2.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    sinfo -N -l >&2 2>&1 || true
}

start() {
    need_root
    install_packages
    local conf_changed=0
    if [ ! -f "$CONF" ] || ! diff -q <(render_conf) "$CONF" >/dev/null; then
        conf_changed=1
    fi
    if [ $conf_changed = 0 ] && status >/dev/null 2>&1; then
        say "already running: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
        return 0
    fi
    if [ $conf_changed = 1 ]; then
        stop_daemons quiet
        mkdir -p /etc/slurm
        render_conf > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
        say "wrote $CONF"
    fi

    # munge: key, then daemon
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    if ! pid_alive /run/munge/munged.pid; then
        runuser -u munge -- /usr/sbin/munged --force
        say "started munged"
    fi

    install -d -o slurm -g slurm /var/lib/slurm/slurmctld "$LOGDIR"
    for n in "${NODES[@]}"; do mkdir -p "/var/lib/slurm/slurmd/$n"; done
    if ! pid_alive /run/slurmctld.pid; then
        /usr/sbin/slurmctld
        say "started slurmctld"
    fi
    for n in "${NODES[@]}"; do
        if ! pid_alive "/run/slurmd-$n.pid"; then
            /usr/sbin/slurmd -N "$n"
            say "started slurmd -N $n"
        fi
    done

    local t=0 resumed=0
    until nodes_up; do
        if [ $resumed = 0 ] && [ $t -ge 4 ]; then
            # nodes left down/drained by an earlier unclean stop come back with resume
            if sinfo -h -N -o '%t' 2>/dev/null | grep -Eq 'down|drain|fail'; then
                scontrol update nodename=n[1-2] state=resume 2>/dev/null || true
            fi
            resumed=1
        fi
        if [ $t -ge "$WAIT" ]; then
            show_logs
            die "the nodes did not come up within ${WAIT}s"
        fi
        sleep 1; t=$((t + 1))
    done
    say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
}

stop_pidfile() {  # pidfile name
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        [ "${2:-}" = quiet ] || say "stopped $3"
    fi
    rm -f "$f"
}

stop_daemons() {
    stop_pidfile /run/slurmd-n1.pid "${1:-}" "slurmd -N n1"
    stop_pidfile /run/slurmd-n2.pid "${1:-}" "slurmd -N n2"
    stop_pidfile /run/slurmctld.pid "${1:-}" slurmctld
    stop_pidfile /run/munge/munged.pid "${1:-}" munged
}

stop() {
    need_root
    if have_packages && pid_alive /run/slurmctld.pid; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 20); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    stop_daemons
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
