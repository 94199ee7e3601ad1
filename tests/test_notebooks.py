"""The Colab notebooks, one per system: each a jupytext percent-format ``.py`` holding the same
cells as its ``.ipynb``, committed without outputs, with one install cell and one device cell
shared by all (the install cell: Colab only, the Makefile's Debian packages), and all run top to
bottom in fresh kernels of this interpreter on one runs folder, showing what their text
promises."""

import base64
import html
import io
import json
import os
import re

import flax.linen as nn
import jax
import jupytext
import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from PIL import Image
from safetensors.numpy import save_file

from jaxaigc import pipelines
from jaxaigc.configs.saved import load_run
from jaxaigc.convert import clip_to_torch
from jaxaigc.data import instructions, shapes
from jaxaigc.models.clip import CLIP, CLIPConfig
from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["clip", "dalle", "instructgpt", "unclip", "your_own_data"]
LABELS = [f"{colour} {shape}" for colour in shapes.COLOURS for shape in shapes.SHAPES]


def _read(path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _execute(name: str, cwd, runs, **parameters) -> nbformat.NotebookNode:
    """The notebook ``name`` executed in ``cwd`` with its runs in ``runs`` and its form fields
    ``parameters`` set (``CHECKPOINT="..."``); a cell that raises fails the test."""
    notebook = _read(ROOT / "notebooks" / f"{name}.ipynb")
    for field, value in parameters.items():
        line = re.compile(rf"^{field} = .*?(  # @param)", re.M)
        (cell,) = [c for c in notebook.cells if line.search(c.source)]
        cell.source = line.sub(rf"{field} = {value!r}\1", cell.source)
    cwd.mkdir(exist_ok=True)
    # kernel_dirs=[]: only the native kernel, this interpreter, whatever kernelspecs are installed.
    kernel = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    client = NotebookClient(notebook, km=kernel, timeout=900, resources={"metadata": {"path": cwd}})
    # One CPU device as on Colab (the suite's XLA_FLAGS emulates 8), and an unreachable proxy, so
    # a download fails rather than passing unnoticed.
    proxy = "http://127.0.0.1:9"
    client.execute(
        env={**os.environ, "XLA_FLAGS": "", "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
             "http_proxy": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": "",
             "JAXAIGC_NOTEBOOK_RUNS": str(runs)}
    )  # fmt: skip
    return notebook


def _cell(notebook, text: str):
    """The one code cell whose source contains ``text``."""
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and text in c.source]
    return cell


def _text(cell) -> str:
    return "".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs
    )


def _png(cell) -> Image.Image:
    """The (last) PNG a cell displayed."""
    pngs = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    assert pngs, f"no image shown by the cell starting {cell.source[:60]!r}"
    return Image.open(io.BytesIO(base64.b64decode(pngs[-1])))


def _shows_file(cell, path) -> None:
    """The cell's (last) picture is the PNG file ``path``, pixel for pixel."""
    shown = np.asarray(_png(cell).convert("RGB"))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(path).convert("RGB")))


def _reports_shown(notebook, runs, recipes) -> None:
    shown = _text(_cell(notebook, "run.train_and_evaluate"))
    for recipe in recipes:
        report = json.loads((runs / recipe / "report.json").read_text())
        assert report["title"] in shown


def _on_one_cpu(notebook, runs, recipe) -> None:
    """The device cell chose the one CPU device's mesh and the recipe trained on it."""
    assert "cpu: 1 x cpu -> mesh data 1 x fsdp 1 x tensor 1" in _text(_cell(notebook, "MESH ="))
    _, config = load_run(runs / recipe)
    meshes = [config.mesh] if "mesh" in config else [config.prior.mesh, config.decoder.mesh]
    assert all(m.shape.to_dict() == {"data": 1, "fsdp": 1, "tensor": 1} for m in meshes)


