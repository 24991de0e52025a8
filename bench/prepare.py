"""Benchmark `vlmtax prepare` on a Meesho-sized catalogue (70,000 rows, images present).

Target: under 20 s on a 2-core machine. Baseline measured in the same run: the same prepare with the
image checks in one process (workers=1), so the ratio shows what the parallel checks buy.

    python bench/prepare.py [--rows 70000] [--image-size 64] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("VLMTAX_PROGRESS", "1")

WORK = Path(__file__).resolve().parent / "_work" / "prepare"


def main() -> None:
    from vlmtax.prepare import prepare
    from vlmtax.synth import synth

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=70_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    cat = WORK / f"synth-{args.rows}-{args.image_size}"
    if not cat.exists():
        t0 = time.perf_counter()
        synth(cat, rows=args.rows, test_rows=1, image_size=args.image_size)
        print(f"synthetic catalogue: {args.rows} rows in {time.perf_counter() - t0:.1f} s (setup, not timed)")

    def run(workers: int | None) -> float:
        out = WORK / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = prepare(csv=cat / "train.csv", images=cat / "train_images",
                         attributes=cat / "category_attributes.parquet", out=out, workers=workers,
                         remaps=["Sarees:attr_1<->attr_4"])
        elapsed = time.perf_counter() - t0
        assert report["train_records"] + report["val_records"] + report["rejected"] == args.rows
        return elapsed

    parallel = run(None)
    print(f"\nprepare: {args.rows} rows, {args.image_size} px images, {os.cpu_count()} cores")
    print(f"  parallel image checks: {parallel:6.1f} s  {args.rows / parallel:8.0f} rows/s  (target < 20 s)")
    if not args.skip_baseline:
        single = run(1)
        print(f"  one process (baseline): {single:5.1f} s  {args.rows / single:8.0f} rows/s")
        print(f"  ratio parallel / one process: {single / parallel:.2f}x faster")


if __name__ == "__main__":
    main()
