#!/usr/bin/env bash
# GPU check (issue 16, item 4): a few minutes on a CUDA box; exits non-zero on any failure.
#
#   scripts/gpu_check.sh                 # DEVICE=cuda DTYPE=bfloat16
#   DEVICE=cpu scripts/gpu_check.sh      # the same checks on the CPU (about a minute; tests this script)
#
# 1. `firetitan doctor`: what `device: auto` picks here and which dtypes work.
# 2. Train-step time of a TrainerEngine job on $DEVICE in $DTYPE against float32 on the CPU, same batches.
# 3. The seed walkthrough (examples/training_and_sampling.py) end to end on $DEVICE in $DTYPE, in a
#    private state directory: trainer, bf16 snapshots, hot-load, sampling; the worker logs must show
#    both processes loaded on the resolved device and dtype.
# 4. The 2-rank data-parallel trainer (NCCL on CUDA), only when the trainer has `--world-size`.
# Env: PY (python), MODEL, STEPS (walkthrough steps), OUT (keep results there; default a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODEL=${MODEL:-firetitan/tiny-qwen3}
if [[ $DEVICE == cpu ]]; then STEPS=${STEPS:-4}; TIMED=${TIMED:-3}; else STEPS=${STEPS:-40}; TIMED=${TIMED:-8}; fi
OUT=${OUT:-$(mktemp -d -t firetitan-gpu-check-XXXX)}
HOME_DIR="$OUT/home"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

fail() { echo "gpu_check: FAIL: $*" >&2; exit 1; }
section() { echo; echo "== $* =="; }

stop_daemon() {  # the walkthrough's private control plane (and its workers, which it stops on exit)
  local file="$HOME_DIR/control_plane.json"
  [[ -f $file ]] || return 0
  local pid
  pid=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$file" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
}
trap stop_daemon EXIT

section "doctor"
"$PY" -m firetitan doctor --json > "$OUT/doctor.json" || fail "firetitan doctor"
"$PY" - "$OUT/doctor.json" "$DEVICE" "$DTYPE" <<'EOF' || fail "doctor: the requested device/dtype does not work here"
import json, sys
report, device, dtype = json.load(open(sys.argv[1]))["devices"], sys.argv[2], sys.argv[3]
print(json.dumps(report, indent=2))
if device.startswith("cuda") and report["auto_device"] != "cuda":
    sys.exit(f"auto picks {report['auto_device']!r}, not cuda: no CUDA device visible to torch")
if report["dtypes"].get(dtype) != "ok":
    sys.exit(f"{dtype} on {report['auto_device']}: {report['dtypes'].get(dtype)}")
EOF

section "train-step time: $DEVICE $DTYPE vs cpu float32 ($MODEL)"
"$PY" scripts/step_time.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --steps "$TIMED" | tee "$OUT/step_time.json" \
  || fail "step_time.py"
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if r["losses_agree"] else "losses differ")' \
  "$OUT/step_time.json" || fail "the $DEVICE run's loss differs from the CPU run's"

section "seed walkthrough on $DEVICE in $DTYPE ($STEPS steps)"
started=$(date +%s)
FIRETITAN_HOME="$HOME_DIR" FIRETITAN_DAEMON_IDLE_EXIT=30 timeout 1200 "$PY" examples/training_and_sampling.py \
  --base-model "$MODEL" --steps "$STEPS" --eval-interval "$STEPS" --device "$DEVICE" --dtype "$DTYPE" \
  2>&1 | tee "$OUT/walkthrough.log" || fail "the walkthrough exited non-zero (log: $OUT/walkthrough.log)"
walk_s=$(( $(date +%s) - started ))
want_device=$("$PY" -c 'import sys; from firetitan.devices import resolve_device; print(resolve_device(sys.argv[1]))' "$DEVICE")
for role in trainer deployment; do
  grep -h "model_loaded" "$HOME_DIR"/logs/*.log 2>/dev/null | grep "firetitan.$role\|firetitan.server.$role" \
    | grep -q "device=$want_device.*dtype=$DTYPE\|dtype=$DTYPE.*device=$want_device" \
    || fail "no $role log line shows device=$want_device dtype=$DTYPE (logs: $HOME_DIR/logs)"
done
echo "walkthrough: ${walk_s}s wall, trainer and deployment on $want_device in $DTYPE"

section "2-rank data-parallel trainer"
if "$PY" -m firetitan.server.trainer --help 2>/dev/null | grep -q -- "--world-size"; then
  if "$PY" benchmarks/trainer_step.py --help 2>/dev/null | grep -q -- "--device"; then
    "$PY" benchmarks/trainer_step.py --device "$DEVICE" --out "$OUT/trainer_step.json" 2>&1 | tail -20 \
      || fail "benchmarks/trainer_step.py (world sizes 1 and 2) on $DEVICE"
  else
    echo "skipped: benchmarks/trainer_step.py has no --device flag yet (world sizes run on the CPU only)"
  fi
else
  echo "skipped: this trainer has no --world-size flag (the FSDP2 trainer is not merged here)"
fi

section "summary"
"$PY" - "$OUT/step_time.json" "$walk_s" "$DEVICE" "$DTYPE" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
t, c = r["target"], r["cpu_float32"]
print(f"step time {t['device']} {t['dtype']}: {t['median_step_s']}s; cpu float32: {c['median_step_s']}s; "
      f"ratio {r['step_time_over_cpu']}x; walkthrough {sys.argv[2]}s on {sys.argv[3]} {sys.argv[4]}: OK")
EOF
echo "gpu_check: OK (results in $OUT)"
