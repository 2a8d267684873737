#!/usr/bin/env bash
# End-to-end test of `onehead sweep --slurm` against a real Slurm: a single-node slurmctld +
# slurmd (+ munged) from Debian's slurm-wlm packages, configured in a temporary folder and
# listening on loopback only. A tiny 4-run sweep as a job array (with --collect-after):
# collect while it is queued (running / pending from squeue), cancel task 0 (TERM: it must
# stop with its state saved, never abort), hard-requeue task 2, send task 3 (the task that
# carries the array's own job id) the pre-time-limit USR1 (it must requeue itself alone: the
# untouched task 1 runs once), resubmit the same command (only run 0, which resumes), collect.
# Then a two-task array with a 1-minute limit: the long run is stopped and requeued, the short
# one is not. Tears everything down at the end.
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
tiny() {  # tiny.toml with $1 epochs per stage
cat <<EOF
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
epochs = $1
batch_size = 4
[[stages]]
task = "det"
epochs = $1
batch_size = 4
[[stages]]
task = "cls"
epochs = $1
batch_size = 4
[replay]
images_per_batch = 2
[eval]
batch_size = 4
EOF
}
tiny 12 >tiny.toml
"$ONEHEAD" synth --out "$WORK/data" --train 16 --val 10 --test 10 --size 64 >/dev/null
SUBMIT=(sweep tiny.toml --set replay.enabled=false,true --slurm --name e2e
  --results "$WORK/results" --cpus-per-task 1 --array-parallelism 2)
say "\$ onehead ${SUBMIT[*]} --collect-after"
out=$("$ONEHEAD" "${SUBMIT[@]}" --collect-after)
echo "$out"
JOB=$(echo "$out" | sed -n 's/^submitted job array \([0-9]*\).*/\1/p')
[ -n "$JOB" ] || die "no job id in the output"
echo "$out" | grep -q '^collect job [0-9]' || die "no collect job was submitted (--collect-after)"
SWEEP="$WORK/results/e2e"
grep -E '^#SBATCH' "$SWEEP/sweep.sbatch"

run_dir() { sed -n "s/^  $1) CONFIG=.* RUN_DIR='\(.*\)' ;;\$/\1/p" "$SWEEP/sweep.sbatch"; }
wait_for_state() {  # a run folder with a saved epoch, while its task still runs
  local dir=$1
  for _ in $(seq 1200); do
    [ -f "$dir/state/state.json" ] && return 0
    [ -f "$dir/summary.json" ] && die "$dir finished before it could be interrupted"
    sleep 0.1
  done
  die "no state in $dir"
}
wait_for_array() {  # until array $1 has left the queue
  local start
  start=$(date +%s)
  while [ -n "$(squeue -h -j "$1" 2>/dev/null)" ]; do
    if [ $(( $(date +%s) - start )) -gt "$TIMEOUT" ]; then
      squeue -j "$1"
      die "array $1 did not finish in $TIMEOUT s"
    fi
    sleep 2
  done
}
attempts() { grep -c '^=== onehead sweep: start' "$1/log.txt" || true; }
status_of() { awk -F, -v r="$(basename "$1")" 'NR > 1 && $2 == r { print $3 }' "$SWEEP/index.csv"; }
R0=$(run_dir 0); R1=$(run_dir 1); R2=$(run_dir 2); R3=$(run_dir 3)

# Collect while the array is queued and running: squeue tells running and pending apart
# (the folders alone would say "missing" or "no exit recorded").
set +e; "$ONEHEAD" sweep --collect "$SWEEP" >collect0.txt; rc=$?; set -e
cat collect0.txt
[ "$rc" = 3 ] || die "collect during the array exited $rc, expected 3 (not finished)"
live=$(awk -F, 'NR > 1 && ($3 == "running" || $3 == "pending")' "$SWEEP/index.csv" | wc -l)
[ "$live" -ge 2 ] || die "collect during the array shows $live running/pending runs, expected >= 2"
say "collect during the array: $live runs running or pending, exit 3"

# Task 0: cancelled (scancel sends TERM to the batch shell and to onehead, then KILL after
# KillWait): the run must stop with its state saved (exit 3), never abort (exit 130).
wait_for_state "$R0"
say "task 0 has saved an epoch: scancel ${JOB}_0"
scancel "${JOB}_0"

# Task 2: a hard requeue by Slurm (node trouble, an admin, preemption): TERM as well.
wait_for_state "$R2"
say "task 2 has saved an epoch: scontrol requeue ${JOB}_2"
scontrol requeue "${JOB}_2"

# Task 3: Slurm's pre-time-limit signal (what --signal=B:USR1@120 sends), to the batch shell;
# the task requeues itself alone. The task that starts last carries the array's own job id:
# requeueing `$SLURM_JOB_ID` there would requeue every task (finished ones too).
wait_for_state "$R3"
own=$(scontrol show job "${JOB}_3" 2>/dev/null | grep -o 'JobId=[0-9]*' | head -1 | cut -d= -f2)
say "task 3 (job id $own; the array is $JOB) has saved an epoch: scancel --signal=USR1 --batch ${JOB}_3"
timeout 3 scancel --signal=USR1 --batch "${JOB}_3" 2>/dev/null || true
for _ in $(seq 300); do grep -q 'stopped by SIGUSR1' "$R3/log.txt" && break; sleep 0.1; done
grep -q 'stopped by SIGUSR1' "$R3/log.txt" || die "task 3 did not stop on USR1"

