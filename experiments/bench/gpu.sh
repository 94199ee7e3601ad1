#!/usr/bin/env bash
# The CLIP benchmark on a lent GPU machine (the device tool), in bf16 at batch 256, one process per
# model so that a slow compile costs one row, not both. OpenAI's clip package travels in .gpu/
# (ignored by git); the machine's image has jax, flax, optax and torch with CUDA. Here, once:
#     mkdir -p .gpu && cp -r .venv/lib/python3.*/site-packages/clip .gpu/
# then: run(command="bash experiments/bench/gpu.sh", carry=[".gpu"], timeout_s=580). On the
# H200 (2026-11-27) the ViT-B/32 train step had not compiled and warmed up 150 s after its
# encode_image row: hence 270 s per model.
# Each model's full output goes to $OUT/clip_<model>.txt; MODELS, BATCH and MODEL_TIMEOUT override.
set -uo pipefail
export PYTHONPATH="$PWD:$PWD/.gpu" PYTHONUNBUFFERED=1
# jax and torch share the GPU in one process: jax preallocates 75% of its memory by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
for model in ${MODELS:-ViT-B/32 RN50}; do
  log="$out/clip_${model//\//-}.txt"
  date +%T
  timeout "${MODEL_TIMEOUT:-270}" python3 experiments/bench/clip.py --models "$model" \
    --batch "${BATCH:-256}" --repeats 10 --dtype bfloat16 >"$log" 2>&1
  echo "$model: exit $?"
  grep -v '^ *@' "$log" | tail -n 8
done
