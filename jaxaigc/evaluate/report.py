"""Run reports a person reads: ``report.json``, ``report.md`` and ``report.html`` per run
directory, training curves beside every ``metrics.jsonl``, and one page over the demo's stages.

A report is a JSON-able dict::

    {"system": "clip",                     # the recipe's name
     "title": "CLIP on emoji and shapes",  # optional; default: system
     "figures": [{"name": "held-out Noto emoji, top-5 of 1,361 names",
                  "value": 0.109,
                  "unit": "%",             # "%": value * 100 to one decimal; "" (default): 3
                                           # significant digits; else 3 digits and the unit
                  "baseline": 0.0037,      # optional, in the same unit
                  "baseline_name": "chance"}, ...],  # optional
     "images": [{"path": "samples.png",   # relative to the run directory
                 "caption": "best of 16 ...",
                 "key": "text_to_image"}, ...],  # optional; write_report adds the "curves"
     "seconds": 224.0,                     # optional wall time
     ...}                                  # anything else: details, kept in report.json and shown
                                           # folded in the HTML
"""

from __future__ import annotations

import copy
import html
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxaigc.train.metrics import read_metrics

_SHOWN = ("system", "title", "figures", "images", "seconds")  # the rest goes under details
_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{max-width:40em}
img{max-width:100%}img.px{image-rendering:pixelated}.pair{display:flex;gap:1em}.pair figure{flex:1}
pre{background:#f4f4f4;padding:1em;overflow:auto}"""


def format_value(value: float | None, unit: str = "") -> str:
    """``0.109, "%"`` -> ``"10.9%"``; ``224.0, ""`` -> ``"224"``; None -> ``"-"``."""
    if value is None:
        return "-"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:.3g}" + (f" {unit}" if unit else "")


