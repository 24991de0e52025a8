"""Command-line interface: parses arguments and dispatches to one library function per verb.

Heavy imports (torch, transformers) happen inside each verb so `vlmtax --help` stays fast.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlmtax.errors import VlmtaxError

app = typer.Typer(
    name="vlmtax",
    help="Fine-tune vision-language models to predict product attributes from catalogue images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


class Format(str, enum.Enum):
    sharegpt = "sharegpt"
    alpaca = "alpaca"


class Missing(str, enum.Enum):
    mode = "mode"
    mask = "mask"
    skip = "skip"


class DType(str, enum.Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Mode(str, enum.Enum):
    constrained = "constrained"
    free = "free"


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def synth(
    out_dir: Path,
    rows: Annotated[int, typer.Option(help="Training rows.")] = 400,
    test_rows: Annotated[int, typer.Option(help="Test rows.")] = 100,
    seed: int = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 112,
) -> None:
    """Write a synthetic catalogue in the Meesho layout (CSV, images, category_attributes.parquet)."""
    from vlmtax.synth import synth as run

    out = run(out_dir, rows=rows, test_rows=test_rows, seed=seed, image_size=image_size)
    typer.echo(f"synthetic catalogue written to {out}")


class Family(str, enum.Enum):
    qwen2_vl = "qwen2_vl"
    clip = "clip"
    siglip = "siglip"


@app.command("tiny-model")
def tiny_model(
    out_dir: Path,
    seed: int = 0,
    family: Annotated[Family, typer.Option(help="qwen2_vl: a VLM (both routes); clip/siglip: a vision "
                                                "encoder (classify route).")] = Family.qwen2_vl,
) -> None:
    """Build a tiny, randomly initialised model (Qwen2-VL, or a CLIP/SigLIP vision encoder) for tests and the demo."""
    if family is Family.qwen2_vl:
        from vlmtax.tiny_model import build_tiny_model

        out = build_tiny_model(out_dir, seed=seed)
        typer.echo(f"tiny Qwen2-VL written to {out}")
        return
    from vlmtax.tiny_vision import build_tiny_vision

    out = build_tiny_vision(out_dir, family=family.value, seed=seed)
    typer.echo(f"tiny {family.value} vision encoder written to {out}")


@app.command()
def prepare(
    csv: Annotated[Path, typer.Option(help="Catalogue CSV (id, Category, len, attr_1..attr_10).")],
    images: Annotated[Path, typer.Option(help="Folder holding the images.")],
    attributes: Annotated[Path, typer.Option(help="Category attributes: parquet, json or yaml.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    format: Annotated[Format, typer.Option(help="Training record format.")] = Format.sharegpt,
    missing: Annotated[Missing, typer.Option(help="Missing labels inside 1..len.")] = Missing.mode,
    filler: Annotated[str, typer.Option(help="Value for non-applicable slots.")] = "dummy",
    val_fraction: Annotated[float, typer.Option(help="Share of rows for validation.")] = 0.1,
    seed: int = 42,
    model: Annotated[Path | None, typer.Option(help="Processor to count tokens with.")] = None,
    max_pixels: Annotated[int, typer.Option(help="Image pixel budget used for token counting.")] = 262144,
    min_pixels: Annotated[int, typer.Option(help="Minimum image pixels used for token counting.")] = 3136,
    max_length: Annotated[int, typer.Option(help="Reject records longer than this many tokens.")] = 2048,
    strict: Annotated[bool, typer.Option(help="Any rejected row is an error.")] = False,
    image_pattern: Annotated[str, typer.Option(help="Image file name from the id.")] = "{id:06d}.jpg",
    remap: Annotated[list[str] | None, typer.Option(help="Swap slots, e.g. 'Sarees:attr_1<->attr_4'.")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-check processes (default: all cores).")] = None,
) -> None:
    """Turn a catalogue CSV and its images into training JSON, taxonomy.json and a rejects report."""
    from vlmtax.prepare import prepare as run

    report = run(
        csv=csv, images=images, attributes=attributes, out=out, format=format.value, missing=missing.value,
        filler=filler, val_fraction=val_fraction, seed=seed, model=model, max_pixels=max_pixels,
        min_pixels=min_pixels, max_length=max_length, strict=strict, image_pattern=image_pattern,
        remaps=remap or [], workers=workers,
    )
    typer.echo(
        f"prepared {report['train_records']} train + {report['val_records']} val records, "
        f"{report['rejected']} rejected -> {out}"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sft(
    ctx: typer.Context,
    recipe: Path,
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes (accelerate launch).")] = 1,
) -> None:
    """Fine-tune from a recipe YAML; extra `key=value` arguments override recipe fields."""
    from vlmtax.sft import sft as run

    out = run(recipe, overrides=list(ctx.args), num_processes=num_processes)
    if "VLMTAX_LAUNCHED" not in os.environ:  # launched ranks stay quiet; the launcher reports once
        typer.echo(f"run dir: {out}")


@app.command()
def merge(
    run_dir: Path,
    out: Annotated[Path, typer.Option(help="Merged model folder.")],
    dtype: Annotated[DType, typer.Option(help="Weights dtype of the merged model.")] = DType.auto,
) -> None:
    """Fold a LoRA adapter into its base model and verify the result."""
    from vlmtax.merge import merge as run

    run(run_dir, out, dtype=dtype.value)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Merged dir, run dir or base model.")],
    csv: Annotated[Path, typer.Option(help="Test CSV (id, Category).")],
    images: Annotated[Path, typer.Option(help="Folder holding the images.")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")],
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json (default: the model dir's).")] = None,
    batch_size: int = 8,
    probs: Annotated[Path | None, typer.Option(help="Write per-value probabilities (JSONL).")] = None,
    mode: Annotated[Mode, typer.Option(help="constrained: only allowed values; free: generate then snap.")] = (
        Mode.constrained
    ),
    image_pattern: Annotated[str, typer.Option(help="Image file name from the id.")] = "{id:06d}.jpg",
    dtype: Annotated[DType, typer.Option(help="Inference dtype (auto: fp32 on CPU, bf16/fp16 on GPU).")] = DType.auto,
) -> None:
    """Predict attribute values for a test CSV and write a submission CSV."""
    from vlmtax.predict import predict as run

    run(model=model, csv=csv, images=images, out=out, taxonomy=taxonomy, batch_size=batch_size,
        probs=probs, mode=mode.value, image_pattern=image_pattern, dtype=dtype.value)


@app.command()
def score(
    truth: Annotated[Path, typer.Option(help="Truth CSV (submission layout).")],
    pred: Annotated[Path, typer.Option(help="Prediction CSV (submission layout).")],
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json (default: inferred from truth).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metric as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG with per-attribute bars.")] = None,
) -> None:
    """Score a submission with the competition metric, per category and per attribute."""
    from vlmtax.score import score as run

    run(truth=truth, pred=pred, taxonomy=taxonomy, json_out=json_out, plot=plot)


@app.command()
def demo(workdir: Annotated[Path, typer.Option(help="Where every artefact goes.")] = Path("demo_work")) -> None:
    """Run the whole pipeline on the synthetic catalogue and the tiny model, on the CPU."""
    from vlmtax.demo import demo as run

    run(workdir)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except VlmtaxError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
