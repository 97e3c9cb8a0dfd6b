#!/usr/bin/env bash
# A real single-node Slurm cluster for the tests: its own munged, slurmctld and slurmd, all state,
# logs, pid files and the munge socket in $CLAWLY_SLURM_DIR, so it never touches (or is touched by)
# a system Slurm or munge. No systemd: the daemons are started directly. No cgroups: proctrack/
# linuxproc and task/none work in a container where cgroup v2 is read-only or delegated elsewhere.
#
#   slurm.sh install   apt-get install slurmctld slurmd slurm-client munge (Debian 12: Slurm 22.05)
#   slurm.sh start     munge key, munged, slurm.conf, slurmctld, slurmd; waits for the node to be idle
#                      and runs one real batch job; prints SLURM_CONF=<path> on stdout (idempotent)
#   slurm.sh status    sinfo/squeue of the running cluster (exit 1 when it is not running)
#   slurm.sh check     a `hostname` job that must write its output, and two 1-CPU jobs that must overlap
#   slurm.sh stop      scancel everything, stop the daemons started here (by pid), remove the dir
#
# Must run as root (slurmd runs jobs as the submitting user; SlurmUser=root).
# Environment: CLAWLY_SLURM_DIR (/tmp/clawly-slurm), CLAWLY_SLURM_CTLD_PORT (56817),
# CLAWLY_SLURM_SLURMD_PORT (56818). Ports differ from Slurm's 6817/6818 so a system Slurm can coexist.
set -euo pipefail

DIR=${CLAWLY_SLURM_DIR:-/tmp/clawly-slurm}
CTLD_PORT=${CLAWLY_SLURM_CTLD_PORT:-56817}
SLURMD_PORT=${CLAWLY_SLURM_SLURMD_PORT:-56818}
CONF=$DIR/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET=$DIR/munge/munge.socket
START_TIMEOUT=${CLAWLY_SLURM_START_TIMEOUT:-60}