def _own_images(notebook, folder) -> list[str]:
    """The top-3 lines printed for the images of ``folder``, checked: one per file, three of the
    40 labels each, most probable first; and the images shown."""
    cell = _cell(notebook, "IMAGES = ")
    lines = [line for line in _text(cell).splitlines() if line.startswith("drawing_")]
    assert [line.split(":")[0] for line in lines] == sorted(p.name for p in folder.iterdir())
    for line in lines:
        guesses = re.findall(r"([a-z]+ [a-z]+) (\d+)%", line.split(": ", 1)[1])
        assert len(guesses) == 3 and all(label in LABELS for label, _ in guesses)
        percents = [int(p) for _, p in guesses]
        assert percents == sorted(percents, reverse=True)
    assert _png(cell).size[0] > 0
    return lines


def _scene_accuracy(notebook) -> float:
    found = re.search(
        r"zero-shot accuracy on (\d+) one-object test scenes: ([\d.]+)% \(chance 2\.5%\)",
        _text(_cell(notebook, "clip.classify(images[single]")),
    )
    assert found and int(found.group(1)) > 80
    return float(found.group(2)) / 100


def _openai_format_clip(path) -> CLIPConfig:
    """A random tiny CLIP saved as OpenAI's state dict (``.safetensors``) at ``path``."""
    config = CLIPConfig.from_name("tiny-vit", context_length=16)
    r = config.image_resolution
    example = (np.zeros((1, r, r, 3), np.float32), np.zeros((1, 16), np.int32))
    abstract = nn.meta.unbox(jax.eval_shape(CLIP(config).init, jax.random.key(0), *example))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: (0.05 * rng.normal(size=x.shape)).astype(x.dtype), abstract)
    save_file(clip_to_torch(config, variables), path)
    return config


