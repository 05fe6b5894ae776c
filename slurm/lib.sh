# Shared by slurm/*.sbatch (sourced, not run): environment, rendezvous, and the preemption protocol.
#
# Slurm copies a batch script to its spool directory before running it, so the scripts cannot find
# this file next to themselves; they source it from the repository the job was submitted from
# ($SLURM_SUBMIT_DIR, or $MOE_REPO).
#
# Variables a user may set before `sbatch` (exported into the job by sbatch's default --export=ALL):
#   MOE_REPO          repository root (default: the directory sbatch was run in)
#   PYTHON            interpreter (default: $MOE_REPO/.venv/bin/python if present, else python3)
#   MOE_WORKDIR       directory the job runs in; run dirs go to <MOE_WORKDIR>/runs/<experiment>/slurm-<jobid>
#                     (default: the submit directory)
#   MOE_MASTER_ADDR   rendezvous address (default: the NodeAddr of the job's first node)
#   MOE_MASTER_PORT   rendezvous port (default: 15000 + job id % 20000, the same on every node)
#   MOE_MAX_REQUEUES  how often a preempted job requeues itself (default: 50)
#   NCCL_* / GLOO_SOCKET_IFNAME  passed through; see moe_nccl_defaults below.

# The trainer exits with this code when a signal stopped it before its last step, checkpoint saved
# (EXIT_PREEMPTED in launch/exits.py).
readonly MOE_EXIT_PREEMPTED=75

moe_log() {
    echo "[moe-slurm $(date +%H:%M:%S)] $*"
}

moe_die() {
    echo "[moe-slurm] error: $*" >&2
    exit 1
}

# Locate the repository and the interpreter, and cd into the working directory.
moe_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || moe_die "not inside a Slurm job: submit with sbatch (see docs/slurm.md)"
    # From here on SIGUSR1 is ours: its default action would kill this shell before the step starts.
    trap _moe_on_usr1 USR1
    MOE_REPO="${MOE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    [ -f "$MOE_REPO/launch/train.py" ] ||
        moe_die "no launch/train.py under $MOE_REPO: run sbatch from the repository root or set MOE_REPO"
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$MOE_REPO/.venv/bin/python" ]; then PYTHON="$MOE_REPO/.venv/bin/python"; else PYTHON=python3; fi
    fi
    command -v "$PYTHON" >/dev/null || moe_die "python interpreter '$PYTHON' not found: set PYTHON=/path/to/python"
    MOE_WORKDIR="${MOE_WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
    mkdir -p "$MOE_WORKDIR"
    cd "$MOE_WORKDIR" || moe_die "cannot cd to MOE_WORKDIR=$MOE_WORKDIR"
    export MOE_REPO PYTHON MOE_WORKDIR
    # Every rank prints straight away, so the job log shows where a hang happened.
    export PYTHONUNBUFFERED=1
    # One thread per CPU Slurm gave the task, not one per core of the node (which oversubscribes it).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

# MASTER_ADDR / MASTER_PORT that every task derives alike, without ssh or name resolution.
moe_rendezvous() {
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$first" ] || moe_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    if [ -n "${MOE_MASTER_ADDR:-}" ]; then
        MASTER_ADDR="$MOE_MASTER_ADDR"
    else
        # NodeAddr is how Slurm itself reaches the node: it works where node names do not resolve
        # (and equals the name where they do).
        MASTER_ADDR=$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
        [ -n "$MASTER_ADDR" ] || MASTER_ADDR="$first"
    fi
    # Derived from the job id: stable across a requeue, different for jobs sharing a node.
    MASTER_PORT="${MOE_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
}

# NCCL settings users commonly need. Anything already set in the submitting shell wins, so
# `NCCL_SOCKET_IFNAME=ib0 sbatch slurm/train.sbatch` overrides without editing this file.
moe_nccl_defaults() {
    # Warnings only; NCCL_DEBUG=INFO shows the transport and interface each rank chose.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # A failed collective raises instead of hanging until the timeout (older torch needs this set).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Commonly needed, left to the user because the right value is cluster-specific:
    #   NCCL_SOCKET_IFNAME=ib0|eth0|^lo,docker  interface for NCCL's bootstrap/socket traffic
    #   GLOO_SOCKET_IFNAME=eth0                 the same for gloo (CPU runs, and the rendezvous)
    #   NCCL_IB_HCA=mlx5_0,mlx5_1               which InfiniBand adapters to use
    #   NCCL_IB_DISABLE=1                       no InfiniBand: fall back to TCP sockets
    #   NCCL_NET_GDR_LEVEL=PHB                  GPUDirect RDMA distance
    #   NCCL_P2P_DISABLE=1                      work around broken peer-to-peer within a node
}

