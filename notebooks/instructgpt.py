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
# # InstructGPT: SFT, a reward model, PPO and PPO-ptx
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/)
#
# On Colab: the badge opens Colab's GitHub tab; enter this repository, open
# `notebooks/instructgpt.ipynb`
# and give the first cell the repository's address. In a checkout: open it in Jupyter on the
# `.venv` kernel (`make install-test` installs ipykernel there). The same cells are in
# `notebooks/instructgpt.py` (jupytext's percent format); `make notebooks` syncs the two.
#
# InstructGPT (Ouyang et al. 2022) on the library's synthetic instruction tasks, whose
# programmatic gold scorer stands in for human labellers: a byte-level GPT pretrained on a text
# corpus, fine-tuned on demonstrations (SFT), a reward model trained on rankings of responses,
# then PPO against that reward model, with (PPO-ptx) and without pretraining gradients mixed in,
# on the preference a small model can learn (Ziegler et al. 2019's stylistic continuation).
# The quick recipe runs every stage for two steps (a few minutes on 2 CPU cores, most of it
# compiling): the answers show the API, not what training reaches. Nothing is downloaded after
# the first cell.

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
# `run.get_config("instructgpt", quick=True)` is the recipe's config, an `ml_collections.
# ConfigDict` whose fields you may change before training (here its mesh; `config.stages` names
# each stage's directory). `run.train_and_evaluate` trains the stages in order, each resuming from
# its checkpoints, evaluates the policies and writes `report.{json,md,html}` beside them.

# %%
from jaxaigc import run
from jaxaigc.evaluate.report import format_figure

config = on_mesh(run.get_config("instructgpt", quick=QUICK))
report = run.train_and_evaluate("instructgpt", config, RUNS / "instructgpt")
print(f"{report['title']} ({report['seconds']:.0f} s)")
for figure in report["figures"][:6]:
    print("   ", format_figure(figure))

# %% [markdown]
# ## The policies side by side
#
# `pipelines.load_policy(run_directory, stage)` reads the policy a stage trained, whose
# `respond(prompts)` answers instructions (greedily by default). Prompts of the held-out template
# (phrasings training never saw) of the preference PPO trains on ("cheer": continue a text on a
# happy note, judged by a sentiment lexicon) and of three hard tasks, each answered by the SFT,
# PPO and PPO-ptx policies, with the gold scorer's score (0-1) of each answer.

# %%
import html

from IPython.display import HTML

from jaxaigc import pipelines
from jaxaigc.data import instructions

prompts = [
    *instructions.make_prompts(3, seed=1, split="held_out", tasks=instructions.STYLE_TASKS),
    *instructions.make_prompts(3, seed=1, split="held_out", tasks=instructions.HARD_TASKS),
]
stages = ("sft", "ppo", "ppo_ptx")
answers = {
    stage: pipelines.load_policy(RUNS / "instructgpt", stage).respond([p.text for p in prompts])
    for stage in stages
}
gold = {
    stage: [instructions.score(p, a) for p, a in zip(prompts, answers[stage], strict=True)]
    for stage in stages
}
print("mean gold score: " + ", ".join(f"{s} {sum(gold[s]) / len(prompts):.3f}" for s in stages))

head = "<th>held-out prompt</th>" + "".join(f"<th>{s}</th><th>gold</th>" for s in stages)
rows = [
    f"<tr><td>{html.escape(p.text)}</td>"
    + "".join(f"<td>{html.escape(answers[s][i])}</td><td>{gold[s][i]:.2f}</td>" for s in stages)
    + "</tr>"
    for i, p in enumerate(prompts)
]
HTML(f"<table><tr>{head}</tr>{''.join(rows)}</table>")

# %% [markdown]
# ## Next
#
# - `jaxaigc respond runs/instructgpt "Reverse the word otter."` from a shell; `jaxaigc demo`
#   trains the full recipe, whose report compares the policies on held-out prompts.
# - `jaxaigc train instructgpt-gpt2` starts from converted GPT-2 weights on your JSONL
#   demonstrations and comparisons (README, "Pods").