def write_curves(run_dir: str | Path) -> list[Path]:
    """A ``curves.png`` beside every ``metrics.jsonl`` under ``run_dir`` with ``train/*`` scalars:
    one panel per metric against ``step``, titled with the (sub-)run's path. Returns the PNGs."""
    run_dir = Path(run_dir)
    written = []
    for path in sorted(run_dir.rglob("metrics.jsonl"), key=lambda p: (len(p.parts), p)):
        records = read_metrics(path.parent)
        names = {k for r in records for k in r if k.startswith("train/")}
        names = sorted(names, key=lambda n: (n != "train/loss", n))  # the loss first
        if not names:
            continue
        columns = min(len(names), 3)
        rows = -(-len(names) // columns)
        fig = Figure(figsize=(4 * columns, 2.8 * rows), layout="constrained")
        FigureCanvasAgg(fig)  # renders PNG without a display or pyplot's global state
        axes = list(fig.subplots(rows, columns, squeeze=False).flat)
        for ax, name in zip(axes, names, strict=False):
            ax.plot(*zip(*[(r["step"], r[name]) for r in records if name in r], strict=True))
            ax.set(title=name, xlabel="step")
            ax.grid(alpha=0.3)
        for ax in axes[len(names) :]:  # the panels left over in the last row
            ax.set_axis_off()
        fig.suptitle((Path(run_dir.name) / path.parent.relative_to(run_dir)).as_posix())
        fig.savefig(path.parent / "curves.png", dpi=80)
        written.append(path.parent / "curves.png")
    return written


def write_report(run_dir: str | Path, report: dict) -> dict[str, Path]:
    """Checks ``report`` (schema in the module docstring), draws the curves and writes
    ``report.json`` (with the curves added to ``images``), ``report.md`` and ``report.html``.

    Returns:
      The written files under keys ``"json"``, ``"md"`` and ``"html"``.
    """
    run_dir = Path(run_dir)
    report = copy.deepcopy(report)
    # A report read back from report.json already lists curves: redraw them, do not repeat them.
    report["images"] = [i for i in report.get("images", []) if i.get("key") != "curves"]
    _validate(run_dir, report)
    for png in write_curves(run_dir):
        path = png.relative_to(run_dir).as_posix()
        title = (Path(run_dir.name) / png.parent.relative_to(run_dir)).as_posix()
        report["images"].append(
            {"path": path, "caption": f"training curves of {title}", "key": "curves"}
        )
    title = report.get("title") or report["system"]
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text("\n".join([f"# {title}", *_section_md(report, "")]) + "\n")
    body = [f"<h1>{html.escape(title)}</h1>", *_section_html(report, "", 2)]
    paths["html"] = _write_html(run_dir / "report.html", title, body)
    return paths


def write_demo_report(demo_dir: str | Path, stages: Sequence[str]) -> Path:
    """One ``report.html`` and ``report.md`` in ``demo_dir`` over the stages' ``report.json``: a
    summary table, the DALL-E and unCLIP ``text_to_image`` grids side by side when both exist, then
    one section per stage ("not run" where a stage wrote no report). Returns the HTML path."""
    demo_dir = Path(demo_dir)
    reports = {}
    for stage in stages:
        path = demo_dir / stage / "report.json"
        reports[stage] = json.loads(path.read_text()) if path.exists() else None

    md = ["# jaxaigc demo", "", "| stage | figure | value | baseline | seconds |", "|---" * 5 + "|"]
    body = [
        "<h1>jaxaigc demo</h1>",
        "<table><tr><th>stage</th><th>figure</th><th>value</th>"
        "<th>baseline</th><th>seconds</th></tr>",
    ]
    for stage, report in reports.items():
        cells = ["not run", "", "", ""]
        if report is not None:
            figures = report.get("figures") or [{"name": "", "value": None}]
            cells = [*_figure_cells(figures[0]), _seconds(report)]
        md.append("| " + " | ".join(_md_cell(c) for c in [stage, *cells]) + " |")
        body.append(
            f'<tr><td><a href="#{quote(stage)}">{html.escape(stage)}</a></td>'
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    body.append("</table>")

    pair = {s: _image(reports.get(s), "text_to_image") for s in ("dalle", "unclip")}
    if all(pair.values()):
        heading = "DALL-E and unCLIP on the same captions"
        md += ["", f"## {heading}", ""]
        body += [f"<h2>{heading}</h2>", '<div class="pair">']
        for stage, image in pair.items():
            md += _images_md([image], f"{stage}/")
            body += _images_html([image], f"{stage}/")
        body.append("</div>")

    for stage, report in reports.items():
        if report is None:
            md += ["", f"## {stage}", "", "not run"]
            body.append(f'<h2 id="{html.escape(stage)}">{html.escape(stage)}</h2><p>not run</p>')
        else:
            title = f"{stage}: {report['title']}" if report.get("title") else stage
            md += ["", f"## {title}", *_section_md(report, f"{stage}/")]
            body.append(f'<section id="{html.escape(stage)}"><h2>{html.escape(title)}</h2>')
            body += [*_section_html(report, f"{stage}/", 3), "</section>"]
    (demo_dir / "report.md").write_text("\n".join(md) + "\n")
    return _write_html(demo_dir / "report.html", "jaxaigc demo", body)


def _validate(run_dir: Path, report: dict) -> None:
    if not isinstance(report.get("system"), str):
        raise ValueError(
            f"a report needs its recipe's name under 'system', got keys {list(report)}"
        )
    for i, figure in enumerate(report.get("figures", [])):
        if not figure.get("name") or not isinstance(figure.get("value"), numbers.Real):
            raise ValueError(f"figure {i} needs a 'name' and a numeric 'value', got {figure}")
    for image in report.get("images", []):
        path = run_dir / image.get("path", "")
        if not path.is_file() or not path.resolve().is_relative_to(run_dir.resolve()):
            raise ValueError(f"image {image.get('path')!r} is not a file under {run_dir}")


def _image(report: dict | None, key: str) -> dict | None:
    """The first image of ``report`` under ``key``."""
    images = report.get("images", []) if report else []
    return next((i for i in images if i.get("key") == key), None)


def format_figure(figure: dict) -> str:
    """One line for a terminal: ``name: value (baseline: chance 0.4%)``."""
    name, value, baseline = _figure_cells(figure)
    return f"{name}: {value}" + (f" (baseline: {baseline})" if baseline != "-" else "")


def _figure_cells(figure: dict) -> list[str]:
    """[name, value, baseline] as shown."""
    unit = figure.get("unit", "")
    baseline = figure.get("baseline")
    shown = format_value(baseline, unit)
    if baseline is not None and figure.get("baseline_name"):
        shown += f" ({figure['baseline_name']})"
    return [figure["name"], format_value(figure["value"], unit), shown]


def _seconds(report: dict) -> str:
    return f"{report['seconds']:,.0f}" if report.get("seconds") is not None else "-"


def _md_cell(text: str) -> str:
    """Text for a markdown table cell: HTML-escaped, as markdown passes HTML through."""
    return html.escape(text, quote=False).replace("|", r"\|")


def _images_md(images: list[dict], prefix: str) -> list[str]:
    out = []
    for image in images:
        caption = html.escape(image.get("caption", ""), quote=False)
        alt = caption.replace("[", r"\[").replace("]", r"\]")
        out += ["", f"![{alt}]({quote(prefix + image['path'])})", "", f"*{caption}*"]
    return out


def _images_html(images: list[dict], prefix: str) -> list[str]:
    out = []
    for image in images:
        src = html.escape(quote(prefix + image["path"]))
        caption = html.escape(image.get("caption", ""))
        cls = "" if image.get("key") == "curves" else ' class="px"'  # grids keep square pixels
        out.append(
            f'<figure><img src="{src}"{cls} alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return out


def _section_md(report: dict, prefix: str) -> list[str]:
    """A report's body as markdown lines; image paths prefixed with ``prefix``."""
    md = [""]
    if report.get("figures"):
        md += ["| figure | value | baseline |", "|---|---|---|"]
        md += ["| " + " | ".join(map(_md_cell, _figure_cells(f))) + " |" for f in report["figures"]]
    if "seconds" in report:
        md += ["", f"Wall time: {_seconds(report)} s"]
    images = report.get("images", [])
    md += _images_md([i for i in images if i.get("key") != "curves"], prefix)
    if curves := [i for i in images if i.get("key") == "curves"]:
        md += ["", "Training curves:", *_images_md(curves, prefix)]
    return md


def _section_html(report: dict, prefix: str, level: int) -> list[str]:
    """A report's body as HTML lines, subheadings at ``<h{level}>``; image paths prefixed with
    ``prefix``."""
    body = []
    if report.get("figures"):
        body.append("<table><tr><th>figure</th><th>value</th><th>baseline</th></tr>")
        for figure in report["figures"]:
            cells = "".join(f"<td>{html.escape(c)}</td>" for c in _figure_cells(figure))
            body.append(f"<tr>{cells}</tr>")
        body.append("</table>")
    if "seconds" in report:
        body.append(f"<p>Wall time: {_seconds(report)} s</p>")
    images = report.get("images", [])
    body += _images_html([i for i in images if i.get("key") != "curves"], prefix)
    if curves := [i for i in images if i.get("key") == "curves"]:
        body += [f"<h{level}>Training curves</h{level}>", *_images_html(curves, prefix)]
    if details := {k: v for k, v in report.items() if k not in _SHOWN}:
        text = html.escape(json.dumps(details, indent=2))
        body.append(f"<details><summary>details</summary><pre>{text}</pre></details>")
    return body


def _write_html(path: Path, title: str, body: list[str]) -> Path:
    page = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        *body,
        "</body></html>",
    ]
    path.write_text("\n".join(page) + "\n")
    return path
