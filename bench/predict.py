"""Benchmark: constrained decoding vs free decoding vs plain `model.generate`, same model, rows, batches.

    python bench/predict.py                      # tiny random Qwen2-VL + synthetic test rows, built in a temp dir
    python bench/predict.py --model RUN_OR_MERGED_DIR --csv test.csv --images test_images/

Prints rows/s and model forward calls per row and per batch for each mode, then the ratios. Targets:
constrained >= 2x the rows/s of plain generate, and forward calls per batch <= the most attributes of a
category in the batch + 2. Exits 1 if a target is missed. Each mode decodes the same batches once after
one warm-up batch; forward calls are counted on the language model, so `generate` and constrained
decoding are counted alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlmtax.decoding import AnswerPlans, ConstrainedDecoder, free_decode, generate_answers  # noqa: E402
from vlmtax.fileio import read_csv  # noqa: E402
from vlmtax.loading import load_for_inference, load_taxonomy  # noqa: E402
from vlmtax.predict import make_batches, plan_rows  # noqa: E402


def _setup(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, Path | None]:
    if args.model and args.csv:
        return Path(args.model), Path(args.csv), Path(args.images), args.taxonomy
    from vlmtax.prepare import prepare
    from vlmtax.synth import synth
    from vlmtax.tiny_model import build_tiny_model

    data = synth(work / "syn", rows=60, test_rows=args.rows, seed=0)
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny", seed=0)
    taxonomy = args.taxonomy
    if taxonomy is None and not (model / "taxonomy.json").is_file():
        prep = work / "prep"
        prepare(csv=data / "train.csv", images=data / "train_images", attributes=data / "category_attributes.parquet",
                out=prep, val_fraction=0.0)
        taxonomy = prep / "taxonomy.json"
    return model, data / "test.csv", data / "test_images", taxonomy


def _run(fn, batches, calls: list[int]) -> tuple[float, list[int]]:
    per_batch = []
    start = time.perf_counter()
    for images, cats in batches:
        before = calls[0]
        fn(images, cats)
        per_batch.append(calls[0] - before)
    return time.perf_counter() - start, per_batch


def measure(modes: dict, batches: list, model, rounds: int) -> list[dict]:
    """Best of `rounds` for each mode, the modes interleaved so that a burst of load on a shared CPU
    does not land on one mode only. One warm-up batch per mode first."""
    calls = [0]
    hook = model.model.language_model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    best: dict[str, tuple[float, list[int]]] = {}
    try:
        for fn in modes.values():
            fn(*batches[0])
        for _ in range(rounds):
            for name, fn in modes.items():
                seconds, per_batch = _run(fn, batches, calls)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, per_batch)
    finally:
        hook.remove()
    rows = sum(len(images) for images, _ in batches)
    return [{"mode": name, "rows_per_s": rows / sec, "forwards_per_row": sum(pb) / rows, "forwards_per_batch": pb,
             "seconds": sec} for name, (sec, pb) in best.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run dir, merged dir or model folder (default: a fresh tiny model)")
    ap.add_argument("--csv", help="test CSV (default: synthetic)")
    ap.add_argument("--images", help="test images folder")
    ap.add_argument("--taxonomy", type=Path, help="taxonomy.json (default: the model dir's)")
    ap.add_argument("--rows", type=int, default=64, help="synthetic test rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per mode; the best one counts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: a shared CPU makes multi-threaded timings of tiny ops erratic)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, csv, images, taxonomy_path = _setup(args, Path(tmp))
        taxonomy = load_taxonomy(model_path, taxonomy_path)
        model, processor, _ = load_for_inference(model_path)
        rows = plan_rows(read_csv(csv, "test CSV", ["id", "Category"]), taxonomy, Path(images), "{id:06d}.jpg")
        batches = []
        for batch in make_batches(rows, args.batch_size):
            batches.append(([Image.open(r.image).convert("RGB") for r in batch], [r.category for r in batch]))
    bound = [max(len(c.attributes) for c in cats) + 2 for _, cats in batches]
    plans = AnswerPlans(processor.tokenizer)
    decoder = ConstrainedDecoder(model, processor)
    modes = {"constrained": decoder.decode,
             "free": lambda i, c: free_decode(model, processor, i, c, plans),
             "generate": lambda i, c: generate_answers(model, processor, i, c, plans)}
    results = measure(modes, batches, model, args.rounds)
    n_rows = sum(len(i) for i, _ in batches)
    print(f"{n_rows} rows, batch size {args.batch_size}, {len(batches)} batches, best of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}, model {model_path}")
    print(f"{'mode':<12} {'rows/s':>9} {'forwards/row':>13} {'max forwards/batch':>19}")
    for r in results:
        print(f"{r['mode']:<12} {r['rows_per_s']:>9.1f} {r['forwards_per_row']:>13.2f} "
              f"{max(r['forwards_per_batch']):>19d}")
    con, free, gen = results
    speedup = con["rows_per_s"] / gen["rows_per_s"]
    within = all(n <= b for n, b in zip(con["forwards_per_batch"], bound))
    print(f"constrained / generate rows/s: {speedup:.2f}x (target >= 2x)")
    print(f"free / generate rows/s: {free['rows_per_s'] / gen['rows_per_s']:.2f}x")
    print(f"generate / constrained forwards per row: {gen['forwards_per_row'] / con['forwards_per_row']:.2f}x")
    extra = max(n - (b - 2) for n, b in zip(con["forwards_per_batch"], bound))
    print(f"constrained forwards per batch <= max attributes + 2 in every batch: {within} "
          f"(at most max attributes + {extra})")
    return 0 if speedup >= 2 and within else 1


if __name__ == "__main__":
    sys.exit(main())
