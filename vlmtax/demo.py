"""The demo: every stage chained on the synthetic catalogue and the tiny model, on the CPU.

synth -> tiny-model -> prepare -> sft (recipes/tiny_cpu.yaml) -> merge -> predict -> score. Each stage
is the same library function a user runs on real data; the demo only chains them. Stages whose
output already exists in the work dir are kept, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from vlmtax.fileio import check_writable


def _recipe_path() -> Path:
    """The tiny_cpu recipe: recipes/ of a source checkout, or the copy a wheel ships as vlmtax.recipes."""
    from importlib.resources import files

    checkout = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
    return checkout if checkout.is_file() else Path(str(files("vlmtax.recipes").joinpath("tiny_cpu.yaml")))


def demo(workdir: str | Path = "demo_work", rows: int = 4000, test_rows: int = 500) -> dict[str, Any]:
    """Run the whole pipeline in `workdir`; returns the score report."""
    from vlmtax.merge import merge
    from vlmtax.predict import predict
    from vlmtax.prepare import prepare
    from vlmtax.score import score
    from vlmtax.sft import sft
    from vlmtax.synth import synth
    from vlmtax.tiny_model import build_tiny_model

    work = Path(workdir).resolve()
    check_writable(work, "--workdir", "dir")
    work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    cat, model, data = work / "catalogue", work / "tiny-model", work / "data"
    run, merged, submission = work / "run", work / "merged", work / "submission.csv"
    started = time.perf_counter()

    def stage(n: int, name: str, done: Path, fn: Callable[[], Any]) -> None:
        if done.exists():
            console.print(f"[{n}/7] {name}: kept from an earlier run ({done.relative_to(work)})")
            return
        console.rule(f"[{n}/7] {name}")
        t0 = time.perf_counter()
        fn()
        console.print(f"[{n}/7] {name}: done in {time.perf_counter() - t0:.0f} s")

    stage(1, "synth: synthetic catalogue", cat / "train.csv",
          lambda: synth(cat, rows=rows, test_rows=test_rows, seed=0, image_size=112))
    stage(2, "tiny-model: random tiny Qwen2-VL", model / "vlmtax_tiny.json", lambda: build_tiny_model(model, seed=0))
    stage(3, "prepare: training records", data / "prepare_meta.json",
          lambda: prepare(csv=cat / "train.csv", images=cat / "train_images",
                          attributes=cat / "category_attributes.parquet", out=data, model=model,
                          max_pixels=12544, remaps=["Sarees:attr_1<->attr_4"], missing="mask"))
    stage(4, "sft: fine-tuning (recipes/tiny_cpu.yaml)", run / "vlmtax_meta.json",
          lambda: sft(_recipe_path(), [f"model={model}", f"data={data}", f"output_dir={run}",
                                       f"resume={'true' if run.exists() else 'false'}"]))
    full = (run / "model.safetensors").exists() or (run / "model.safetensors.index.json").exists()
    if full:  # a full fine-tuning run is a plain model folder already: merge says so and copies nothing
        merge(run, merged)
        model_for_predict = run
    else:
        stage(5, "merge: fold the adapter in, verified", merged / "vlmtax_meta.json", lambda: merge(run, merged))
        model_for_predict = merged
    stage(6, "predict: constrained decoding", submission,
          lambda: predict(model=model_for_predict, csv=cat / "test.csv", images=cat / "test_images", out=submission,
                          probs=work / "probs.jsonl"))
    console.rule("[7/7] score: competition metric")
    report = score(truth=cat / "test_labels.csv", pred=submission, taxonomy=model_for_predict / "taxonomy.json",
                   json_out=work / "score.json", plot=work / "score.png", console=console)
    elapsed = time.perf_counter() - started
    console.print(
        f"\nfinal score {report['final']:.4f} vs constant baseline {report['baseline']['final']:.4f} "
        f"(whole demo {elapsed / 60:.1f} min)\n"
        f"  catalogue   {cat}\n  tiny model  {model}\n  dataset     {data}\n  run dir     {run}\n"
        f"  merged      {merged if not full else '(full fine-tuning: the run dir is the model)'}\n"
        f"  submission  {submission} (+ probs.jsonl)\n"
        f"  score       {work / 'score.json'}, {work / 'score.png'}"
    )
    return report
