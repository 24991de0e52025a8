"""Benchmark `vlmtax sft`: training samples/s and the padding share of its batches.

Setup of the issue's comparison: tiny Qwen2-VL (text width 64, 2 layers; vision depth 2, width 32),
400 rows of 112 px images, batch 8, LoRA rank 16 on all linear layers of the language model.
Baseline measured in the same run: TRL's stock SFTTrainer on the same model, data and LoRA setup
(its own vision collator and loss), as a toolkit that glues TRL together would run it.

    python bench/sft.py [--model DIR] [--rows 400] [--image-size 112] [--batch-size 8] [--steps 40 | --epochs 3]
    python bench/sft.py --levers --epochs 3 --repeat 2

`--levers` runs only vlmtax, with LLaMA-Factory-equivalent settings (frozen tower and projector, LoRA on the
language model, gradient checkpointing on, no evaluation), the vision cache and packing each off and on,
alternating in one process, best of `--repeat`. samples/s counts the whole run, the vision cache's pre-pass
included; vlmtax's runs use its defaults otherwise (with the tower frozen, the cache is on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")

WORK = Path(__file__).resolve().parent / "_work" / "sft"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def setup(args) -> tuple[Path, Path]:
    from vlmtax.prepare import prepare
    from vlmtax.synth import synth
    from vlmtax.tiny_model import build_tiny_model

    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_tiny_model(WORK / "tiny-model")
    if args.vision_depth:
        model = deeper_tower(model, args.vision_depth)
    cat = WORK / f"synth-{args.rows}-{args.image_size}"
    if not cat.exists():
        synth(cat, rows=args.rows, test_rows=1, image_size=args.image_size)
    data = WORK / f"data-{args.rows}-{args.image_size}"
    if not data.exists():
        prepare(csv=cat / "train.csv", images=cat / "train_images", attributes=cat / "category_attributes.parquet",
                out=data, val_fraction=0.0)
    return model, data


def deeper_tower(model: Path, depth: int) -> Path:
    """The tiny model with a `depth`-block vision tower (same seed, same everything else): a model whose frozen
    tower costs the share of a training step that a real checkpoint's does (see --vision-depth)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    out = WORK / f"tiny-model-vision{depth}"
    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(model)
    config.vision_config.depth = depth
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).to(torch.float32).save_pretrained(out)
    AutoProcessor.from_pretrained(model).save_pretrained(out)
    return out


def overrides(args, model: Path, data: Path, gc: bool) -> list[str]:
    length = f"train.epochs={args.epochs}" if args.epochs else f"train.max_steps={args.steps}"
    return [f"model={model}", f"data={data}", f"output_dir={WORK / 'run'}", length,
            f"train.batch_size={args.batch_size}", "train.grad_accum=1", "train.eval=false", "log.every=1000",
            f"train.gradient_checkpointing={str(gc).lower()}", "lora.rank=16", "lora.modules_to_save=[]",
            "lora.plus_ratio=16", "freeze.vision=true", "freeze.projector=true", "train.save_steps=100000",
            f"image.max_pixels={args.image_size ** 2}"]


def run_vlmtax(args, model: Path, data: Path, gc: bool, *extra: str, rows_to_max_length: bool = False) -> dict:
    """samples/s over the whole run: the vision cache's pre-pass (inside build_trainer) counts against it."""
    from vlmtax.recipe import load_recipe
    from vlmtax.sft import load_model, prepare_model
    from vlmtax.train_loop import build_trainer

    shutil.rmtree(WORK / "run", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides(args, model, data, gc) + list(extra))
    net, processor = load_model(recipe, "fp32")
    t0 = time.perf_counter()
    trainer = build_trainer(recipe, prepare_model(net, recipe, "fp32"), processor, "fp32")
    if rows_to_max_length:  # what flash-attention's varlen gets; here sdpa attends over the whole masked row
        trainer.data_collator.pack_capacity = recipe.train.max_length
    prepass = time.perf_counter() - t0
    metrics = trainer.train().metrics
    collator = trainer.data_collator
    seconds = prepass + metrics["train_runtime"]
    return {"samples_per_s": metrics["train_samples_per_second"] * metrics["train_runtime"] / seconds,
            "padding": collator.padding / collator.tokens}