# One task per GPU: a job that asks for GPUs must ask for as many tasks on each node.
moe_check_gpus() {
    local gpus="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
    gpus="${gpus##*:}"  # typed requests look like a100:4
    local tasks="${SLURM_NTASKS_PER_NODE:-}"
    if [[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ] && [ -n "$tasks" ] && [ "$tasks" != "$gpus" ]; then
        moe_die "--gpus-per-node=$gpus but --ntasks-per-node=$tasks: run one task per GPU" \
            "(sbatch --gpus-per-node=N --ntasks-per-node=N)"
    fi
}

moe_banner() {
    local commit
    commit=$(git -C "$MOE_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    moe_log "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}," \
        "restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, ${SLURM_NTASKS:-?} tasks," \
        "master $MASTER_ADDR:$MASTER_PORT"
    moe_log "repo $MOE_REPO @ $commit, python $PYTHON, workdir $MOE_WORKDIR"
}

# ---------------------------------------------------------------- preemption protocol
#
# `#SBATCH --signal=B:USR1@<seconds>` sends SIGUSR1 to this batch shell only. The shell traps it,
# forwards it to the job step, and keeps waiting: the trainer agrees on the signal at the next step
# boundary, saves a checkpoint (atomically) and exits with MOE_EXIT_PREEMPTED. The shell then
# requeues the job, which starts again from the top with the same job id, so the same run directory,
# its latest checkpoint, data position and W&B run id.

MOE_CAUGHT_SIGNAL=0
MOE_STEP_PID=""
MOE_FORWARD="kill"  # kill: signal the srun process (srun forwards to all tasks); scancel: signal all job steps

_moe_on_usr1() {
    MOE_CAUGHT_SIGNAL=1
    moe_log "SIGUSR1 received (time limit near or preemption): asking the trainer to checkpoint and stop"
    if [ "$MOE_FORWARD" = scancel ]; then
        # Every step of the job, but not this shell (scancel signals the batch step only with --batch).
        scancel --signal=USR1 "$SLURM_JOB_ID" || true
    elif [ -n "$MOE_STEP_PID" ]; then
        kill -USR1 "$MOE_STEP_PID" 2>/dev/null || true
    fi
}

# Requeue this job (it restarts from the top of the script with the same id) and end the script;
# or exit with status $1 when it was requeued too often already.
_moe_requeue() {
    local rc="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${MOE_MAX_REQUEUES:-50}"
    if [ "$restarts" -ge "$max" ]; then
        moe_log "not requeueing: the job was already requeued $restarts times (MOE_MAX_REQUEUES=$max)"
        exit "$rc"
    fi
    moe_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))): it resumes from its latest checkpoint"
    # Slurm holds a requeued job ~2 minutes (BeginTime) so the nodes can clean up first.
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# Run "$@" as the job step, forward SIGUSR1 to it, wait for it, requeue if it was preempted.
# Ends the batch script: exits with the step's status, or 0 after a requeue.
moe_run_step() {
    trap _moe_on_usr1 USR1
    if [ "$MOE_CAUGHT_SIGNAL" = 1 ]; then  # told to stop before training started
        _moe_requeue 1
    fi
    moe_log "running: $*"
    "$@" &
    MOE_STEP_PID=$!
    local rc
    while :; do
        # A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again.
        if wait "$MOE_STEP_PID"; then rc=0; else rc=$?; fi
        if [ "$rc" -gt 128 ] && kill -0 "$MOE_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    moe_log "job step exited with status $rc"
    # Requeue when the trainer says it stopped early with a checkpoint, or when it died after we
    # were told to stop (e.g. the signal arrived before the trainer installed its handler): in both
    # cases the latest checkpoint is intact and the requeued job resumes from it.
    if [ "$rc" -eq "$MOE_EXIT_PREEMPTED" ] || { [ "$MOE_CAUGHT_SIGNAL" = 1 ] && [ "$rc" -ne 0 ]; }; then
        _moe_requeue "$rc"
    fi
    exit "$rc"
}

# srun options for one task per GPU (or per node on CPUs) running the trainer.
moe_srun_args() {
    MOE_SRUN=(srun --kill-on-bad-exit=1)
    # srun (Slurm >= 22.05) does not inherit --cpus-per-task from the job: pass it on.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then MOE_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
}
