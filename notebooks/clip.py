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
# # CLIP: zero-shot classification, of your own images too
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/)
#
# On Colab: the badge opens Colab's GitHub tab; enter this repository, open
# `notebooks/clip.ipynb`
# and give the first cell the repository's address. In a checkout: open it in Jupyter on the
# `.venv` kernel (`make install-test` installs ipykernel there). The same cells are in
# `notebooks/clip.py` (jupytext's percent format); `make notebooks` syncs the two.
#
# A CLIP classifies an image among labels it is given, by comparing the image's embedding with
# each label's. This notebook takes OpenAI's CLIP when you give it a checkpoint (below), else it
# trains the library's quick CLIP recipe (a tiny ResNet CLIP, 60 steps on the embedded emoji and
# shapes scenes, about a minute on 2 CPU cores), then classifies test scenes and the images of a
# folder you name. Nothing is downloaded after the first cell.

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
# ## A CLIP: OpenAI's or the recipe's
#
# `CHECKPOINT`: the path of an OpenAI CLIP file, e.g. `ViT-B-32.pt` from the `clip` package's
# download links (reading a `.pt` needs PyTorch, which Colab has) or a `.safetensors` of the same
# state dict. `convert("clip", ...)` (the command `jaxaigc convert clip SRC DEST`) turns it into a
# run directory. Left empty, `run.train_and_evaluate` trains the quick CLIP recipe in `RUNS/clip`
# (resuming from the checkpoints there), evaluates it and writes `report.{json,md,html}` beside
# them; its evaluator's grid of held-out emoji (names no training caption had) with CLIP's three
# best guesses among 1,361 names is shown. Either way `pipelines.load_clip` reads the run as a
# `ClipFeatures`.

# %%
from IPython.display import Image, display

from jaxaigc import pipelines, run
from jaxaigc.convert.checkpoints import convert
from jaxaigc.evaluate.report import format_figure

CHECKPOINT = ""  # @param {type:"string"}
if CHECKPOINT:
    clip_run = convert("clip", CHECKPOINT, RUNS / f"converted_{Path(CHECKPOINT).stem}")
    print(f"{CHECKPOINT} converted into {clip_run}")
else:
    clip_run = RUNS / "clip"
    report = run.train_and_evaluate("clip", on_mesh(run.get_config("clip", quick=QUICK)), clip_run)
    print(f"{report['title']} ({report['seconds']:.0f} s)")
    for figure in report["figures"][:4]:
        print("   ", format_figure(figure))
    display(Image(filename=clip_run / "held_out_emoji.png"))
clip = pipelines.load_clip(clip_run)
print(f"{clip_run}: a CLIP of {clip.image_size} px images")

# %% [markdown]
# ## Zero-shot classification of test scenes
#
# `clip.classify(images, labels, templates=...)` embeds each label in each template (their mean
# is the label's embedding) and returns every image's probability per label. Here the one-object
# test scenes of the library's shapes generator (half of the test scenes hold one of the two
# colour-shape pairs training never showed) among all 40 colour-shape labels.

# %%
import matplotlib.pyplot as plt
import numpy as np

from jaxaigc.data import shapes

labels = [f"{colour} {shape}" for colour in shapes.COLOURS for shape in shapes.SHAPES]
images, _, scenes = shapes.generate(200, clip.image_size, seed=0, split="test")
single = [i for i, scene in enumerate(scenes) if len(scene.objects) == 1]
truth = [f"{scenes[i].objects[0].colour} {scenes[i].objects[0].shape}" for i in single]
probs = clip.classify(images[single], labels, templates=["a small {}", "a large {}"])
accuracy = np.mean([labels[p.argmax()] == t for p, t in zip(probs, truth, strict=True)])
print(
    f"zero-shot accuracy on {len(single)} one-object test scenes: {accuracy:.1%}"
    f" (chance {1 / len(labels):.1%})"
)

fig, axes = plt.subplots(1, 8, figsize=(16, 2.4))
for ax, i, p, t in zip(axes, single, probs, truth, strict=False):
    ax.imshow(images[i])
    ax.set_title(f"{labels[p.argmax()]} {p.max():.0%}\n(is {t})", fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Your own images
#
# `IMAGES`: a folder of image files (PNG, JPEG, ...), `LABELS`: the labels to choose among,
# separated by commas. `pipelines.read_images` resizes each image's shorter side to the CLIP's
# resolution and crops the centre, as CLIP's preprocessing does. Left empty, the folder is
# `my_images`, where the cell first draws six one-object scenes of the shapes generator as PNG
# files, and the labels are the 40 colour-shape pairs.

# %%
IMAGES = ""  # @param {type:"string"}
LABELS = ""  # @param {type:"string"}
if IMAGES:
    folder = Path(IMAGES)
else:
    folder = Path("my_images")
    folder.mkdir(exist_ok=True)
    drawn, _, drawn_scenes = shapes.generate(40, 96, seed=1, split="test")
    for i in [i for i, scene in enumerate(drawn_scenes) if len(scene.objects) == 1][:6]:
        plt.imsave(folder / f"drawing_{i:02d}.png", drawn[i])
own_labels = [label.strip() for label in LABELS.split(",") if label.strip()] or labels
paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
own = pipelines.read_images(paths, size=clip.image_size)
own_probs = clip.classify(own, own_labels, templates=["a {}"])

fig, axes = plt.subplots(1, len(paths), figsize=(2.2 * len(paths), 2.8), squeeze=False)
for ax, path, image, p in zip(axes[0], paths, own, own_probs, strict=True):
    top3 = np.argsort(p)[::-1][:3]
    guesses = ", ".join(f"{own_labels[k]} {p[k]:.0%}" for k in top3)
    print(f"{path.name}: {guesses}")
    ax.imshow(image)
    ax.set_title("\n".join(f"{own_labels[k]} {p[k]:.0%}" for k in top3), fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Next
#
# - `dalle.ipynb` and `unclip.ipynb` train text-to-image models that this CLIP ranks and guides;
#   `your_own_data.ipynb` trains the CLIP recipe on your own image-caption shards.
# - From a shell: `jaxaigc zero-shot RUN_OR_CONVERTED_DIR image.png --labels "a cat,a dog"`;
#   `jaxaigc train clip --workdir runs/clip` trains the full recipe.
