#!/usr/bin/env bash
# Everything one lent GPU machine should run, in one command of under 10 minutes
# (docs/development.md, "GPU acceptance run"):
#   1. benchmarks/gpu_check.py, first part: environment, CUDA tests, training speed, loader, torchrun;
#   2. the cpu preset on CUHK03 on CUDA, three seeds, and its supervised ceiling, one seed, at the same time
#      (benchmarks/accuracy.py; the camera-aware path end to end, which the acceptance run's real_data check,
#      on the plain market1501 preset, does not train);
#   3. gpu_check.py's second part (real_data, clustering_scale) in the time that is left;
# then the accuracy runs' logs, records and JSON (no checkpoints) as OUTDIR/acc.tgz.
#
# usage, from the repository root:  bash benchmarks/gpu_session.sh OUTDIR [overrides for the accuracy runs]
# needs .gpu/ prepared as docs/development.md says: wheels/ (omegaconf, PyYAML), cuhk03-dev/ (Market layout)
# and mnv2.pt (`isereid weights import`). Environment: GPU_DEVICE (default cuda; cpu rehearses the script),
# END_S (seconds by which everything has ended, default 575), ACC_TIMEOUT (seconds for the accuracy runs,
# default what is left after part 1 minus 100, at most 360), SKIP_PIP (set: use the installed packages).
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [overrides]}; shift
EXTRA="$*"
DEVICE=${GPU_DEVICE:-cuda}
END=${END_S:-575}
GPU=.gpu
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -z "${SKIP_PIP:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/wheels/*.whl || exit 3
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src
fi
LOG="$OUT/session.txt"
{ date -u; nvidia-smi 2>&1 | head -15; nproc
  python3 -c "import torch, torchvision, omegaconf, numpy, scipy, sklearn; print(torch.__version__, torchvision.__version__, \
omegaconf.__version__, numpy.__version__, scipy.__version__, sklearn.__version__, 'cuda', torch.cuda.is_available())"
} > "$LOG" 2>&1
echo "part 1 from ${SECONDS}s" >> "$LOG"
python3 benchmarks/gpu_check.py --device "$DEVICE" --output "$OUT/gpu_check1.json" \
    --sections environment,cuda_tests,train_speed,loader_throughput,torchrun --budget-s 230
echo "part 1 rc $? at ${SECONDS}s" >> "$LOG"

ACC=$(mktemp -d)
ACC_TIMEOUT=${ACC_TIMEOUT:-$(( END - SECONDS - 100 < 360 ? END - SECONDS - 100 : 360 ))}
echo "accuracy runs from ${SECONDS}s, ${ACC_TIMEOUT}s each at most" >> "$LOG"
accuracy() {  # NAME VARIANT SEED
  OMP_NUM_THREADS=3 timeout "$ACC_TIMEOUT" python3 benchmarks/accuracy.py --data-root "$GPU/cuhk03-dev" --config cpu \
    --seeds 1 --first-seed "$3" --variants "$2" --work-dir "$ACC" --output "$ACC/$1.json" \
    model.pretrained_path="$GPU/mnv2.pt" $EXTRA > "$ACC/$1.log" 2>&1
  echo "$1 rc $? at ${SECONDS}s" >> "$LOG"
}
accuracy preset_s1 preset 1 & accuracy preset_s2 preset 2 & accuracy preset_s3 preset 3 &
accuracy supervised_s1 supervised 1 &
wait

left=$(( END - SECONDS - 15 ))
if [ "$left" -gt 40 ]; then
  echo "part 2 from ${SECONDS}s, budget ${left}s" >> "$LOG"
  python3 benchmarks/gpu_check.py --device "$DEVICE" --output "$OUT/gpu_check2.json" \
      --sections real_data,clustering_scale --budget-s "$left" --data-root "$GPU/cuhk03-dev"
  echo "part 2 rc $? at ${SECONDS}s" >> "$LOG"
fi
tar czf "$OUT/acc.tgz" -C "$ACC" --exclude='*.pt' --exclude='*.npz' --exclude='tensorboard' --exclude='*.png' .
echo "done at ${SECONDS}s" >> "$LOG"