def run_stock_trl(args, model: Path, data: Path, gc: bool) -> dict:
    """TRL's own VLM path: messages + images through DataCollatorForVisionLanguageModeling."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from vlmtax.recipe import load_recipe
    from vlmtax.sft import lora_target_regex

    shutil.rmtree(WORK / "run-trl", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides(args, model, data, gc))
    from PIL import Image

    rows = []
    for rec in json.loads((data / "train.json").read_text()):
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        rows.append({"images": [Image.open(rec["images"][0]).convert("RGB")],
                     "messages": [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": user.replace("<image>", "")}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    processor = AutoProcessor.from_pretrained(model)
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": args.image_size ** 2}
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model),
        args=SFTConfig(output_dir=str(WORK / "run-trl"), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size,
                       gradient_checkpointing=gc, learning_rate=recipe.train.lr, report_to="none", logging_steps=1000,
                       save_strategy="no", max_length=None, disable_tqdm=True, bf16=False),
        train_dataset=Dataset.from_list(rows), processing_class=processor,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(recipe), task_type="CAUSAL_LM"),
    )
    return {"samples_per_s": trainer.train().metrics["train_samples_per_second"], "padding": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir (default: build the tiny model)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epochs", type=float, help="train this many epochs instead of --steps")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--vision-depth", type=int,
                        help="give the tiny model's vision tower this many blocks (default: its own 2); 8 makes the "
                             "frozen tower about a third of a LoRA step, Qwen2-VL-2B's share by bench/sft_cost.py")
    parser.add_argument("--levers", action="store_true",
                        help="only vlmtax with LLaMA-Factory's settings, the vision cache and packing off and on")
    parser.add_argument("--repeat", type=int, default=1, help="--levers: alternate the runs this many times")
    args = parser.parse_args()
    model, data = setup(args)
    if args.levers:
        return levers(args, model, data)
    results = {}
    for gc in (False, True):
        if not args.skip_baseline:
            t0 = time.perf_counter()
            results[f"stock TRL, checkpointing {'on' if gc else 'off'}"] = run_stock_trl(args, model, data, gc)
            print(f"  (baseline took {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        results[f"vlmtax,    checkpointing {'on' if gc else 'off'}"] = run_vlmtax(args, model, data, gc)
    print(f"\nsft benchmark: {args.rows} rows, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"model {model}")
    for name, r in results.items():
        pad = f"padding {r['padding']:.1%}" if r["padding"] is not None else ""
        print(f"  {name}: {r['samples_per_s']:7.1f} samples/s  {pad}")
    if not args.skip_baseline:
        for gc in ("off", "on"):
            ours = results[f"vlmtax,    checkpointing {gc}"]["samples_per_s"]
            base = results[f"stock TRL, checkpointing {gc}"]["samples_per_s"]
            print(f"  ratio vlmtax / stock TRL, checkpointing {gc}: {ours / base:.2f}x")


def levers(args, model: Path, data: Path) -> None:
    """LLaMA-Factory-equivalent settings (frozen tower and projector, LoRA on the language model, gradient
    checkpointing on, no evaluation), each lever off and on, alternating in one process, best of --repeat."""
    runs = {"cache off, packing off": ("train.cache_vision=false", "train.packing=false"),
            "cache on,  packing off": ("train.cache_vision=true", "train.packing=false"),
            "cache off, packing on": ("train.cache_vision=false", "train.packing=true"),
            "cache on,  packing on": ("train.cache_vision=true", "train.packing=true"),
            "cache on,  packing on, rows up to max_length": ("train.cache_vision=true", "train.packing=true")}
    results: dict[str, dict] = {}
    # An untimed first run: the first trainer in a process pays one-time costs (lazy imports, allocator
    # growth) that would otherwise all fall on whichever setting runs first.
    run_vlmtax(argparse.Namespace(**{**vars(args), "epochs": None, "steps": 5}), model, data, True)
    for _ in range(args.repeat):
        for name, extra in runs.items():
            r = run_vlmtax(args, model, data, True, *extra, rows_to_max_length="max_length" in name)
            if name not in results or r["samples_per_s"] > results[name]["samples_per_s"]:
                results[name] = r
    length = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
    print(f"\nsft levers: {args.rows} rows, {args.image_size} px, batch {args.batch_size}, {length}, model {model}"
          f", best of {args.repeat} (samples/s over the whole run, the cache's pre-pass included)")
    base = results["cache off, packing off"]["samples_per_s"]
    for name, r in results.items():
        print(f"  vlmtax, {name}: {r['samples_per_s']:7.1f} samples/s ({r['samples_per_s'] / base:.2f}x)  "
              f"padding {r['padding']:.1%}")
    off, on, tower = step_times(args, model, data)
    print(f"  one trainer, blocks of 10 steps (collate + forward + backward) alternating cache off/on, fastest of "
          f"{args.repeat * 5} each: {off * 1000:.1f} / {on * 1000:.1f} ms a step, cache on {off / on:.2f}x; the frozen "
          f"tower's forward alone {tower * 1000:.1f} ms, {tower / off:.0%} of an uncached step")


def step_times(args, model: Path, data: Path) -> tuple[float, float, float]:
    """Seconds a step without and with the cache, from one trainer switching its collator between the two in
    alternating blocks (a loaded machine slows both alike, and the fastest block of each is kept); and the
    fastest of ten forwards of the frozen tower alone on one batch's images."""
    import torch

    from vlmtax.recipe import load_recipe
    from vlmtax.sft import load_model, prepare_model
    from vlmtax.train_loop import build_trainer

    shutil.rmtree(WORK / "run", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides(args, model, data, True) + ["train.cache_vision=true"])
    net, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(net, recipe, "fp32"), processor, "fp32")
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator, cache, n = trainer.data_collator, trainer.data_collator.vision_cache, len(trainer.train_dataset)
    best = {False: float("inf"), True: float("inf")}
    for block in range(args.repeat * 10):
        use = bool(block % 2)
        collator.vision_cache = cache if use else None
        t0 = time.perf_counter()
        for step in range(10):
            rows = [{"index": (block * 80 + step * args.batch_size + i) % n} for i in range(args.batch_size)]
            trainer.compute_loss(trainer.model, collator(rows)).backward()
        best[use] = min(best[use], (time.perf_counter() - t0) / 10)
    collator.vision_cache = None
    batch = collator([{"index": i % n} for i in range(args.batch_size)])
    tower = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        with torch.no_grad():
            trainer.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        tower = min(tower, time.perf_counter() - t0)
    return best[False], best[True], tower


if __name__ == "__main__":
    main()