def test_notebooks_pair_py_and_ipynb_without_outputs_and_share_their_first_cells():
    # Every notebook is one the slow test below executes.
    assert [p.stem for p in NOTEBOOKS] == NAMES
    install_cells, device_cells = set(), set()
    for path in NOTEBOOKS:
        notebook = _read(path)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        paired = jupytext.read(path.with_suffix(".py"))
        assert [(c.cell_type, c.source) for c in paired.cells] == [
            (c.cell_type, c.source) for c in jupytext.read(path).cells
        ], f"{path.name} and {path.stem}.py differ: run `make notebooks`"
        install, device = [c.source for c in notebook.cells if c.cell_type == "code"][:2]
        install_cells.add(install)
        device_cells.add(device)
        assert "colab-badge.svg" in notebook.cells[0].source
        assert f"notebooks/{path.name}" in notebook.cells[0].source
    (install,) = install_cells
    (device,) = device_cells
    assert 'if "google.colab" in sys.modules:' in install
    assert "jax.devices()" in device and "JAXAIGC_NOTEBOOK_RUNS" in device
    # The Debian packages the Makefile installs (`make data-packages`), one per line in the cell.
    makefile = re.search(r"^DEBIAN_DATA := (.*?)\n\n", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert (
        re.findall(r'^    "([\w.-]+)",$', install, re.M)
        == makefile.group(1).replace("\\", "").split()
    )


@pytest.mark.slow
def test_notebooks_run_top_to_bottom_on_one_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    quick = runs / "quick"

    # CLIP, trained by its recipe.
    clip = _execute("clip", tmp_path / "clip", runs)
    _on_one_cpu(clip, quick, "clip")
    _reports_shown(clip, quick, ["clip"])
    _shows_file(_cell(clip, "CHECKPOINT = "), quick / "clip" / "held_out_emoji.png")
    assert _scene_accuracy(clip) > 2 / len(LABELS)  # twice chance
    assert _png(_cell(clip, "clip.classify(images[single]")).size[0] > 0
    _own_images(clip, tmp_path / "clip" / "my_images")
    clip_metrics = (quick / "clip" / "metrics.jsonl").read_text()

    # unCLIP (before DALL-E, whose run its evaluator would judge too), on the CLIP run above.
    unclip = _execute("unclip", tmp_path / "unclip", runs)
    _on_one_cpu(unclip, quick, "unclip")
    _reports_shown(unclip, quick, ["clip", "unclip"])
    _shows_file(_cell(unclip, "samples.png"), quick / "unclip" / "samples.png")
    generate = _cell(unclip, "unclip(captions")
    assert "(2, 4, 32, 32, 3)" in _text(generate)
    _shows_file(generate, quick / "unclip_generated.png")

    # DALL-E, with its dVAE, on the same CLIP run.
    dalle = _execute("dalle", tmp_path / "dalle", runs)
    _on_one_cpu(dalle, quick, "dalle")
    _reports_shown(dalle, quick, ["clip", "dvae", "dalle"])
    assert _png(_cell(dalle, "read_metrics")).size[0] > 0
    generate = _cell(dalle, "dalle(captions")
    assert "(2, 8, 32, 32, 3)" in _text(generate)
    _shows_file(generate, quick / "dalle_generated.png")
    # Both resumed the finished CLIP run: evaluated again, not trained again.
    assert (quick / "clip" / "metrics.jsonl").read_text() == clip_metrics

    # CLIP from an OpenAI checkpoint file, converted by the notebook.
    config = _openai_format_clip(tmp_path / "openai.safetensors")
    converted = _execute("clip", tmp_path / "converted", runs, CHECKPOINT="../openai.safetensors")
    assert "converted into" in _text(_cell(converted, "CHECKPOINT = "))
    run_dir = quick / "converted_openai"
    assert load_run(run_dir)[0] == "clip"
    assert pipelines.load_clip(run_dir).config == config
    _scene_accuracy(converted)
    _own_images(converted, tmp_path / "converted" / "my_images")

    # InstructGPT: SFT, PPO and PPO-ptx side by side, each answer with its gold score.
    instructgpt = _execute("instructgpt", tmp_path / "instructgpt", runs)
    _on_one_cpu(instructgpt, quick, "instructgpt")
    _reports_shown(instructgpt, quick, ["instructgpt"])
    table = _cell(instructgpt, "<table>").outputs[-1].data["text/html"]
    rows = [re.findall(r"<td>(.*?)</td>", r, re.S) for r in re.findall(r"<tr><td>.*?</tr>", table)]
    prompts = [
        *instructions.make_prompts(3, seed=1, split="held_out", tasks=instructions.STYLE_TASKS),
        *instructions.make_prompts(3, seed=1, split="held_out", tasks=instructions.HARD_TASKS),
    ]
    assert [html.unescape(row[0]) for row in rows] == [p.text for p in prompts]
    for prompt, row in zip(prompts, rows, strict=True):
        assert len(row) == 7  # the prompt, then three answers each with its gold score
        for answer, gold in zip(row[1::2], row[2::2], strict=True):
            assert gold == f"{instructions.score(prompt, html.unescape(answer)):.2f}"

    # Your own data: shards written, the CLIP recipe trained on them, a pod planned.
    own = _execute("your_own_data", tmp_path / "own", runs)
    assert "cpu: 1 x cpu -> mesh data 1 x fsdp 1 x tensor 1" in _text(_cell(own, "MESH ="))
    assert sorted(p.name for p in (tmp_path / "own/shards").iterdir()) == ["00000.tar", "00001.tar"]
    metrics = [json.loads(line) for line in (quick / "own_clip/metrics.jsonl").open()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert metrics[-1]["step"] == 120 and losses[-1] < 0.7 * losses[0]
    assert metrics[-1]["data/skipped_records"] >= 1  # the one record that is not an image
    assert f"-> {losses[-1]:.3f}" in _text(_cell(own, "read_metrics"))
    accuracy = re.search(r"zero-shot accuracy on 48 new drawings: (\d+)% \(chance 8%\)",
                         _text(_cell(own, "clip.classify")))  # fmt: skip
    assert accuracy and int(accuracy.group(1)) > 25
    plan = _cell(own, '"plan", "ViT-B/32"')
    shown = _text(plan) + "".join(o.get("data", {}).get("text/markdown", "") for o in plan.outputs)
    assert "ViT-B/32: the clip train step on 8 devices (data 1 x fsdp 8 x tensor 1)" in shown
    assert "parameters          151.3M" in shown
    assert re.search(r"\| h100 \| 80 GiB \| (yes|no) \|", shown)
