"""GPU check: the GPU paths of sft -> merge -> predict on the tiny model, one command (`make gpu-check`).

    python bench/gpu_check.py              # on a machine with a CUDA GPU; skips (exit 0, one line) without one
    python bench/gpu_check.py --cpu        # the same plumbing in fp32 on the CPU (the GPU-only stages skipped)

Stages, each printed with its time and the GPU's peak memory: sft + merge + predict in fp16 (the T4 / V100
policy: 16-bit base, fp32 adapters under fp16 autocast) and in bf16 (only where the GPU has it: compute
capability 8.0+); a 4-bit QLoRA load checked to keep the vision tower and merger in 16 bits (no
bitsandbytes Linear4bit under them, while the language model's linears are), then a QLoRA run, its merge
and predict; a run with liger-kernel on; constrained-decoding scores vs a teacher-forced forward pass in
each dtype, within a tolerance printed per dtype; and the classify route (recipes/tiny_heads_cpu.yaml on
a tiny random CLIP encoder) in fp16 and bf16, with a trained backbone and with frozen features, each
through sft and predict. Exits 1 at the first failure. Sized to finish well under 8 minutes on one GPU
(a few training steps per run). `--cpu` runs the fp32 generate and classify stages on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLMTAX_PROGRESS", "0")

import torch  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
HEADS_RECIPE = RECIPE.with_name("tiny_heads_cpu.yaml")
# Largest allowed |decoder score - teacher-forced score| per value (log-likelihood units): the two compute
# the same sums through differently shaped attention, so they differ by the dtype's rounding.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 2e-1}


class Check:
    def __init__(self, cuda: bool):
        self.cuda, self.failed = cuda, False

    def stage(self, name: str, fn: Callable[[], str | None]) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            note = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the check exits 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
                  flush=True)
            self.failed = True
            raise SystemExit(1) from exc
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if self.cuda else ""
        print(f"ok   {name} ({time.perf_counter() - start:.1f} s{peak}){': ' + note if note else ''}", flush=True)


def _setup(work: Path) -> tuple[Path, Path, Path]:
    from vlmtax.data.prepare import prepare
    from vlmtax.data.synth import synth
    from vlmtax.models.tiny_model import build_tiny_model

    model = build_tiny_model(work / "tiny", seed=0)
    data = synth(work / "syn", rows=48, test_rows=16, seed=0, image_size=112)
    prepare(csv=data / "train.csv", images=data / "train_images", attributes=data / "category_attributes.parquet",
            out=work / "data", model=model, max_pixels=12544, workers=1)
    return model, work / "data", data


def _sft(model: Path, data: Path, out: Path, *extra: str) -> Path:
    from vlmtax.sft import sft

    return sft(RECIPE, [f"model={model}", f"data={data}", f"output_dir={out}", "finetuning=lora",
                        "train.max_steps=4", "train.batch_size=8", "train.eval=false", *extra])


def _predict(model: Path, syn: Path, out: Path, dtype: str) -> str:
    from vlmtax.predict import predict

    report = predict(model=model, csv=syn / "test.csv", images=syn / "test_images", out=out, batch_size=8,
                     dtype=dtype)
    if report["predicted"] != report["rows"]:
        raise RuntimeError(f"{report['rows'] - report['predicted']} rows not predicted")
    return f"{report['predicted']} rows at {report['rows_per_s']} rows/s"


def decoder_vs_teacher_forcing(model_dir: Path, syn: Path, dtype: str) -> str:
    """Max |constrained score - teacher-forced score| over the chosen values of 8 rows, against TOLERANCE."""
    import pandas as pd
    from PIL import Image

    from vlmtax.data.answer import answer_segments, render_prompt
    from vlmtax.data.chat import SequenceBuilder
    from vlmtax.data.run_taxonomy import load_taxonomy
    from vlmtax.generate.decoding import ConstrainedDecoder
    from vlmtax.models.loading import load_for_inference

    model, processor, _ = load_for_inference(model_dir, dtype=dtype)
    taxonomy = load_taxonomy(model_dir, None)
    test = pd.read_csv(syn / "test.csv", dtype=str).head(8)
    images = [Image.open(syn / "test_images" / f"{int(i):06d}.jpg").convert("RGB") for i in test["id"]]
    cats = [taxonomy.category(c) for c in test["Category"]]
    template = taxonomy.template
    results = ConstrainedDecoder(model, processor, template).decode(images, cats)
    builder, worst = SequenceBuilder(processor, template.system), 0.0
    for image, cat, res in zip(images, cats, results):
        batch, start, owners = builder.teacher_forced(render_prompt(cat, template), [image],
                                                      answer_segments(cat, res.values, template))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch).logits[0]
        logp, ids = torch.log_softmax(logits.float(), -1), batch["input_ids"]
        for attr in cat.attributes:
            idx = [start + j for j, o in enumerate(owners) if o == attr.name]
            forced = sum(float(logp[i - 1, ids[0, i]]) for i in [*idx, idx[-1] + 1])
            chosen = res.logliks[attr.name][attr.values.index(res.values[attr.name])]
            worst = max(worst, abs(chosen - forced))
    if worst > TOLERANCE[dtype]:
        raise RuntimeError(f"{dtype}: max |decoder - teacher forcing| {worst:.3g} > tolerance {TOLERANCE[dtype]}")
    return f"{dtype}: max |decoder - teacher forcing| {worst:.3g} (tolerance {TOLERANCE[dtype]})"


def quantised_tower_linears(model: torch.nn.Module, linear4bit: type) -> tuple[list[str], list[str], list[str]]:
    """(4-bit linears under the vision tower (merger included), 4-bit linears of the language model, all the
    tower's linears), by the family table's tower prefix."""
    from vlmtax.models.families import family_of

    tower = family_of(model).tower + "."
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    four = [n for n, m in linears if isinstance(m, linear4bit)]
    return ([n for n in four if n.startswith(tower)], [n for n in four if ".language_model." in f".{n}"],
            [n for n, _ in linears if n.startswith(tower)])


def qlora_keeps_the_tower_in_16_bits(model: Path, data: Path, out: Path) -> str:
    """The 4-bit load sft makes (quantization=4bit, precision=auto): the tower and merger stay 16-bit nn.Linear
    (transformers 5 matches skip names only as prefix or suffix of the full name: issue 27 item 1)."""
    import bitsandbytes as bnb

    from vlmtax.generate.model import load_model
    from vlmtax.models.families import family_of
    from vlmtax.models.loading import DTYPES, Hardware
    from vlmtax.train.recipe import load_recipe
    from vlmtax.train.run import resolve_precision

    recipe = load_recipe(RECIPE, [f"model={model}", f"data={data}", f"output_dir={out}", "finetuning=lora",
                                  "quantization=4bit", "precision=auto"])
    precision = resolve_precision(recipe, Hardware.detect())
    loaded, _ = load_model(recipe, precision)
    try:
        in_tower, in_language, tower = quantised_tower_linears(loaded, bnb.nn.Linear4bit)
        prefix = family_of(loaded).tower + "."
        dtypes = {p.dtype for n, p in loaded.named_parameters() if n.startswith(prefix)}
    finally:
        del loaded
        torch.cuda.empty_cache()
    if in_tower:
        raise RuntimeError(f"{len(in_tower)} vision tower/merger linears are 4-bit, e.g. {in_tower[0]}")
    if not in_language or not any(".merger." in n for n in tower):
        raise RuntimeError("the check proves nothing: no 4-bit language-model linear, or no merger under the tower")
    if dtypes != {DTYPES[precision]}:
        raise RuntimeError(f"the tower's parameters are {sorted(map(str, dtypes))}, not {precision}")
    return f"{len(in_language)} language-model linears 4-bit; the tower's {len(tower)} (merger included) {precision}"


def _classify(check: Check, work: Path, clip: Path, data: Path, syn: Path, precision: str) -> None:
    """The classify route in `precision`: a trained backbone (the recipe's mode) and frozen 16-bit features."""
    from vlmtax.sft import sft

    for mode in ("full", "frozen"):
        run = work / f"heads-{mode}-{precision}"
        extra = [f"model={clip}", f"data={data}", f"output_dir={run}", f"precision={precision}", f"heads.mode={mode}",
                 "train.max_steps=4", "train.batch_size=8", "train.eval=false", "heads.extract_batch_size=16",
                 f"heads.cache_dir={work / f'heads-cache-{precision}'}"]
        check.stage(f"sft classify {mode} {precision}", lambda extra=extra: str(sft(HEADS_RECIPE, extra)))
        check.stage(f"predict classify {mode} {precision}",
                    lambda run=run: _predict(run, syn, work / f"pred-{run.name}.csv", "auto"))


def _pipeline(check: Check, work: Path, model: Path, data: Path, syn: Path, precision: str) -> None:
    from vlmtax.generate.merge import merge

    run, merged = work / f"run-{precision}", work / f"merged-{precision}"
    check.stage(f"sft {precision} (LoRA)", lambda: str(_sft(model, data, run, f"precision={precision}")))
    check.stage(f"merge {precision}", lambda: str(merge(run, merged)))
    check.stage(f"predict {precision}", lambda: _predict(merged, syn, work / f"pred-{precision}.csv", "auto"))
    check.stage(f"decoder vs teacher forcing {precision}", lambda: decoder_vs_teacher_forcing(merged, syn, precision))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the fp32 stages on the CPU (checks the plumbing)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("gpu-check: skipped, no CUDA GPU visible (torch.cuda.is_available() is False)")
        return 0
    from vlmtax.generate.merge import merge
    from vlmtax.models.loading import bf16_supported
    from vlmtax.models.tiny_vision import build_tiny_vision

    check = Check(cuda)
    if cuda:
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        print(f"gpu-check on {name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data, syn = _setup(work)
        clip = build_tiny_vision(work / "tiny-clip", family="clip", seed=0)
        if not cuda:
            _pipeline(check, work, model, data, syn, "fp32")
            _classify(check, work, clip, data, syn, "fp32")
        else:
            precisions = ["fp16", "bf16"] if bf16_supported() else ["fp16"]
            if len(precisions) == 1:
                print("skip bf16: this GPU has no bf16 in hardware (compute capability below 8.0)", flush=True)
            for precision in precisions:
                _pipeline(check, work, model, data, syn, precision)
            check.stage("4-bit QLoRA load keeps the vision tower in 16 bits",
                        lambda: qlora_keeps_the_tower_in_16_bits(model, data, work / "run-qlora-load"))
            check.stage("sft 4-bit QLoRA", lambda: str(_sft(model, data, work / "run-qlora", "quantization=4bit",
                                                             "precision=auto")))
            check.stage("merge 4-bit QLoRA (16-bit reload)", lambda: str(merge(work / "run-qlora",
                                                                                work / "merged-qlora")))
            check.stage("predict 4-bit QLoRA (merged)",
                        lambda: _predict(work / "merged-qlora", syn, work / "pred-qlora.csv", "auto"))
            check.stage("merge 4-bit QLoRA on the CPU", lambda: str(merge(work / "run-qlora", work / "merged-cpu",
                                                                          device="cpu")))
            check.stage("sft with liger-kernel", lambda: str(_sft(model, data, work / "run-liger", "train.liger=true")))
            for precision in precisions:
                _classify(check, work, clip, data, syn, precision)
    print(f"gpu-check passed in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