say "waiting for the array to finish"
wait_for_array "$JOB"
for _ in $(seq 100); do ls "$SWEEP"/slurm/collect-*.out >/dev/null 2>&1 && [ -z "$(squeue -h -n onehead-collect)" ] && break; sleep 0.3; done
ls "$SWEEP"/slurm/collect-*.out >/dev/null 2>&1 || die "the collect job (--collect-after) left no output"
say "the collect job ran after the array: $(tail -n 1 "$SWEEP"/slurm/collect-*.out)"

# Bug 2 (TERM read as a second Ctrl-C): no attempt may end in an abort.
if grep -h '^=== onehead sweep: exit 130' "$R0/log.txt" "$R1/log.txt" "$R2/log.txt" "$R3/log.txt"; then
  die "a run aborted on TERM (exit 130) instead of saving its state"
fi
grep -q '^=== onehead sweep: exit 3 (stopped by SIGTERM)' "$R0/log.txt" \
  || die "cancelled task 0 did not stop with its state saved: $(grep '^=== onehead sweep: exit' "$R0/log.txt")"
# Bug 1 (one task's requeue requeued the whole array): the untouched task ran once.
[ "$(attempts "$R1")" = 1 ] || die "task 1 was started $(attempts "$R1") times: another task's requeue requeued it"
[ "$(attempts "$R0")" = 1 ] || die "cancelled task 0 was started $(attempts "$R0") times"
for r in "$R2" "$R3"; do
  [ "$(attempts "$r")" -ge 2 ] || die "$r was started $(attempts "$r") time(s), expected a requeue"
  grep -q 'resuming' "$r/log.txt" || die "$r did not resume from its saved state"
  say "$(basename "$r"): $(attempts "$r") attempts; $(grep -m1 'resuming' "$r/log.txt" | sed 's/.*INFO //')"
  grep '^=== onehead sweep' "$r/log.txt" | sed 's/^/    /'
done

say "\$ onehead sweep --collect $SWEEP   (task 0 was cancelled)"
set +e; "$ONEHEAD" sweep --collect "$SWEEP"; rc=$?; set -e
[ "$rc" = 3 ] || die "collect exited $rc, expected 3 (task 0 cancelled, not finished)"
[ "$(status_of "$R0")" = interrupted ] || die "cancelled run 0 is '$(status_of "$R0")' in index.csv, expected interrupted"

# Resubmit the same command: the new array covers only run 0, which resumes.
say "\$ onehead ${SUBMIT[*]}   (again: only the unfinished run)"
out=$("$ONEHEAD" "${SUBMIT[@]}")
echo "$out"
echo "$out" | grep -q '(1 to run)' || die "the resubmission does not cover exactly the one unfinished run"
JOB2=$(echo "$out" | sed -n 's/^submitted job array \([0-9]*\).*/\1/p')
wait_for_array "$JOB2"
set +e; "$ONEHEAD" sweep --collect "$SWEEP"; rc=$?; set -e
[ "$rc" = 0 ] || die "collect exited $rc after the resubmission (some run did not finish)"
ok=$(awk -F, 'NR > 1 && $3 == "ok"' "$SWEEP/index.csv" | wc -l)
[ "$ok" = 4 ] || die "index.csv has $ok finished runs, expected 4"
[ "$(attempts "$R0")" = 2 ] && grep -q 'resuming' "$R0/log.txt" || die "run 0 did not resume in the second array"
rows=$(grep -c . "$R3/epochs.csv")
[ "$rows" = 37 ] || die "$R3/epochs.csv has $rows lines, expected a header + 36 epochs"
say "sweep e2e: 4 of 4 runs finished; cancel (then resubmit), scontrol requeue and USR1 -> self-requeue all resumed"

# --- a two-task array with a 1-minute limit: the long run hits it, the short one does not --
tiny 60 >long.toml
LIMIT=(sweep long.toml --set stages.*.epochs=2,60 --set seed=0 --slurm --name limit
  --results "$WORK/results" --cpus-per-task 1 --time 1 --signal-seconds 40)
say "\$ onehead ${LIMIT[*]}"
out=$("$ONEHEAD" "${LIMIT[@]}")
echo "$out"
JOB3=$(echo "$out" | sed -n 's/^submitted job array \([0-9]*\).*/\1/p')
[ -n "$JOB3" ] || die "no job id in the output"
wait_for_array "$JOB3"
SWEEP="$WORK/results/limit"
set +e; "$ONEHEAD" sweep --collect "$SWEEP"; rc=$?; set -e
[ "$rc" = 0 ] || die "collect of the time-limited sweep exited $rc"
L0=$(run_dir 0); L1=$(run_dir 1)
[ "$(attempts "$L0")" = 1 ] || die "the short run was started $(attempts "$L0") times"
[ "$(attempts "$L1")" -ge 2 ] || die "the long run was started $(attempts "$L1") time(s): it never hit the limit"
grep -q 'stopped by SIGUSR1' "$L1/log.txt" || die "the long run was not stopped by the pre-limit signal"
say "time limit: the long run was stopped before its limit and requeued $(( $(attempts "$L1") - 1 )) time(s), the short one ran once"
grep '^=== onehead sweep' "$L1/log.txt" | sed 's/^/    /'
say "PASS: collect (running/pending), --collect-after, cancel + resubmit, hard requeue, USR1 self-requeue (task with the array's id), time limit in a two-task array"
