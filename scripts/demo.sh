#!/usr/bin/env bash
# `make demo`: synthesise the grounding dataset (if absent), start a local Ray head, submit the demo pre-training
# with `ray job submit`, follow it, then evaluate the untrained and the trained model and summarise.
# Run through scripts/in-private-netns.sh (the Makefile does) so Ray's ports are reachable only on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
RECIPE=${VOLTA_DEMO_RECIPE:-configs/demo.yaml}
DATA=$ROOT/data/synth
RUN_NAME=$("$BIN/volta" config show -c "$RECIPE" | "$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["ray"]["run_name"])')
OUT=$ROOT/runs/demo
RUN=$OUT/$RUN_NAME
RAY_DIR=${VOLTA_DEMO_RAY_DIR:-/tmp/volta-demo-ray}
DASH_PORT=${VOLTA_DEMO_DASHBOARD_PORT:-8265}
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Token authentication on, explicitly: the head creates or reuses ~/.ray/auth_token and `ray job` clients send it.
export RAY_AUTH_MODE=token
start=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

if [[ ! -f $DATA/train/sizes.json || ! -f $DATA/val/sizes.json || ! -d $DATA/tokenizer ]]; then
  say "synthesising the demo dataset into $DATA"
  "$BIN/volta" data synth --out "$DATA" --train-samples 6000 --val-samples 256 --image-size 128 --workers 2
fi

say "starting a local Ray head (dashboard http://127.0.0.1:$DASH_PORT)"
if [[ "${VOLTA_NETNS:-}" != "1" ]]; then
  echo "note: not in a private network namespace; Ray may listen on this machine's addresses" >&2
fi
rm -rf "$RAY_DIR"
# `ray start` with token auth needs ~/.ray/auth_token to exist already (it never creates one): make it once.
"$BIN/ray" get-auth-token --generate >/dev/null
"$BIN/ray" start --head --block --num-cpus 2 --port 6390 --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASH_PORT" --temp-dir "$RAY_DIR" --disable-usage-stats >"$OUT.ray-head.log" 2>&1 &
head_pid=$!
trap 'kill "$head_pid" 2>/dev/null; wait "$head_pid" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  "$BIN/ray" job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1 && break
  sleep 2
done

say "ray job submit -- python orchestration/pretrain.py --config $RECIPE"
rm -rf "$RUN" "$OUT/ray/$RUN_NAME"
"$BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" -- \
  bash -c "cd '$ROOT' && '$BIN/python' orchestration/pretrain.py --config '$RECIPE'"

say "evaluating the untrained and the trained model on the validation split"
"$BIN/volta" eval all --checkpoint "$RUN/final" --random-init >"$RUN/eval-untrained.json"
"$BIN/volta" eval all --checkpoint "$RUN/final" >"$RUN/eval-trained.json"
"$BIN/volta" report "$RUN" >"$RUN/report.json"
"$BIN/volta" visualize --checkpoint "$RUN/final" --shards "$DATA/val" --num 4 --out "$RUN/heatmaps-final" >/dev/null

say "summary"
"$BIN/python" - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
before = json.loads((run / "eval-untrained.json").read_text())
after = json.loads((run / "eval-trained.json").read_text())
report = json.loads((run / "report.json").read_text())
def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d
def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
fb, fa = flat(before), flat(after)
keys = [k for k in fa if any(t in k for t in ("grounding.accuracy", "grounding.acc", "random", "center", "i2t_r1", "t2i_r1", "probe.accuracy"))]
print(f"steps trained: {report['steps']}")
loss = report.get("train/loss", {})
print(f"total loss: {loss.get('first', float('nan')):.3f} -> {loss.get('last', float('nan')):.3f}")
print(f"{'metric':48s} {'untrained':>10s} {'trained':>10s}")
for k in sorted(keys):
    b, a = fb.get(k), fa.get(k)
    print(f"{k:48s} {b if b is None else round(b, 4)!s:>10s} {round(a, 4)!s:>10s}")
print(f"loss curves:        {report['loss_curves']}")
print(f"heat maps:          {run / 'heatmaps-final'} (and {run / 'heatmaps'} during training)")
print(f"final model:        {run / 'final'}")
print(f"exported encoders:  {run / 'export'}")
print(f"Ray checkpoints:    {run.parent / 'ray' / run.name}")
PY
