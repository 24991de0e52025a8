"""The predict stage: test CSV + images + model -> submission CSV (+ per-value probabilities, rejects).

Rows are planned up front (known category? image there?) and cut into fixed batches, sorted by category
and image size so that padding and the candidate blocks of constrained decoding line up. Each decoded
batch is appended to `<out>.partial` (JSONL; first line a fingerprint of the arguments). A rerun with
the same arguments keeps those rows and decodes only the batches still missing, each with exactly its
original rows, so the resumed CSV is identical to an uninterrupted run's. The final files are written
atomically, then the partial file is removed. The partial files and the shares that
`--num-processes N` hands out live in inference/shares.py; rows, batches and outputs in inference/rows.py and
inference/outputs.py; the routes' decoders in generate/predictor.py and heads/predictor.py.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmtax.data.catalogue import DEFAULT_IMAGE_PATTERN
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import check_writable, file_sha256, guard_outputs, read_csv
from vlmtax.inference.outputs import write_outputs
from vlmtax.inference.rows import Row, decode_batch, make_batches, plan_rows
from vlmtax.inference.shares import (
    Launched,
    Partial,
    Share,
    decode_launched,
    launched_share,
    other_partials,
    rank_device,
    saved_rows,
)
from vlmtax.progress import progress_iter

MODES = ("constrained", "free")


def _decoder_factory(model: str | Path, vlm_path: Path | None, tax: Taxonomy, dtype: str, device: str | None,
                     mode: str) -> Callable[[], Any]:
    """What decodes a batch, built only when a share has work: the VLM at `vlm_path` with the constrained or
    free decoder of `mode`, or, where `vlm_path` is None, a classify run's heads."""
    def make() -> Any:
        if vlm_path is None:
            from vlmtax.heads.predictor import HeadsPredictor

            return HeadsPredictor(model, tax, device)
        from vlmtax.generate.predictor import vlm_decoder

        return vlm_decoder(vlm_path, tax, dtype, device, mode)

    return make


def _decode_share(share: Share, make_decoder: Callable[[], Any], batches: list[list[Row]], partial: Partial,
                  mode: str, want_probs: bool,
                  on_batch: Callable[[int], None] | None) -> tuple[dict[int, dict[str, Any]], int, int]:
    """Decode the share's batches still missing from its partial file: (rows done, rows decoded, forwards)."""
    done = partial.load()
    pending = [(n, b) for n, b in share.pick(batches) if any(r.index not in done for r in b)]
    if not pending:
        return done, 0, 0
    decoder = make_decoder()

    def run() -> Iterator[dict[str, Any]]:
        for n, batch in pending:
            fresh = [r for r in decode_batch(decoder, batch, want_probs) if r["row"] not in done]
            partial.append(fresh)
            done.update((r["row"], r) for r in fresh)
            if on_batch is not None:
                on_batch(n)
            yield from fresh

    todo = sum(r.index not in done for _, b in pending for r in b)
    desc = f"predicting ({mode})" + (f", share {share.index + 1} of {share.count}" if share.count > 1 else "")
    for _ in progress_iter(run(), total=todo, desc=desc, unit="rows"):
        pass
    return done, todo, decoder.forward_calls


def _guard_paths(model: Path, csv: Path, images: Path, taxonomy: str | Path | None, template: str | Path | None,
                 out: Path, probs: str | Path | None) -> Path:
    """No output may be, hold or sit in an input; each must be writable. Returns the rejects file's path."""
    rejects_path = out.with_name(out.stem + ".rejects.csv")
    guard_outputs({"--model": model if model.exists() else None, "--csv": csv, "--images": images,
                   "--taxonomy": taxonomy, "--template": template},
                  {"--out": out, "--probs": probs, "the rejects file": rejects_path,
                   "the resume file": out.with_name(out.name + ".partial")})
    for what, path in (("--out", out), ("--probs", probs)):
        if path is not None:
            check_writable(path, what, "file")
    return rejects_path