log() { echo "slurm.sh: $*" >&2; }
show_logs() {
    local f
    for f in "$DIR"/log/*.log; do
        [[ -s $f ]] || continue
        log "last lines of $f:"; tail -n 25 "$f" >&2
    done
}
die() { log "ERROR: $*"; show_logs; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (slurmd and munged are started here)"; }

# alive and not a zombie: a daemon killed in a container whose pid 1 does not reap stays in /proc
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# pid from a pid file, only if that process is alive and is the named program (pids get reused)
live_pid() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    echo "$pid"
}

stop_pid() {  # TERM, wait up to 10 s, then KILL
    local file=$1 name=$2 pid
    pid=$(live_pid "$file" "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
    log "$name ($pid) ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

export SLURM_CONF=$CONF

running() {
    [[ -f $CONF ]] && live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null \
        && live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null \
        && live_pid "$DIR/munge/munged.pid" munged >/dev/null \
        && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        log "already installed: $(slurmctld -V), munge $(munged -V | awk '{print $1}')"
        return
    fi
    apt-get update -q
    # postinst tries to start the units; with no systemd policy-rc.d refuses (harmless), and the
    # system daemons would not be used anyway.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >&2
    log "installed: $(slurmctld -V)"
}

ensure_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    # munged refuses a key that others can read or that it does not own
    chown munge:munge /etc/munge "$MUNGE_KEY"
    chmod 0700 /etc/munge
    chmod 0400 "$MUNGE_KEY"
}

write_conf() {
    local node=$1 cpus sockets cores threads memtotal_mb realmem hw
    # the node line must match the hardware slurmd sees, or the node is drained as INVALID
    hw=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $sockets && -n $cores && -n $threads ]] || die "cannot parse 'slurmd -C': $hw"
    memtotal_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # headroom for the OS and the daemons: 10 %, at least 512 MB
    realmem=$(( memtotal_mb - (memtotal_mb / 10 > 512 ? memtotal_mb / 10 : 512) ))
    cat >"$CONF" <<EOF
# clawly test cluster (.ci/services/slurm.sh); generated, do not edit
ClusterName=clawly
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# bind to the configured addresses (127.0.0.1), not to every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: they need a writable, delegated cgroup tree that containers rarely give
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# without a default, a job that gives no --mem is given the whole node and jobs cannot share it
DefMemPerCPU=$(( realmem / cpus ))
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$realmem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local node=$1 state=""
    for _ in $(seq $((START_TIMEOUT * 4))); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        [[ $state == idle ]] && return 0
        live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null || die "slurmctld exited"
        live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null || die "slurmd exited"
        sleep 0.25
    done
    die "node $node not idle after ${START_TIMEOUT}s (state: '${state:-none}'; $(scontrol show node "$node" 2>&1 | grep -o 'Reason=.*' || true))"
}

# wait for job $1 to end (at most $2 s); succeed only if it COMPLETED. Polls scontrol: `sbatch
# --wait` polls with a growing interval and adds seconds to every short job.
wait_job() {
    local id=$1 limit=${2:-60} state=""
    for _ in $(seq $((limit * 10))); do
        state=$(scontrol show job -o "$id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
        case $state in
            COMPLETED) return 0 ;;
            FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)
                log "job $id ended $state"; return 1 ;;
        esac
        sleep 0.1
    done
    log "job $id not done after ${limit}s (state: ${state:-unknown})"; return 1
}

smoke_job() {  # one real job, end to end, through the whole stack
    local out=$DIR/smoke.out id
    id=$(sbatch --parsable --time=1 -o "$out" --wrap 'hostname' 2>"$DIR/smoke.err") \
        || { cat "$DIR/smoke.err" >&2; die "smoke job not accepted"; }
    wait_job "$id" 60 || die "smoke job $id failed"
    [[ -s $out ]] || die "smoke job $id wrote no output"
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "Slurm is not installed (run: $0 install)"
    if running; then log "already running ($CONF)"; echo "SLURM_CONF=$CONF"; return; fi
    if [[ -e $DIR ]]; then log "removing stale $DIR"; cmd_stop 2>/dev/null; fi
    local port node
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_busy "$port" && die "127.0.0.1:$port is in use (set CLAWLY_SLURM_CTLD_PORT/CLAWLY_SLURM_SLURMD_PORT)"
    done
    node=$(hostname -s)
    # SlurmctldHost/NodeName must be this host's short name; slurmctld refuses to be a controller
    # for a name that is not its own. The address is given explicitly, so it need not resolve well.
    getent hosts "$node" >/dev/null || log "warning: '$node' does not resolve; relying on the explicit 127.0.0.1"

    mkdir -p "$DIR"/{state,spool,run,log}
    chmod 0755 "$DIR"
    ensure_munge_key
    # munged checks that its socket dir is not writable by others, and runs as munge
    install -d -o munge -g munge -m 0755 "$DIR/munge"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || { cat "$DIR/munge/munged.log" >&2 2>/dev/null; die "munged did not start"; }
    munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || die "munge credential round trip failed"

    write_conf "$node"
    slurmctld -f "$CONF" -i || die "slurmctld did not start"
    slurmd -f "$CONF" -N "$node" || die "slurmd did not start"
    wait_idle "$node"
    smoke_job
    log "started $(slurmctld -V): node $node idle, partition debug; conf $CONF"
    echo "SLURM_CONF=$CONF"
}

cmd_status() {
    running || { log "not running ($DIR)"; exit 1; }
    echo "SLURM_CONF=$CONF"
    sinfo
    squeue
}

cmd_check() {
    running || die "not running ($DIR)"
    local d=$DIR/check a b
    rm -rf "$d"; mkdir -p "$d"
    a=$(sbatch --parsable -o "$d/host.out" --wrap 'hostname')
    wait_job "$a" 60 || die "hostname job failed"
    [[ $(<"$d/host.out") == "$(hostname)" ]] || die "hostname job wrote '$(<"$d/host.out")'"
    a=$(sbatch --parsable -n 1 -o "$d/a.out" --wrap 'date +%s.%N; sleep 3; date +%s.%N')
    b=$(sbatch --parsable -n 1 -o "$d/b.out" --wrap 'date +%s.%N; sleep 3; date +%s.%N')
    local both=0
    for _ in $(seq 40); do
        [[ $(squeue -h -t R -j "$a,$b" | wc -l) == 2 ]] && { both=1; break; }
        sleep 0.25
    done
    wait_job "$a" 60 && wait_job "$b" 60 || die "sleep jobs failed"
    [[ $both == 1 ]] || die "jobs $a and $b never ran at the same time"
    log "check passed: output written; jobs $a and $b ran concurrently"
}

cmd_stop() {
    if [[ -f $CONF ]] && live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 60); do  # let slurmd reap the job steps before it goes
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.25
            done
        fi
    fi
    # each takes 1-2 s to shut down; in parallel
    stop_pid "$DIR/run/slurmd.pid" slurmd &
    stop_pid "$DIR/run/slurmctld.pid" slurmctld &
    stop_pid "$DIR/munge/munged.pid" munged &
    wait
    rm -rf "$DIR"
    log "stopped; removed $DIR"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    check) cmd_check ;;
    *) echo "usage: $0 {install|start|stop|status|check}" >&2; exit 2 ;;
esac
