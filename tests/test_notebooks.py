"""The Colab notebooks: committed without outputs, one install cell shared by all (Colab only,
the Makefile's Debian packages), and each run top to bottom in a fresh kernel of this
interpreter, in a temporary directory, showing what its text promises."""

import base64
import io
import json
import os
import re

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from PIL import Image

from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _read(path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _execute(name: str, cwd) -> nbformat.NotebookNode:
    """The notebook ``name`` executed in ``cwd``; a cell that raises fails the test."""
    notebook = _read(ROOT / "notebooks" / name)
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
             "http_proxy": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
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


def test_notebooks_are_committed_without_outputs_and_share_one_install_cell():
    # Every notebook is one the slow tests below execute.
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_your_own_data.ipynb"]
    install_cells = set()
    for path in NOTEBOOKS:
        notebook = _read(path)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        first_code = next(c for c in notebook.cells if c.cell_type == "code")
        install_cells.add(first_code.source)
        assert "colab-badge.svg" in notebook.cells[0].source
        assert f"notebooks/{path.name}" in notebook.cells[0].source
    (install,) = install_cells
    assert 'if "google.colab" in sys.modules:' in install
    # The Debian packages the Makefile installs (`make data-packages`), one per line in the cell.
    makefile = re.search(r"^DEBIAN_DATA := (.*?)\n\n", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert (
        re.findall(r'^    "([\w.-]+)",$', install, re.M)
        == makefile.group(1).replace("\\", "").split()
    )


@pytest.mark.slow
def test_quickstart_trains_loads_and_shows_the_runs(tmp_path):
    notebook = _execute("01_quickstart.ipynb", tmp_path)
    runs = tmp_path / "runs" / "quickstart"
    for recipe in ("clip", "dvae", "dalle"):
        report = json.loads((runs / recipe / "report.json").read_text())
        assert report["title"] in _text(_cell(notebook, "run.train_and_evaluate"))
    assert _png(_cell(notebook, "read_metrics")).size[0] > 0
    assert _png(_cell(notebook, "clip.classify")).size[0] > 0
    emoji = _png(_cell(notebook, "held_out_emoji.png"))
    assert emoji.size == Image.open(runs / "clip" / "held_out_emoji.png").size
    generate = _cell(notebook, "dalle(captions")
    assert "(2, 8, 32, 32, 3)" in _text(generate)
    shown = np.asarray(_png(generate).convert("RGB"))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(runs / "generated.png")))


@pytest.mark.slow
def test_your_own_data_trains_on_shards_and_plans_a_pod(tmp_path):
    notebook = _execute("02_your_own_data.ipynb", tmp_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]
    metrics = [json.loads(line) for line in (tmp_path / "runs/own_clip/metrics.jsonl").open()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert metrics[-1]["step"] == 120 and losses[-1] < 0.7 * losses[0]
    assert metrics[-1]["data/skipped_records"] >= 1  # the one record that is not an image
    assert f"-> {losses[-1]:.3f}" in _text(_cell(notebook, "read_metrics"))
    accuracy = re.search(r"zero-shot accuracy on 48 new drawings: (\d+)% \(chance 8%\)",
                         _text(_cell(notebook, "clip.classify")))  # fmt: skip
    assert accuracy and int(accuracy.group(1)) > 25
    plan = _cell(notebook, '"plan", "ViT-B/32"')
    shown = _text(plan) + "".join(o.get("data", {}).get("text/markdown", "") for o in plan.outputs)
    assert "ViT-B/32: the clip train step on 8 devices (data 1 x fsdp 8 x tensor 1)" in shown
    assert "parameters          151.3M" in shown
    assert re.search(r"\| h100 \| 80 GiB \| (yes|no) \|", shown)
