"""How well the classify route reads the attributes the synthetic images draw, against issue 12's bar.

Issue 12 asks the classify route, on the demo catalogue with a tiny backbone, for every visible
attribute (colour, garment length, pattern, sleeve length) at least 0.3 metric points over the
constant baseline. tests/test_end_to_end.py checks it on the demo itself (a strict xfail: the demo's
budget does not reach it). This benchmark measures what it takes: in one run it trains
recipes/tiny_heads_cpu.yaml on the demo's catalogue and prepared data with the demo's tiny CLIP (the
baseline) and with a bigger random CLIP (`--layers`, `--hidden`; `--epochs`, `--backbone-lr`), and
scores both on the demo's 500 test rows and on a held-out synthetic catalogue of `--heldout-rows` rows
(another seed: on 500 rows some (category, value) pairs hardly occur, e.g. no Men Tshirts test row
has long sleeves, so the demo's figure is noisy and capped). Printed per visible attribute: the mean
gain over the baseline across the categories that have it, the per-category sleeve-length gains,
the final score, and the training time of each.

    python bench/visible.py [--layers 4] [--hidden 128] [--epochs 24] [--backbone-lr 1e-3]
                            [--heldout-rows 3000] [--threads 1]

One thread by default, as the recipe sets (two threads on this 2-core machine are slower for the tiny
backbone). The bigger variant at the defaults trains about 7x longer than the demo's recipe.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")

WORK = Path(__file__).resolve().parent / "_work" / "visible"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_heads_cpu.yaml"
VISIBLE = ("color", "length", "pattern", "sleeve_length")
BAR = 0.3


def setup(heldout_rows: int) -> dict[str, Path]:
    """The demo's catalogue and prepared data, a held-out catalogue (seed 7), the demo's tiny CLIP."""
    from vlmtax.data.synth import synth
    from vlmtax.demo import demo_catalogue, demo_prepare
    from vlmtax.models.tiny_model import build_tiny_model
    from vlmtax.models.tiny_vision import build_tiny_vision

    WORK.mkdir(parents=True, exist_ok=True)
    paths = {"cat": WORK / "catalogue", "data": WORK / "data", "heldout": WORK / f"heldout-{heldout_rows}",
             "clip": build_tiny_vision(WORK / "tiny-clip", "clip", seed=0)}
    if not paths["cat"].exists():
        demo_catalogue(paths["cat"])
    if not paths["heldout"].exists():
        synth(paths["heldout"], rows=1, test_rows=heldout_rows, seed=7, image_size=112)
    if not paths["data"].exists():
        demo_prepare(paths["cat"], paths["data"], build_tiny_model(WORK / "tiny-qwen", seed=0))
    return paths


def bigger_clip(layers: int, hidden: int) -> Path:
    """A random CLIP vision encoder like the demo's (64 px, 8 px patches) with `layers` layers of width `hidden`."""
    from vlmtax.models.tiny_vision import build_tiny_vision

    return build_tiny_vision(WORK / f"clip-l{layers}-h{hidden}", "clip", seed=0, num_hidden_layers=layers,
                             hidden_size=hidden, intermediate_size=2 * hidden)


def gains(report: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Mean gain over the baseline per visible attribute (over the categories that have it scored), and
    the per-category sleeve-length gains."""
    per: dict[str, list[float]] = {name: [] for name in VISIBLE}
    sleeve = {}
    for cat, c in report["categories"].items():
        for name, a in c["attributes"].items():
            if name in per and a["score"] is not None:
                per[name].append(a["score"] - a["baseline"])
                if name == "sleeve_length":
                    sleeve[cat] = a["score"] - a["baseline"]
    return {k: sum(v) / len(v) for k, v in per.items() if v}, sleeve


def train_and_score(name: str, backbone: Path, paths: dict[str, Path], overrides: list[str]) -> dict:
    from rich.console import Console

    from vlmtax.evaluate.score import score
    from vlmtax.predict import predict
    from vlmtax.sft import sft

    run = WORK / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    sft(RECIPE, [f"model={backbone}", f"data={paths['data']}", f"output_dir={run}",
                 f"heads.cache_dir={WORK / 'feature-cache'}", *overrides])
    result = {"sft_s": time.perf_counter() - t0}
    for split, cat in (("demo", paths["cat"]), ("heldout", paths["heldout"])):
        out = WORK / f"sub-{name}-{split}.csv"
        out.unlink(missing_ok=True)
        predict(model=run, csv=cat / "test.csv", images=cat / "test_images", out=out, batch_size=64)
        report = score(truth=cat / "test_labels.csv", pred=out, taxonomy=run / "taxonomy.json",
                       console=Console(file=io.StringIO()))  # the tables: only the gains are printed
        result[split] = (report["final"], *gains(report))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--backbone-lr", type=float, default=1e-3)
    parser.add_argument("--heldout-rows", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    paths = setup(args.heldout_rows)
    threads = [f"heads.cpu_threads={args.threads}"] if args.threads else ["heads.cpu_threads=null"]
    variants = {
        "demo recipe (tiny CLIP, 2x64)": (paths["clip"], threads),
        f"CLIP {args.layers}x{args.hidden}, {args.epochs} epochs, backbone lr {args.backbone_lr:g}": (
            bigger_clip(args.layers, args.hidden),
            [*threads, f"train.epochs={args.epochs}", f"heads.backbone_lr={args.backbone_lr}"]),
    }
    results = {name: train_and_score(f"v{i}", backbone, paths, extra)
               for i, (name, (backbone, extra)) in enumerate(variants.items())}
    base_time = next(iter(results.values()))["sft_s"]
    for name, r in results.items():
        print(f"\n{name}: sft {r['sft_s']:.0f} s ({r['sft_s'] / base_time:.1f}x the demo recipe's)")
        for split in ("demo", "heldout"):
            final, per, sleeve = r[split]
            rows = "500 demo test rows" if split == "demo" else f"{args.heldout_rows} held-out rows"
            short = [k for k, v in per.items() if v < BAR]
            print(f"  {rows}: final {final:.3f}; gain " + ", ".join(f"{k} {v:+.3f}" for k, v in per.items())
                  + f"; bar +{BAR} " + ("met" if not short else f"not met ({', '.join(short)})"))
            print("    sleeve length per category: " + ", ".join(f"{k} {v:+.2f}" for k, v in sleeve.items()))


if __name__ == "__main__":
    main()
