"""Benchmark `vlmtax prepare` on a Meesho-sized catalogue: 70,000 rows of 512x683 JPEGs (~50 KB each).

Target: under 20 s on a 2-core machine with the default image check (`--verify-images fast`), and a
truncated image still rejected. Measured in the same run:

- baseline: `--verify-images full` (a full decode of every image, what prepare did before), no cache;
- fast: header + end-marker check, no cache (a first run over new images);
- fast, cached: the same command again (the check cache answers for unchanged files).

Images are copies of a pool of photo-like JPEGs (smooth colour fields plus sensor-like noise), so
every file is distinct on disk. All runs read from a warm OS page cache (the files were just written).

    python bench/prepare.py [--rows 70000] [--pool 64] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("VLMTAX_PROGRESS", "1")

WORK = Path(__file__).resolve().parent / "_work" / "prepare"
WIDTH, HEIGHT = 512, 683


def _photo(rng: np.random.Generator) -> bytes:
    """A 512x683 JPEG with the size and decode cost of a catalogue photo (about 50 KB at quality 90)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    low = rng.normal(0, 1, (HEIGHT // 32 + 1, WIDTH // 32 + 1, 3))
    low = ((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(low).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
    ramp = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) * 255 / (WIDTH + HEIGHT)], -1)
    arr = np.clip(0.6 * field + 0.4 * ramp + rng.normal(0, 3, field.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _catalogue(rows: int, pool: int) -> tuple[Path, str]:
    """Synthetic catalogue with every image replaced by a 512x683 photo; one image is truncated."""
    from vlmtax.data.synth import synth

    cat = WORK / f"synth-{rows}-{WIDTH}x{HEIGHT}"
    truncated = "000001.jpg"
    if not (cat / ".complete").exists():
        shutil.rmtree(cat, ignore_errors=True)
        t0 = time.perf_counter()
        synth(cat, rows=rows, test_rows=1, image_size=16)
        rng = np.random.default_rng(0)
        photos = [_photo(rng) for _ in range(pool)]
        files = sorted((cat / "train_images").iterdir())
        for k, path in enumerate(files):
            path.write_bytes(photos[k % pool])
        good = (cat / "train_images" / truncated).read_bytes()
        (cat / "train_images" / truncated).write_bytes(good[: len(good) * 2 // 3])
        (cat / ".complete").touch()
        mb = sum(len(photos[k % pool]) for k in range(len(files))) / 1e6
        print(f"catalogue: {rows} rows, {len(files)} images ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s "
              "(setup, not timed)")
    return cat, truncated


def main() -> None:
    import pandas as pd

    from vlmtax.data.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=70_000)
    parser.add_argument("--pool", type=int, default=64, help="distinct photos the images are copies of")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    cat, truncated = _catalogue(args.rows, args.pool)
    os.environ["VLMTAX_CACHE_DIR"] = str(WORK / "cache")
    shutil.rmtree(WORK / "cache", ignore_errors=True)

    def run(verify: str, cache: bool) -> float:
        out = WORK / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = prepare(csv=cat / "train.csv", images=cat / "train_images",
                         attributes=cat / "category_attributes.parquet", out=out, verify_images=verify,
                         image_cache=cache, remaps=["Sarees:attr_1<->attr_4"])
        elapsed = time.perf_counter() - t0
        assert report["train_records"] + report["val_records"] + report["rejected"] == args.rows
        rejects = pd.read_csv(out / "rejects.csv", dtype=str)
        bad = rejects[rejects["reason"] == "unreadable_image"]["detail"].tolist()
        assert [Path(p).name for p in bad] == [truncated], f"the truncated image must be the one reject: {bad}"
        return elapsed

    print(f"\nprepare: {args.rows} rows, {WIDTH}x{HEIGHT} JPEGs, {os.cpu_count()} cores; truncated image rejected "
          "in every run")
    baseline = None if args.skip_baseline else run("full", cache=False)
    fast = run("fast", cache=False)
    cached = run("fast", cache=True)  # fills the cache
    rerun = run("fast", cache=True)
    if baseline is not None:
        print(f"  full decode (baseline):   {baseline:6.1f} s  {args.rows / baseline:8.0f} rows/s")
    print(f"  fast check, no cache:     {fast:6.1f} s  {args.rows / fast:8.0f} rows/s  (target < 20 s)")
    print(f"  fast check, filling cache:{cached:6.1f} s")
    print(f"  fast check, cached rerun: {rerun:6.1f} s  {args.rows / rerun:8.0f} rows/s")
    if baseline is not None:
        print(f"  ratio baseline / fast: {baseline / fast:.1f}x   baseline / cached rerun: {baseline / rerun:.1f}x")


if __name__ == "__main__":
    main()
