#!/usr/bin/env bash
# End-to-end test of `onehead sweep --slurm` against a real Slurm: a single-node slurmctld +
# slurmd (+ munged) from Debian's slurm-wlm packages, configured in a temporary folder and
# listening on loopback only. It runs a tiny 4-run sweep as a job array, stops one task
# midway with Slurm's pre-time-limit signal (USR1: the task stops onehead and requeues
# itself) and hard-requeues another (`scontrol requeue`), waits for the array to finish,
# collects the index and checks that all 4 runs finished (the interrupted ones resumed from
# their last epoch). Tears everything down at the end.
#
# Opt-in (needs root and apt; not part of `cargo test`):
#   sudo scripts/slurm_e2e.sh            # KEEP=1 keeps the temporary folder
# Uses target/release/onehead (built if missing); ONEHEAD=/path/to/onehead overrides.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ONEHEAD=${ONEHEAD:-$REPO/target/release/onehead}
TIMEOUT=${TIMEOUT:-600}   # seconds for the whole array

say() { printf '[slurm-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "FAIL: $*"; exit 1; }

if [ "$(id -u)" != 0 ]; then die "run as root (it installs and starts slurmctld, slurmd and munged)"; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if [ ! -x "$ONEHEAD" ]; then
  say "building onehead (release)"
  (cd "$REPO" && cargo build --release)
fi
say "$(slurmctld -V), onehead at $ONEHEAD"

WORK=$(mktemp -d /tmp/onehead-slurm-e2e.XXXXXX)
chmod 700 "$WORK"
mkdir -p "$WORK"/{etc,state,spool,log,run,munge}
export SLURM_CONF="$WORK/etc/slurm.conf"

cleanup() {
  rc=$?
  set +e
  say "tearing down"
  if [ -n "${JOB:-}" ]; then scancel "$JOB" 2>/dev/null; fi
  for pidfile in "$WORK/run/slurmd.pid" "$WORK/run/slurmctld.pid" "$WORK/munge/munged.pid"; do
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  if [ "$rc" != 0 ]; then
    say "logs kept in $WORK (slurmctld: $WORK/log/slurmctld.log, slurmd: $WORK/log/slurmd.log)"
  elif [ "${KEEP:-0}" = 1 ]; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- munge: a fresh key, its own socket ---------------------------------------------------
if command -v mungekey >/dev/null; then
  mungekey --create --keyfile="$WORK/munge/munge.key" --force
else
  dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 600 "$WORK/munge/munge.key"
munged --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.sock" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" \
  --seed-file="$WORK/munge/munged.seed" --force
for _ in $(seq 50); do [ -S "$WORK/munge/munge.sock" ] && break; sleep 0.1; done
[ -S "$WORK/munge/munge.sock" ] || die "munged did not start"

# --- slurm: one node (this machine, 2 CPUs) on loopback -----------------------------------
CPUS=$(nproc)
cat >"$SLURM_CONF" <<EOF
ClusterName=onehead-e2e
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s).
AuthInfo=socket=$WORK/munge/munge.sock,cred_expire=10
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF" -c
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 100); do
  state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.3
done
[ "${state:-}" = idle ] || die "the node did not come up (sinfo: '${state:-}')"
say "slurm is up: $(sinfo -h -o '%P %D %t %c CPUs')"

# --- a tiny 4-run sweep: replay off/on x seeds 0,1 ----------------------------------------
cd "$WORK"
cat >tiny.toml <<EOF
name = "tiny"
seeds = [0, 1]
device = "cpu"
[model]
weights = "none"
image_size = 64
fpn_channels = 16
[data]
source = "synthetic"
root = "$WORK/data"
synth_train = 16
synth_val = 10
synth_size = 64
[[stages]]
task = "seg"
epochs = 12
batch_size = 4
[[stages]]
task = "det"
epochs = 12
batch_size = 4
[[stages]]
task = "cls"
epochs = 12
batch_size = 4
[replay]
images_per_batch = 2
[eval]
batch_size = 4
EOF
"$ONEHEAD" synth --out "$WORK/data" --train 16 --val 10 --test 10 --size 64 >/dev/null
say "\$ onehead sweep tiny.toml --set replay.enabled=false,true --slurm --name e2e --results $WORK/results --cpus-per-task 1 --array-parallelism 2"
out=$("$ONEHEAD" sweep tiny.toml --set replay.enabled=false,true --slurm --name e2e \
  --results "$WORK/results" --cpus-per-task 1 --array-parallelism 2)
