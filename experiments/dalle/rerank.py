"""Judges a trained DALL-E run again with another CLIP as its reranker.

    python experiments/dalle/rerank.py --workdir runs/dalle --clip_workdir runs/clip_shapes \
        [--candidates 16] [--out runs/dalle/rerank.json]

The candidates are the ones the run's evaluation draws (same run config, seed and caption
batches), so single-sample and any-of-N figures repeat the run's, and only the CLIP's choice can
change: the reranker's share of best-of-N accuracy, measured apart from the generator. Writes the
report (the run report's judged keys plus the reranker's workdir) and ``rerank_samples.png``
beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxaigc.evaluate import dalle as dalle_eval
from jaxaigc.evaluate.grids import write_grid
from jaxaigc.pipelines import dalle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a DALL-E run (jaxaigc train dalle)")
    parser.add_argument("--clip_workdir", required=True, help="the CLIP run that reranks")
    parser.add_argument("--candidates", type=int, default=None, help="default: the run's")
    parser.add_argument("--out", default=None, help="default: WORKDIR/rerank.json")
    args = parser.parse_args()
    model, params, pairs, dvae, config = dalle.load_trained(args.workdir)
    if args.candidates is not None:
        config.sample.candidates = args.candidates
    reranker = dalle.load_reranker(args.clip_workdir)
    report, images, captions = dalle_eval.judge_samples(
        model.config, params, pairs, dvae, reranker, config
    )
    report["clip_workdir"] = str(Path(args.clip_workdir).absolute())
    out = Path(args.out or Path(args.workdir) / "rerank.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_grid(out.with_name("rerank_samples.png"), images, captions=captions, scale=3)
    for name in ("all", "seen", "held_out"):
        r = report[name]
        print(
            f"{name} ({r['captions']} captions): single sample {r['single_sample_accuracy']:.1%}, "
            f"CLIP best of {report['candidates']} {r['best_of_n_accuracy']:.1%}, any "
            f"{r['any_of_n_accuracy']:.1%}"
        )
    print(f"report: {out}")


if __name__ == "__main__":
    main()
