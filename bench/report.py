"""Benchmark `vlmtax report` at scale: a 30,000-row test set of the synthetic catalogue's 5 categories.

Synthesising 30,000 images takes minutes, so the bench synthesises `--unique` rows (`vlmtax synth`
images, 112 px) and tiles them to `--rows` with new ids, hard-linking each image (the report still
decodes and thumbnails every mistaken row's file). The submission and its probabilities are the truth
with `--error` of the cells replaced by a random allowed value, the predicted value given a random
probability; a second such submission goes in with --compare.

    OMP_NUM_THREADS=1 python bench/report.py [--workdir bench/_work/report] [--rows 30000] [--unique 2000]

Prints the report's wall time, the folder's size in MB and its file count (the bar: under 30 s and under
200 MB for 30k rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("VLMTAX_PROGRESS", "0")


def tile(cat: Path, work: Path, rows: int) -> tuple[Path, Path]:
    """The synthetic test rows repeated to `rows` rows with fresh ids, images hard-linked; (truth, images)."""
    import pandas as pd

    truth, images = work / f"truth-{rows}.csv", work / f"images-{rows}"
    if truth.exists():
        return truth, images
    base = pd.read_csv(cat / "test_labels.csv", dtype=str, keep_default_na=False)
    frame = pd.concat([base] * (rows // len(base) + 1), ignore_index=True).iloc[:rows].copy()
    images.mkdir(parents=True, exist_ok=True)
    for new, old in enumerate(frame["id"], 1):
        dst = images / f"{new:06d}.jpg"
        if not dst.exists():
            os.link(cat / "test_images" / f"{int(old):06d}.jpg", dst)
    frame["id"] = [str(i) for i in range(1, rows + 1)]
    frame.to_csv(truth, index=False)
    return truth, images


def fake_run(truth: Path, out: Path, probs: Path | None, error: float, seed: int) -> None:
    """A submission that is the truth with `error` of the cells wrong (+ its probabilities JSONL)."""
    import numpy as np
    import pandas as pd

    from vlmtax.evaluate.metric import infer_taxonomy

    rng = np.random.default_rng(seed)
    frame = pd.read_csv(truth, dtype=str, keep_default_na=False)
    tax = infer_taxonomy(frame)
    conf = rng.uniform(0.2, 0.99, size=(len(frame), 10))
    lines: list[dict] = [{"id": i, "Category": c, "attributes": {}} for i, c in zip(frame["id"], frame["Category"])]
    for cat in tax.categories.values():
        rows = np.flatnonzero(frame["Category"].to_numpy() == cat.name)
        for k, attr in enumerate(cat.attributes):
            values = np.array(attr.values, dtype=object)
            cells = frame[attr.column].to_numpy(dtype=object)[rows]
            wrong = (rng.random(len(rows)) < error) | (cells == "")
            cells[wrong] = values[rng.integers(0, len(values), wrong.sum())]
            frame.loc[frame.index[rows], attr.column] = cells
            for r, v in zip(rows, cells):
                rest = (1 - conf[r, k]) / max(len(values) - 1, 1)
                lines[r]["attributes"][attr.name] = {
                    "column": attr.column, "value": v,
                    "probs": {u: round(float(conf[r, k]) if u == v else rest, 4) for u in attr.values}}
    frame.to_csv(out, index=False)
    if probs is not None:
        probs.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def folder_size(path: Path) -> tuple[float, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6, len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/_work/report"))
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--unique", type=int, default=2000)
    parser.add_argument("--error", type=float, default=0.3)
    args = parser.parse_args()

    import pandas as pd

    from vlmtax.data.synth import synth
    from vlmtax.evaluate.metric import infer_taxonomy
    from vlmtax.evaluate.report import report

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cat = work / "catalogue"
    if not (cat / "test_labels.csv").exists():
        synth(cat, rows=20, test_rows=args.unique, seed=0, image_size=112)
    truth, images = tile(cat, work, args.rows)
    pred, probs = work / f"pred-{args.rows}.csv", work / f"probs-{args.rows}.jsonl"
    other = work / f"other-{args.rows}.csv"
    taxonomy = work / "taxonomy.json"
    if not probs.exists():
        fake_run(truth, pred, probs, args.error, seed=1)
        fake_run(truth, other, None, args.error * 1.3, seed=2)
    if not taxonomy.exists():  # as a user passes their runs' taxonomy.json (the demo does)
        infer_taxonomy(pd.read_csv(truth, dtype=str, keep_default_na=False)).save(taxonomy)
    out = work / f"report-{args.rows}"
    if out.exists():
        shutil.rmtree(out)  # not part of the measured time: a report replaces an old folder, a bench starts clean
    start, cpu = time.perf_counter(), time.process_time()
    report(truth=truth, pred=pred, out=out, probs=probs, images=images, taxonomy=taxonomy, compare=[other])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    mb, n = folder_size(out)
    thumbs = len(list((out / "thumbs").iterdir()))
    print(f"report of {args.rows} rows (5 categories, --probs, --images, one --compare): {elapsed:.1f} s wall, "
          f"{cpu:.1f} s CPU (all threads), load average {os.getloadavg()[0]:.1f}; "
          f"{mb:.1f} MB in {n} files ({thumbs} thumbnails), cpu count {os.cpu_count()}")


if __name__ == "__main__":
    main()
