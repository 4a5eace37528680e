#!/usr/bin/env bash
# The adapter study of docs/adapter_study.md, both scales on one GPU machine (16 CPU cores) in one go:
#   bash scripts/adapter_study_gpu.sh OUT_DIR [DEADLINE_SECONDS]
# 1. pretrains the larger LM (8 layers x 512, tiny_pretrain.py's recipe) while the demo-scale study runs;
# 2. then runs the same study on the larger LM;
# 3. at DEADLINE_SECONDS (0: none) stops what still runs and writes both reports from the runs finished so far.
# Reports: OUT_DIR/{demo_scale,lm_8x512}/{report.md,results.json,*.png}. Rerunning resumes (finished runs reused).
# Knobs for a dry run at smoke size on a CPU: PRESET=smoke SEEDS="0" LM_STEPS=20 DEVICE=cpu JOBS=2 ...
set -u
OUT=${1:-outputs/adapter_study}
DEADLINE=${2:-0}
PRESET=${PRESET:-demo}
SEEDS=${SEEDS:-"0 1 2 3 4"}
SWEEP=${SWEEP:-"5e-4 1e-3 2e-3"}
VARIANTS=${VARIANTS:-"lora moslora moslora:init=orthogonal moslora:init=identity lora:params=moslora moslora:init=zero:lr=1e-3"}
LM_STEPS=${LM_STEPS:-4000}
LM_WORKERS=${LM_WORKERS:-6}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-8}
LAUNCHER=${LAUNCHER:-python}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT"/*.status
start=$(date +%s)

launch() {  # launch NAME COMMAND...: in its own session (killed as a group), exit status to OUT/NAME.status
    local name=$1; shift
    setsid bash -c '"$@" >>"$0.log" 2>&1; echo $? >"$0.status"' "$OUT/$name" "$@" </dev/null >/dev/null 2>&1 &
    echo $!
}
done_() { [ -f "$OUT/$1.status" ]; }
study_cmd() {  # study_cmd NAME EXTRA_FLAGS...
    local name=$1; shift
    echo $PY scripts/compare_adapters.py --variants $VARIANTS --seeds $SEEDS --preset "$PRESET" --lr_sweep $SWEEP \
        --select_metric vqav2/overall --jobs "$JOBS" --launcher "$LAUNCHER" --output_dir "$OUT/$name" "$@"
}
LM_DIR="$OUT/backbones-8x512"
LM_FLAGS="--only lm --lm-size 8x512 --lm-steps $LM_STEPS --workers $LM_WORKERS --device $DEVICE --out $LM_DIR"
[ "$DEVICE" = cuda ] && LM_FLAGS="$LM_FLAGS --bf16"

pids=()
if [ -f "$LM_DIR/lm/model.safetensors" ]; then echo 0 >"$OUT/lm_pretrain.status"
else pids+=("$(launch lm_pretrain $PY scripts/pretrain_tiny_backbones.py $LM_FLAGS)"); fi
pids+=("$(launch demo_scale $(study_cmd demo_scale))")
large_started=0
while :; do
    if [ $large_started -eq 0 ] && done_ lm_pretrain; then
        large_started=1
        echo "[gpu-study] larger LM: exit $(cat "$OUT/lm_pretrain.status") after $(( $(date +%s) - start )) s"
        [ "$(cat "$OUT/lm_pretrain.status")" = 0 ] && \
            pids+=("$(launch lm_8x512 $(study_cmd lm_8x512 --model_name_or_path "$LM_DIR/lm"))")
    fi
    if done_ demo_scale && [ $large_started -eq 1 ] && { done_ lm_8x512 || [ "$(cat "$OUT/lm_pretrain.status")" != 0 ]; }
    then break; fi
    if [ "$DEADLINE" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$DEADLINE" ]; then
        echo "[gpu-study] deadline of $DEADLINE s reached: stopping, reporting the finished runs"
        for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
        sleep 3
        for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
        break
    fi
    sleep 2
done
for name in demo_scale lm_8x512; do
    extra=()
    [ $name = lm_8x512 ] && extra=(--model_name_or_path "$LM_DIR/lm")
    [ -d "$OUT/$name" ] && $(study_cmd $name "${extra[@]}") --report_only >>"$OUT/$name.log" 2>&1
    echo "[gpu-study] $name: $(tail -1 "$OUT/$name.log")"
done
echo "[gpu-study] done after $(( $(date +%s) - start )) s"
