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
# # Your own data: WebDataset shards, a CLIP trained on them, a pod sized for it
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/)
#
# On Colab: the badge opens Colab's GitHub tab; enter this repository, open
# `notebooks/your_own_data.ipynb`
# and give the first cell the repository's address. In a checkout: open it in Jupyter on the
# `.venv` kernel (`make install-test` installs ipykernel there). The same cells are in
# `notebooks/your_own_data.py` (jupytext's percent format); `make notebooks` syncs the two.
#
# Image-caption pairs written as WebDataset tar shards (the layout img2dataset writes), the CLIP
# recipe trained on them for a few steps, its metrics read back and the model used; then `jaxaigc
# plan` sizes the full-size ViT-B/32 for a pod. About 2 minutes on 2 CPU cores; nothing is
# downloaded after the first cell.

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
# ## Shards
#
# A shard is a tar file of samples `KEY.jpg` (or `.png`, `.webp`) with its caption `KEY.txt` and
# optionally `KEY.json`; img2dataset names them `00000.tar`, `00001.tar`, ... Here the images are
# drawn in the notebook, one coloured shape each, captioned with its colour and shape; put your own
# files and captions in their place. One image is deliberately not an image: a record that does not
# decode is skipped and counted, not fatal.

# %%
import io
import json
import tarfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def drawing(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One shape of ``colour`` at a random place and size on a dark background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
    r = int(rng.integers(10, 20))
    x, y = (int(v) for v in rng.integers(r, size - r, 2))
    draw, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


SHARDS = Path("shards")
SHARDS.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
key = 0
for shard in range(2):
    with tarfile.open(SHARDS / f"{shard:05d}.tar", "w") as tar:
        for _ in range(96):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            jpeg = io.BytesIO()
            drawing(colour, shape, rng).save(jpeg, format="JPEG", quality=95)
            add(tar, f"{key:09d}.jpg", jpeg.getvalue() if key != 5 else b"not an image")
            add(tar, f"{key:09d}.txt", f"a {colour} {shape}".encode())
            add(tar, f"{key:09d}.json", json.dumps({"key": f"{key:09d}"}).encode())
            key += 1
print(sorted(p.name for p in SHARDS.iterdir()))

# %% [markdown]
# `jaxaigc.data.shards.WebDataset` reads them record by record (a shard's tar headers are indexed
# once; a record reads only its own bytes), on a local disk or any `etils.epath` URL such as
# `gs://bucket/{00000..00099}.tar`:

# %%
from jaxaigc.data.pipeline import CorruptRecord
from jaxaigc.data.shards import WebDataset

source = WebDataset(f"{SHARDS}/{{00000..00001}}.tar")
print(source)
fig, axes = plt.subplots(1, 6, figsize=(12, 2.3))
for ax, index in zip(axes, range(6), strict=True):
    try:
        record = source[index]
    except CorruptRecord:  # the training batches skip it and count it
        ax.set_title("(not an image)", fontsize=8)
    else:
        ax.imshow(record["image"])
        ax.set_title(record["caption"], fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Train the CLIP recipe on them
#
# `config.data.source = "webdataset:PATTERN"` replaces the recipe's embedded mix with the shards
# (`"folder:captions.csv"` reads a folder of images listed in a CSV or JSONL file). The quick
# config is a tiny ResNet CLIP; 120 steps here. `jaxaigc train clip --workdir DIR
# --config.data.source=webdataset:...` does the same from a shell and then evaluates the run on the
# embedded emoji and shapes sets; here the recipe's trainer alone.

# %%
from jaxaigc import run
from jaxaigc.systems import clip as clip_recipe

WORKDIR = RUNS / "own_clip"
config = on_mesh(run.get_config("clip", quick=QUICK))
config.data.source = f"webdataset:{SHARDS}/{{00000..00001}}.tar"
if QUICK:
    config.train.update(dict(batch_size=32, steps=120, log_every=10, checkpoint_every=120))
clip_recipe.train(config, WORKDIR)

# %% [markdown]
# `metrics.jsonl` holds a record per logging step: the loss, the in-batch retrieval accuracies,
# gradient, parameter and update norms, the learning rate, and `data/skipped_records`, the records
# that did not decode so far.

# %%
from jaxaigc.train.metrics import read_metrics

logged = [r for r in read_metrics(WORKDIR) if "train/loss" in r]
steps = [r["step"] for r in logged]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 2.8))
left.plot(steps, [r["train/loss"] for r in logged], marker="o")
left.set(xlabel="step", ylabel="training loss")
right.plot(steps, [r["train/acc_i2t"] for r in logged], marker="o", label="image -> caption")
right.plot(steps, [r["train/acc_t2i"] for r in logged], marker="o", label="caption -> image")
right.set(xlabel="step", ylabel="in-batch accuracy")
right.legend()
plt.tight_layout()
plt.show()
print(
    f"loss {logged[0]['train/loss']:.3f} at step {steps[0]} -> {logged[-1]['train/loss']:.3f}"
    f" at step {steps[-1]}; records skipped: {logged[-1]['data/skipped_records']:.0f}"
)

