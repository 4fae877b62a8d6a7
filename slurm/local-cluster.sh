#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurmctld, slurmd and munge), for the
# tests and demos of slurm/*.sbatch; and taking it down again.
#
#   slurm/local-cluster.sh up      # install (apt-get, first time), configure, start; waits
#                                  # until the node is idle
#   slurm/local-cluster.sh status  # sinfo
#   slurm/local-cluster.sh down    # stop the daemons, munged too if `up` started it (the packages stay)
#
# Needs root (it writes /etc/slurm/slurm.conf and starts daemons) and Debian/Ubuntu's
# packages. The node offers SLOTS task slots (default: 4 x the cores, at least 8), more than
# the cores so that the 4- to 16-rank benchmark cells can run oversubscribed, and the memory
# that `free` reports. State and logs: $STATE (default /var/tmp/snake-slurm). It refuses to
# touch a machine whose slurm.conf it did not write (a machine of a real Slurm cluster).
set -euo pipefail

STATE=${STATE:-/var/tmp/snake-slurm}
CONF=${SNAKE_SLURM_CONF:-/etc/slurm/slurm.conf}  # the variable only for this script's tests
MARK="# Written by snake_mpi's slurm/local-cluster.sh"
HOST=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root"
    echo "local-cluster: installing slurmctld slurmd slurm-client munge (apt-get)" >&2
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local cores mem_mb slots
    cores=$(nproc)
    slots=${SLOTS:-$(( cores * 4 > 8 ? cores * 4 : 8 ))}
    mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    cat > "$CONF" <<CONF
$MARK: one node, $slots task slots on $cores cores.
ClusterName=snake-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its old credential has expired (default 120 s):
# short here, so that the preemption test does not wait two minutes.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# Scheduling passes every 2 s (defaults 60 s and backfill 30 s): a requeued job starts again
# soon after its credential expires instead of at the next pass, 20-30 s later.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
# sbatch --wait polls a job's state every 2 s while that is under half of MinJobAge, then
# every 8 and 32 s: with the default 300 a 10 s job returned after 42 s here. A completed
# job's record is still kept for at least 4 s (and until the next purge, up to a minute).
MinJobAge=4
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$slots RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start_munge() {
    if ! pgrep -x munged >/dev/null; then
        if [ ! -s /etc/munge/munge.key ]; then
            mkdir -p /etc/munge
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key
        mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
        else
            /usr/sbin/munged --force
        fi
        mkdir -p "$STATE" && touch "$STATE/munged.ours" # so that `down` stops it again
    fi
    for _ in $(seq 1 40); do # its socket answers before anything needs a credential
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "munged does not answer on its socket (/run/munge/munge.socket.2)"
}

ours_or_none() { # never touch a Slurm this script did not set up
    if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF was not written by this script: this machine has a Slurm of its own;" \
            "not touching it (no packages installed, no daemons stopped, no config written)"
    fi
}

up() {
    ours_or_none
    [ "$(id -u)" = 0 ] || die "needs root"
    install_packages
    down quiet
    write_config
    start_munge
    slurmctld
    slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qE '^idle'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    sinfo || true
    tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s"
}

down() {
    ours_or_none
    scancel --quiet --full -u root 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.5
    done
    rm -rf "$STATE/ctld"
    if [ -e "$STATE/munged.ours" ]; then # only a munged this script started
        pkill -x munged 2>/dev/null || true
        for _ in $(seq 1 20); do # gone, so that `up` right after starts a new one
            pgrep -x munged >/dev/null || break
            sleep 0.25
        done
        rm -f "$STATE/munged.ours"
    fi
    [ "${1:-}" = quiet ] || echo "local-cluster: stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
