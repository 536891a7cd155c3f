#!/usr/bin/env bash
# `make demo`: synthesise the grounding dataset (if absent), start a local Ray head, submit the demo pre-training
# with `ray job submit`, follow it (the untrained model is evaluated beside the job's start-up), then evaluate the
# trained model and summarise.
# Run through scripts/in-private-netns.sh (the Makefile does) so Ray's ports are reachable only on loopback.
#
# The terminal gets the stages, rank 0's progress line every train.log_every steps and a summary table; Ray's
# own notes, per-report lines and known-harmless warnings are left out (VOLTA_VERBOSE=1 keeps everything, and
# each evaluation's full output is in the run folder). VOLTA_DEMO_STEPS=N (`make demo DEMO_STEPS=N`) trains N
# steps instead of the recipe's. The run is recorded in the MLflow store runs/demo/mlflow; the summary ends with
# the command that serves it on this machine's 127.0.0.1.
#
#   scripts/demo.sh summary RUN_DIR   the summary of a finished run (eval-*.json, metrics.jsonl in RUN_DIR)
#   scripts/demo.sh filter            the output filter alone: stdin to stdout without the known noise
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
VERBOSE=${VOLTA_VERBOSE:-0}
STORE=runs/demo/mlflow  # relative: the dashboard command is run from the repository

# Lines that say nothing a person can act on, printed below anything Python can silence (Ray's CLI and C++ logs,
# DeepSpeed's print, torch's C++ warnings). Extended regular expressions, one per line.
NOISE=(
  'cli\.py:[0-9]+ -- '                                         # ray job submit: address, job id, "Next steps"
  'job_manager\.py:[0-9]+ -- Runtime env is setting up'
  'sdk\.py:[0-9]+ -- WebSocket closed for job '
  'Reporting training result [0-9]+: TrainingReport\('          # every rank, every report: all the metrics
  '^Running entrypoint for job '
  'network_util\.cc:[0-9]+: Failed to determine local IP'     # no route out of the private namespace
  "Actor with class name: 'PreemptionWatcher' .* constructor arguments in the object store"
  '\[c10d\] The hostname of the client socket cannot be retrieved'
  'cpp_extension\.py:[0-9]+\] No CUDA runtime is found'
  'DeepSpeed deepspeed\.ops\.[a-z_.]+ built successfully'
)

quiet() {  # stdin to stdout without NOISE and without the "metrics" block of the driver's final JSON (the table
  # shows them; metrics.jsonl has them all); everything when VOLTA_VERBOSE=1. Never fails on an empty result.
  if [[ $VERBOSE == 1 ]]; then
    cat
  else
    { grep --line-buffered -v -E "$(IFS='|'; echo "${NOISE[*]}")" || true; } |
      sed -u -E '/^  "metrics": \{$/,/^  \},?$/d'
  fi
}

summary() {  # RUN_DIR: the table, where the run's files are, and the dashboard command
  "$BIN/volta" report "$1" --table
  echo
  echo "dashboard (MLflow, this run's params and curves): run on this machine, then open the URL it prints:"
  echo "  .venv/bin/volta dashboard --store $STORE"
}

case "${1:-}" in
  summary) summary "$2"; exit 0 ;;
  filter) quiet; exit 0 ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [summary RUN_DIR | filter]" >&2; exit 2 ;;
esac

run_logged() {  # LOG CMD...: run CMD with its stderr in LOG; show LOG's end if it fails (all of it when verbose)
  local log=$1
  shift
  if [[ $VERBOSE == 1 ]]; then
    "$@" 2> >(tee "$log" >&2)
  elif ! "$@" 2>"$log"; then
    tail -n 20 "$log" >&2
    echo "demo: failed: ${*:1:3} ... (full output: $log)" >&2
    return 1
  fi
}

