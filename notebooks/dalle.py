# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DALL-E: text to image
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/)
#
# On Colab: the badge opens Colab's GitHub tab; enter this repository, open
# `notebooks/dalle.ipynb`
# and give the first cell the repository's address. In a checkout: open it in Jupyter on the
# `.venv` kernel (`make install-test` installs ipykernel there). The same cells are in
# `notebooks/dalle.py` (jupytext's percent format); `make notebooks` syncs the two.
#
# DALL-E (Ramesh et al. 2021) in three runs: a discrete VAE that turns images into a grid of
# tokens, a CLIP, and the transformer that models caption tokens followed by image tokens. The
# quick recipes train each for a few dozen steps on the library's shapes scenes (about 2 minutes
# on 2 CPU cores; the CLIP is the CLIP notebook's when it ran first), then the DALL-E run draws
# images for captions and CLIP ranks them. Quick runs show the API, not the quality: the quick
# dVAE has not learnt to draw, so the images are near-uniform squares. Nothing is downloaded
# after the first cell.

# %%
# On Colab: jaxaigc from its repository (with the JAX build for the runtime's GPU or TPU: the
# plain install would replace Colab's JAX by a CPU-only one), the CLIP BPE vocabulary
# (openai-clip, without its PyTorch dependencies) and the Debian packages the embedded data come
# from, as `make install` and `make data-packages` do. Elsewhere nothing: run the notebook in a
# checkout's .venv.
import importlib.util
import shutil
import subprocess
import sys

REPOSITORY = ""  # @param {type:"string"}
DEBIAN_DATA = [
    "fonts-noto-color-emoji",
    "fonts-symbola",
    "ruby-gemojione",
    "dataset-fashion-mnist",
    "wordnet-base",
    "fortunes-min",
]
if "google.colab" in sys.modules:
    if not REPOSITORY.startswith("https://"):
        raise ValueError(
            f"REPOSITORY={REPOSITORY!r}: enter the https:// address of the jaxaigc repository "
            "this notebook was opened from in the field above, then run this cell again"
        )
    # Colab's TPU runtimes come with libtpu, its GPU runtimes with nvidia-smi.
    if importlib.util.find_spec("libtpu"):
        jax_build = ["jax[tpu]>=0.10,<0.11"]
    elif shutil.which("nvidia-smi"):
        jax_build = ["jax[cuda12]>=0.10,<0.11"]
    else:
        jax_build = []
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"jaxaigc @ git+{REPOSITORY}", *jax_build], check=True)
    subprocess.run([*pip, "--no-deps", "openai-clip==1.0.1"], check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *DEBIAN_DATA], check=True)

# %%
# The devices JAX sees and the mesh the recipes train on. The quick models are a few MB, so each
# device holds a whole copy and takes a slice of every batch: all devices on the mesh's `data`
# axis, be they a TPU's cores (8 on a v2-8), GPUs or the CPU. A model too big for one device is
# split over `fsdp` instead (`jaxaigc plan` says how far). QUICK = False trains the full recipes,
# those behind the README's figures, in their own folder.
import os
from pathlib import Path

import jax
import ml_collections

QUICK = True  # @param {type:"boolean"}
devices = jax.devices()
MESH = {"data": len(devices), "fsdp": 1, "tensor": 1}
print(
    f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind} -> mesh "
    + " x ".join(f"{axis} {size}" for axis, size in MESH.items())
)


def on_mesh(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with MESH in each of its mesh sections (unCLIP's stages have one each)."""
    for key, value in config.items():
        if key == "mesh":
            value.shape.update(MESH)
        elif isinstance(value, ml_collections.ConfigDict):
            on_mesh(value)
    return config


# A run resumes from the checkpoints in its directory (a finished one is only evaluated again),
# so notebooks sharing this folder share their runs: the DALL-E and unCLIP notebooks reuse the
# CLIP notebook's CLIP. JAXAIGC_NOTEBOOK_RUNS moves it (the tests give all notebooks one).
RUNS = Path(os.environ.get("JAXAIGC_NOTEBOOK_RUNS", "runs/notebooks")) / (
    "quick" if QUICK else "full"
)

# %% [markdown]
# ## Train
#
# `run.get_config(recipe, quick=True)` is a recipe's config, an `ml_collections.ConfigDict` whose
# fields you may change before training (here its mesh). `run.train_and_evaluate` trains it in a
# run directory, resuming from the checkpoints there, evaluates it and writes
# `report.{json,md,html}` beside them. The DALL-E recipe reads the dVAE's and CLIP's runs next to
# its own (`config.stages`), so they come first.

# %%
from jaxaigc import run
from jaxaigc.evaluate.report import format_figure

reports = {}
for recipe in ("clip", "dvae", "dalle"):
    config = on_mesh(run.get_config(recipe, quick=QUICK))
    reports[recipe] = run.train_and_evaluate(recipe, config, RUNS / recipe)

for report in reports.values():
    print(f"{report['title']} ({report['seconds']:.0f} s)")
    for figure in report["figures"][:3]:
        print("   ", format_figure(figure))

# %% [markdown]
# Each run keeps its metrics in `metrics.jsonl` (and TensorBoard logs); the training losses:

# %%
import matplotlib.pyplot as plt

from jaxaigc.train.metrics import read_metrics

fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
for ax, recipe in zip(axes, reports, strict=True):
    logged = [r for r in read_metrics(RUNS / recipe) if "train/loss" in r]
    ax.plot([r["step"] for r in logged], [r["train/loss"] for r in logged], marker="o")
    ax.set(title=recipe, xlabel="step", ylabel="training loss")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Text to image
#
# `pipelines.load(run_directory)` is a run's inference object; a DALL-E run's is a text-to-image
# pipeline: for each caption it samples `n` grids of dVAE image tokens with its transformer, the
# dVAE decodes them, and the run's reranker (`config.sample.rerank`, CLIP by default) sorts the
# images best first (`out.images` uint8 [captions, n, h, w, 3], `out.scores` its scores, CLIP's
# cosine similarities by default). `write_grid` draws the grid `jaxaigc generate` writes, a row
# per caption.

# %%
from IPython.display import Image

from jaxaigc import pipelines
from jaxaigc.evaluate.grids import write_grid

dalle = pipelines.load(RUNS / "dalle")
captions = ["a large red circle left of a small blue square", "a small yellow triangle at the top"]
out = dalle(captions, n=8, seed=0)
print(out.images.shape, out.scores.round(3))
Image(filename=write_grid(RUNS / "dalle_generated.png", out.images, captions=captions, scale=4))

# %% [markdown]
# ## Next
#
# - `unclip.ipynb`: the same captions through unCLIP (a diffusion prior and decoder on CLIP's
#   embeddings), called the same way.
# - `jaxaigc generate runs/dalle "a red circle" --n 16` from a shell; `jaxaigc demo` trains the
#   full recipes (about 53 minutes on 2 CPU cores).