# %% [markdown]
# The trained run loads like any CLIP (`pipelines.load_clip`; `pipelines.load` also needs the
# `recipe.json` that `run.train_and_evaluate` writes). New drawings, never in the shards, classified
# among the 12 colour-shape labels:

# %%
from jaxaigc import pipelines

clip = pipelines.load_clip(WORKDIR)
labels = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
test_rng = np.random.default_rng(1)
truth = [labels[i] for i in test_rng.integers(len(labels), size=48)]
drawings = np.stack(
    [
        np.asarray(drawing(*label.split(), test_rng).resize((clip.image_size,) * 2, Image.BICUBIC))
        for label in truth
    ]
)
guesses = [labels[i] for i in clip.classify(drawings, labels, templates=["a {}"]).argmax(axis=1)]
accuracy = np.mean([g == t for g, t in zip(guesses, truth, strict=True)])
chance = 1 / len(labels)
print(f"zero-shot accuracy on {len(truth)} new drawings: {accuracy:.0%} (chance {chance:.0%})")

# %% [markdown]
# ## Size the full-size run for a pod
#
# `jaxaigc plan` compiles the training step `jaxaigc train` would run on N devices, emulated on
# this machine's CPU (nothing is allocated), and reports parameters, FLOPs per step, memory per
# device and, for a chip, whether it fits and the step time at 40% MFU. Here ViT-B/32 at the
# paper's batch of 32,768 over 8 devices (fsdp), in a fresh process: this one's JAX already has
# its devices. The `--json` figures, then the fit on each chip the library knows.

# %%
from IPython.display import Markdown

from jaxaigc import plan

command = [sys.executable, "-m", "jaxaigc", "plan", "ViT-B/32", "--devices", "8", "--json"]
figures = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
print(plan.format_plan(figures))

rows = ["| chip | HBM | fits 8 devices | smallest fsdp estimated to fit | step at 40% MFU |"]
rows.append("|---|---|---|---|---|")
for name, chip in plan.CHIPS.items():
    fit = plan.fit(figures, chip)
    rows.append(
        f"| {name} | {chip.hbm_bytes / 2**30:.0f} GiB | {'yes' if fit['fits'] else 'no'} "
        f"| {fit['smallest_fsdp']} | {fit['step_seconds_at_mfu']:.2f} s |"
    )
Markdown("\n".join(rows))

# %% [markdown]
# On a pod the same command line runs on every host, the shards on a bucket every host reads
# (README, "Pods and clusters"): `jaxaigc train clip --workdir /mnt/shared/clip
# --config.data.source=webdataset:gs://your-bucket/{00000..00999}.tar --config.mesh.shape.fsdp=8`,
# after `jaxaigc plan` says the mesh fits.