RECIPE=${VOLTA_DEMO_RECIPE:-configs/demo.yaml}
DATA=$ROOT/data/synth
read -r RUN_NAME STORAGE EXPERIMENT < <("$BIN/volta" config show -c "$RECIPE" | "$BIN/python" -c '
import sys, yaml
c = yaml.safe_load(sys.stdin)
print(c["ray"]["run_name"], c["storage"]["path"], c["tracking"]["experiment"])')
[[ $STORAGE == /* ]] || STORAGE=$ROOT/$STORAGE
RUN=$STORAGE/$RUN_NAME  # the run's storage folder: checkpoints, metrics, heat maps, final/, export/
OUT=$ROOT/runs/demo
RAY_DIR=${VOLTA_DEMO_RAY_DIR:-/tmp/volta-demo-ray}
DASH_PORT=${VOLTA_DEMO_DASHBOARD_PORT:-8265}
OVERRIDES="--set tracking.uri=sqlite:///$ROOT/$STORE/mlflow.db"
if [[ -n ${VOLTA_DEMO_STEPS:-} ]]; then
  OVERRIDES+=" --set train.max_steps=$VOLTA_DEMO_STEPS --set train.checkpoint_every=$VOLTA_DEMO_STEPS"
  OVERRIDES+=" --set train.val_every=$VOLTA_DEMO_STEPS"
fi
[[ $VERBOSE == 1 ]] && OVERRIDES+=" --verbose"
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Token authentication on, explicitly: the head creates or reuses ~/.ray/auth_token and `ray job` clients send it.
export RAY_AUTH_MODE=token
# The head is stopped with SIGTERM at the end; Ray 2.60 then first "drains" the node for up to 30 s (on a cluster
# that drain is the preemption notice a Train worker checkpoints on, and the k8s pods keep it; here the job has
# finished, there is nothing to save). Measured: the demo's last 33 s were this wait.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
start=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

if [[ ! -f $DATA/train/sizes.json || ! -f $DATA/val/sizes.json || ! -d $DATA/tokenizer ]]; then
  say "synthesising the demo dataset into $DATA"
  run_logged "$OUT.synth.log" "$BIN/volta" data synth --out "$DATA" --train-samples 6000 --val-samples 256 \
    --image-size 128 --workers 2
fi

mkdir -p "$OUT"
if [[ "${VOLTA_NETNS:-}" == "1" ]]; then
  # Its dashboard listens inside the private namespace: no URL that would work from this machine's browser.
  say "starting a local Ray head (log: $OUT.ray-head.log)"
else
  say "starting a local Ray head (dashboard http://127.0.0.1:$DASH_PORT, log: $OUT.ray-head.log)"
  echo "note: not in a private network namespace; Ray may listen on this machine's addresses" >&2
fi
rm -rf "$RAY_DIR"
# `ray start` with token auth needs ~/.ray/auth_token to exist already (it never creates one): make it once.
"$BIN/ray" get-auth-token --generate >/dev/null
"$BIN/ray" start --head --block --num-cpus 2 --port 6390 --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASH_PORT" --temp-dir "$RAY_DIR" --disable-usage-stats >"$OUT.ray-head.log" 2>&1 &
head_pid=$!
trap 'kill "$head_pid" 2>/dev/null; wait "$head_pid" 2>/dev/null || true' EXIT
trap 'exit 143' TERM  # so that the EXIT trap stops the head when the demo is terminated

# While the head starts: a fresh run (its storage folder and its MLflow store: a rerun would otherwise log into
# the old MLflow run). The experiment is made here so that its artifacts (heat maps) land in the store folder,
# not in ./mlruns.
rm -rf "$RUN" "$OUT/$RUN_NAME" "$ROOT/$STORE" "$OUT/untrained"
mkdir -p "$ROOT/$STORE/artifacts" "$OUT/untrained"
run_logged "$OUT.mlflow-store.log" "$BIN/python" -c '
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db")
client.create_experiment(sys.argv[2], artifact_location=Path(sys.argv[1], "artifacts").as_uri())
' "$ROOT/$STORE" "$EXPERIMENT"
# The head is up when its job server answers; the port is watched first (a `ray` command costs a Python start
# of ~2 s of CPU that the starting head needs).
for _ in $(seq 240); do
  (exec 3<>"/dev/tcp/127.0.0.1/$DASH_PORT") 2>/dev/null && break
  sleep 0.5
done
for _ in $(seq 60); do
  "$BIN/ray" job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1 && break
  sleep 2
done

say "ray job submit -- python orchestration/pretrain.py --config $RECIPE"
# The untrained baseline (the recipe freshly initialised, one thread) is evaluated beside the job's start-up,
# which is one-threaded Python for its first minute and leaves a core idle (measured: ~45% idle).
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run_logged "$OUT/untrained/eval-untrained.log" "$BIN/volta" eval all \
  --config "$RECIPE" --random-init >"$OUT/untrained/eval-untrained.json" &
untrained_pid=$!
# RAY_ADDRESS for every actor of the job: Ray's own helpers (Train's placement-group cleaner) look the cluster up
# by scanning this machine's processes and fail with a traceback when another Ray instance runs here too.
"$BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" \
  --runtime-env-json '{"env_vars": {"RAY_ADDRESS": "127.0.0.1:6390"}}' -- \
  bash -c "cd '$ROOT' && '$BIN/python' orchestration/pretrain.py --config '$RECIPE' $OVERRIDES" 2>&1 | quiet
wait "$untrained_pid"
mv "$OUT/untrained/eval-untrained.log" "$OUT/untrained/eval-untrained.json" "$RUN/"

say "evaluating the trained model on the validation split"
# Side by side with one thread each: their start-up (imports, model build) is one-threaded Python, so two-thread
# runs one after the other leave a core idle for a good part of the time.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run_logged "$RUN/visualize.log" "$BIN/volta" visualize \
  --checkpoint "$RUN/final" --shards "$DATA/val" --num 4 --out "$RUN/heatmaps-final" >/dev/null &
visualize_pid=$!
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run_logged "$RUN/eval-trained.log" "$BIN/volta" eval all \
  --checkpoint "$RUN/final" >"$RUN/eval-trained.json"
wait "$visualize_pid"

say "summary"
summary "$RUN"
