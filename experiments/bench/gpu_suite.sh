#!/usr/bin/env bash
# The benchmark suite (experiments/bench/suite.py) on a lent GPU machine (the device tool): every
# part at full size in bf16, its rows in $OUT/suite.md, suite.jsonl and suite.log, in one call.
# The machine's image has jax, flax, optax, torch with CUDA, transformers and einops; the peers'
# other packages and jaxaigc's pure-Python dependencies it lacks travel in .gpu/. Here, once:
#     echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu
#     S=$(echo .venv/lib/python3.*/site-packages)
#     cp -r $S/{clip,openai_clip-*.dist-info,ml_collections,tensorboardX,diffusers} .gpu/
#     .venv/bin/pip download --no-deps -d /tmp/wheels dalle-pytorch
#     unzip -q -o /tmp/wheels/dalle_pytorch-*.whl 'dalle_pytorch/*' -d .gpu
#     find .gpu -name __pycache__ -prune -exec rm -rf {} +     # ~33 MB; the carry limit is 64
# then: run(command="bash experiments/bench/gpu_suite.sh", carry=[".gpu"], timeout_s=600).
# The part limits below sum to 540 s; the CLIP parts' budgets allow for the RN50 step's
# convolution autotuning (over 4 minutes on the H200 on 2026-11-27 before it was cut short).
# PARTS and LIMITS override the defaults.
set -uo pipefail
export PYTHONPATH="$PWD:$PWD/.gpu" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/bench}"
limits="60,ceiling=25,clip-vit-b16=80,clip-rn50=80,dalle-sample=55,dalle-layer=35"
limits="${LIMITS:-$limits,unclip-prior=45,gpt-ppo=45,gpt-rollout=55}"
python3 experiments/bench/suite.py --size full --out "$out" --part-timeout "$limits" \
  ${PARTS:+--parts "$PARTS"}
