"""Benchmark `vlmtax tune` + `vlmtax ensemble`: two generate runs (different training seeds) on the synthetic
catalogue, tuned on the validation split, applied to the held-out test rows.

Stages (each kept when its output exists, so a rerun only redoes what is missing):
synth -> tiny-model -> prepare (val split) -> sft x 2 seeds (recipes/tiny_cpu.yaml) -> predict --probs on
val and test for each run -> tune on val -> ensemble on test -> score every submission on the test labels.

    python bench/ensemble.py [--workdir bench/_work/ensemble] [--rows 3000] [--test-rows 600]
                             [--val-fraction 0.25] [--epochs 12] [--seeds 1,2]

Prints the per-attribute table of the decision (in-sample and cross-validated on val) and the test
scores of each single model, their plain average and the tuned ensemble, plus per-attribute test
macro-F1 of argmax vs the tuned rule where tau > 0 was chosen (docs/ensembling.md quotes this output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def build_runs(work: Path, rows: int, test_rows: int, val_fraction: float, epochs: float,
               seeds: list[int]) -> dict[int, dict[str, Path]]:
    """Catalogue, data, one run per seed, and each run's val/test probabilities."""
    from vlmtax.predict import predict
    from vlmtax.prepare import prepare
    from vlmtax.sft import sft
    from vlmtax.synth import synth
    from vlmtax.tiny_model import build_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    cat, model, data = work / "catalogue", work / "tiny-model", work / "data"
    if not (cat / "train.csv").exists():
        synth(cat, rows=rows, test_rows=test_rows, seed=0, image_size=112)
    if not (model / "vlmtax_tiny.json").exists():
        build_tiny_model(model, seed=0)
    if not (data / "prepare_meta.json").exists():
        prepare(csv=cat / "train.csv", images=cat / "train_images", attributes=cat / "category_attributes.parquet",
                out=data, model=model, max_pixels=12544, remaps=["Sarees:attr_1<->attr_4"], missing="mask",
                val_fraction=val_fraction)
    out: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        run = work / f"run-seed{seed}"
        if not (run / "vlmtax_meta.json").exists():
            sft(RECIPE, [f"model={model}", f"data={data}", f"output_dir={run}", f"train.seed={seed}",
                         f"train.epochs={epochs}", "train.eval=false",
                         f"resume={'true' if run.exists() else 'false'}"])
        files = {}
        for split, csv, images in (("val", data / "val.csv", cat / "train_images"),
                                   ("test", cat / "test.csv", cat / "test_images")):
            probs = work / f"{split}-seed{seed}.probs.jsonl"
            sub = work / f"{split}-seed{seed}.csv"
            if not probs.exists():
                predict(model=run, csv=csv, images=images, out=sub, probs=probs, batch_size=16)
            files[split], files[f"{split}_csv"] = probs, sub
        out[seed] = files
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / "_work" / "ensemble"))
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--test-rows", type=int, default=600)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=float, default=12)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--runs-only", action="store_true", help="stop after the probabilities are written")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = build_runs(work, args.rows, args.test_rows, args.val_fraction, args.epochs, seeds)
    if args.runs_only:
        print(json.dumps({s: {k: str(v) for k, v in f.items()} for s, f in runs.items()}, indent=2))
        return
    sys.exit("tune/ensemble stage not written yet")


if __name__ == "__main__":
    main()