def predict(model: str | Path, csv: str | Path, images: str | Path, out: str | Path,
            taxonomy: str | Path | None = None, batch_size: int = 8, probs: str | Path | None = None,
            mode: str = "constrained", image_pattern: str = DEFAULT_IMAGE_PATTERN, dtype: str = "auto",
            device: str | None = None, num_processes: int = 1, template: str | Path | None = None,
            on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the submission CSV (and `<out stem>.rejects.csv`, and `probs` if given); returns a summary.

    `num_processes` > 1: processes 1..N-1 are launched first, so that their start-up overlaps this one's;
    each process decodes a disjoint share of the batches (batch n goes to process n mod N, this one is
    process 0) into its own partial file; this process writes the final files once every share is complete.
    `on_batch(n)` is called after the n-th decoded batch has been saved (progress hooks, tests).
    """
    csv, images, out = Path(csv), Path(images), Path(out)
    if mode not in MODES:
        raise VlmtaxError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise VlmtaxError(f"--batch-size {batch_size} is not positive", "use 1 or more")
    if probs is not None and mode != "constrained":
        raise VlmtaxError("--probs needs --mode constrained", "drop --probs or use constrained decoding")
    if probs is not None and Path(probs).resolve() == out.resolve():
        raise VlmtaxError(f"--out {out} is the same file as --probs", "pass two different paths")
    if not images.is_dir():
        raise VlmtaxError(f"image folder not found: {images}", "pass --images DIR holding the test images")
    rejects_path = _guard_paths(Path(model), csv, images, taxonomy, template, out, probs)
    args = {"model": model, "csv": csv, "images": images, "out": out, "taxonomy": taxonomy, "template": template,
            "batch_size": batch_size, "probs": probs, "mode": mode, "image_pattern": image_pattern, "dtype": dtype,
            "device": device}
    launched, saved = None, set()
    if launched_share() is None:
        from vlmtax.models.loading import useful_processes

        rows = len(read_csv(csv, "test CSV", ["id", "Category"])) if num_processes > 1 else 1
        num_processes = useful_processes(num_processes, math.ceil(rows / batch_size), "batch", "predict", device)
    if num_processes > 1 and launched_share() is None:
        other_partials(out, num_processes)
        saved = saved_rows(out, num_processes)
        launched = Launched(num_processes, [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if v is not None])
    try:
        return _predict(args, num_processes, rejects_path, on_batch, launched, saved)
    except BaseException:
        if launched is not None:
            launched.stop()
        raise


def _plan(args: dict[str, Any]) -> tuple[Path | None, Taxonomy, list[Row], list[list[Row]], dict[str, Any]]:
    """The checked inputs: the VLM's folder (None for a classify run), the taxonomy, the rows, their batches
    and the fingerprint that partial files are resumed under."""
    from vlmtax.data.run_taxonomy import load_taxonomy
    from vlmtax.heads.predictor import heads_run_root
    from vlmtax.models.loading import default_device, inspect_model_dir

    model, csv, images, mode = (args[k] for k in ("model", "csv", "images", "mode"))
    default_device(args["device"])
    heads_root = heads_run_root(model)
    if heads_root is not None and mode != "constrained":
        raise VlmtaxError(f"{model} is a classify run: its heads only ever give allowed values",
                          "drop --mode free (classify runs predict with the default mode)")
    if heads_root is not None and args["template"] is not None:
        raise VlmtaxError(f"{model} is a classify run: its heads answer without a prompt or answer template",
                          "drop --template (it applies to generate runs)")
    vlm_path = inspect_model_dir(model).path if heads_root is None else None
    tax = load_taxonomy(model, args["taxonomy"], args["template"])
    frame = read_csv(csv, "test CSV", ["id", "Category"])
    rows = plan_rows(frame, tax, images, args["image_pattern"])
    fingerprint = {"csv_sha256": file_sha256(csv), "model": str(Path(model).resolve()), "images": str(images.resolve()),
                   "taxonomy_sha256": hashlib.sha256(tax.model_dump_json().encode()).hexdigest(), "mode": mode,
                   **{k: args[k] for k in ("batch_size", "image_pattern", "dtype")},
                   "probs": args["probs"] is not None}
    return vlm_path, tax, rows, make_batches(rows, args["batch_size"]), fingerprint


def _predict(args: dict[str, Any], num_processes: int, rejects_path: Path, on_batch: Callable[[int], None] | None,
             launched: Launched | None, saved: set[int]) -> dict[str, Any]:
    """predict() past its argument checks (and, with several processes, past the launch)."""
    model, out, probs, mode = (args[k] for k in ("model", "out", "probs", "mode"))
    share = launched_share()
    try:
        vlm_path, tax, rows, batches, fingerprint = _plan(args)
    except (VlmtaxError, OSError):
        if share is None:
            raise
        # A launched process: process 0 runs the same checks on the same inputs and reports the error once
        # (it stops this process when it does; printing it here too would race it to a second error line).
        raise SystemExit(2) from None
    several = share is not None or launched is not None
    make_decoder = _decoder_factory(model, vlm_path, tax, args["dtype"],
                                    rank_device(args["device"]) if several else args["device"], mode)

    def decode(s: Share) -> tuple[dict[int, dict[str, Any]], int, int]:
        return _decode_share(s, make_decoder, batches, s.partial(out, fingerprint), mode, probs is not None, on_batch)

    if share is not None:  # a launched process: its share only; process 0 writes the outputs
        return {"share": [share.index, share.count], "decoded": decode(share)[1]}
    shares = [Share(i, num_processes) for i in range(num_processes)]
    started = time.perf_counter()
    if launched is None:
        other_partials(out, num_processes)
        done, todo, forwards = decode(shares[0])
    else:
        (done, todo), forwards = decode_launched(shares, out, fingerprint, batches, launched, decode, saved), 0
    seconds = time.perf_counter() - started
    partials = [s.partial(out, fingerprint).path for s in shares]
    report = write_outputs(rows, done, tax, out, probs, mode, rejects_path, partials)
    for path in partials:
        path.unlink(missing_ok=True)
    report.update(seconds=round(seconds, 3), rows_per_s=round(todo / seconds, 2) if todo else None,
                  forward_calls=forwards, num_processes=num_processes)
    summary = report.pop("summary")
    if todo:
        summary += f"; decoded {todo} rows at {todo / seconds:.1f} rows/s"
        if num_processes > 1:
            summary += f" with {num_processes} processes"
    if mode == "free":
        summary += f"; {report['snapped']} of {report['slots']} generated values were not allowed and were snapped"
    print(summary, flush=True)
    return report