echo "$out"
JOB=$(echo "$out" | sed -n 's/^submitted job array \([0-9]*\).*/\1/p')
[ -n "$JOB" ] || die "no job id in the output"
SWEEP="$WORK/results/e2e"
grep -E '^#SBATCH' "$SWEEP/sweep.sbatch"

run_dir() { sed -n "s/^  $1) CONFIG=.* RUN_DIR='\(.*\)' ;;\$/\1/p" "$SWEEP/sweep.sbatch"; }
wait_for_state() {  # a run folder with a saved epoch, while its task still runs
  local dir=$1
  for _ in $(seq 600); do
    [ -f "$dir/state/state.json" ] && return 0
    [ -f "$dir/summary.json" ] && die "$dir finished before it could be interrupted"
    sleep 0.1
  done
  die "no state in $dir"
}

# Task 1: Slurm's pre-time-limit signal (what --signal=B:USR1@120 sends), to the batch shell.
R1=$(run_dir 1)
wait_for_state "$R1"
say "task 1 has saved an epoch: scancel --signal=USR1 --batch ${JOB}_1 (as before a time limit)"
# (scancel may keep retrying while the task requeues itself: the signal is sent at once.)
timeout 3 scancel --signal=USR1 --batch "${JOB}_1" 2>/dev/null || true
for _ in $(seq 300); do grep -q 'stopped by SIGUSR1' "$R1/log.txt" && break; sleep 0.1; done
grep -q 'stopped by SIGUSR1' "$R1/log.txt" || die "task 1 did not stop on USR1"

# Task 2: a hard requeue by Slurm (node trouble, an admin, preemption).
R2=$(run_dir 2)
wait_for_state "$R2"
say "task 2 has saved an epoch: scontrol requeue ${JOB}_2"
scontrol requeue "${JOB}_2"

say "waiting for the array to finish"
start=$(date +%s)
while [ -n "$(squeue -h -j "$JOB" 2>/dev/null)" ]; do
  if [ $(( $(date +%s) - start )) -gt "$TIMEOUT" ]; then
    squeue -j "$JOB"
    die "the array did not finish in $TIMEOUT s"
  fi
  sleep 2
done
say "array done: $(scontrol show job "$JOB" 2>/dev/null | grep -c JobState=COMPLETED || true) tasks COMPLETED in scontrol"

say "\$ onehead sweep --collect $SWEEP"
set +e
"$ONEHEAD" sweep --collect "$SWEEP"
rc=$?
set -e
[ "$rc" = 0 ] || die "collect exited $rc (some run did not finish)"

# Checks: 4 finished runs; the interrupted ones were attempted twice and resumed.
ok=$(awk -F, 'NR > 1 && $3 == "ok"' "$SWEEP/index.csv" | wc -l)
[ "$ok" = 4 ] || die "index.csv has $ok finished runs, expected 4"
for r in "$R1" "$R2"; do
  attempts=$(grep -c '^=== onehead sweep: start' "$r/log.txt")
  [ "$attempts" -ge 2 ] || die "$r was started $attempts time(s), expected a requeue"
  grep -q 'resuming' "$r/log.txt" || die "$r did not resume from its saved state"
  say "$(basename "$r"): $attempts attempts; $(grep -m1 'resuming' "$r/log.txt" | sed 's/.*INFO //')"
  grep '^=== onehead sweep' "$r/log.txt" | sed 's/^/    /'
done
rows=$(grep -c . "$R1/epochs.csv")
[ "$rows" = 37 ] || die "$R1/epochs.csv has $rows lines, expected a header + 36 epochs"
say "PASS: 4 of 4 runs finished; task 1 (USR1 -> requeue) and task 2 (scontrol requeue) resumed from their last epoch"
