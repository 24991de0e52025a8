"""Benchmark `vlmtax sft`: training samples/s and the padding share of its batches.

Setup of the issue's comparison: tiny Qwen2-VL (text width 64, 2 layers; vision depth 2, width 32),
400 rows of 112 px images, batch 8, LoRA rank 16 on all linear layers of the language model.
Baseline measured in the same run: TRL's stock SFTTrainer on the same model, data and LoRA setup
(its own vision collator and loss), as a toolkit that glues TRL together would run it.

    python bench/sft.py [--model DIR] [--rows 400] [--image-size 112] [--batch-size 8] [--steps 40 | --epochs 3]
    python bench/sft.py --levers --epochs 3 --repeat 3 [--vision-depth 8] [--arms before,off,cache,...]
    python bench/sft.py --levers --widths-of Qwen2-VL-2B-Instruct --depth-divisor 28 --image-size 504 \
        --rows 20 --batch-size 2 --epochs 3 [--no-step-times | --step-times-only --block-steps 1]

`--levers` runs only vlmtax, with LLaMA-Factory-equivalent settings (frozen tower and projector, LoRA on the
language model, gradient checkpointing on, no evaluation), the vision cache and packing each off and on,
alternating in one process, best of `--repeat`. samples/s counts the whole run, the vision cache's pre-pass
included; vlmtax's runs use its defaults otherwise (with the tower frozen, the cache is on). It also runs
the code as it was before issue 16 (no cache, no packing, the backward pass through the frozen tower), and
times single steps of one trainer in alternating blocks, the steadiest of its figures. `--widths-of`
trains a random model with a real checkpoint's widths, its depths divided by `--depth-divisor`, so the
tower's share of a step is close to the checkpoint's (the tiny model's is 10%). Measured figures:
docs/recipes.md, "Training throughput, measured".

`--threads` (default 1) sets torch's CPU threads for every run alike. On this shared 2-core machine two
threads spin against each other and the neighbours' load: whole runs of the same setting measured from
65 to 147 samples/s in one process, more than any lever's effect.
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
    from vlmtax.data.prepare import prepare
    from vlmtax.data.synth import synth
    from vlmtax.models.tiny_model import build_tiny_model

    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_tiny_model(WORK / "tiny-model")
    if args.vision_depth:
        model = deeper_tower(model, args.vision_depth)
    if args.widths_of:
        model = real_widths(model, args.widths_of, args.depth_divisor)
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


def real_widths(model: Path, name: str, divisor: int) -> Path:
    """A random model with a real checkpoint's widths (bench/configs/NAME.json: hidden and MLP sizes, heads,
    patch and merge sizes, M-RoPE sections) and its tower and language model each `divisor` times
    shallower, on the tiny model's tokenizer and vocabulary (the answer-only loss makes the vocabulary's
    share of a step small). Per-layer costs are the checkpoint's, so the vision / language split of a step
    is close to the checkpoint's, at a cost a CPU can time in minutes."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    out = WORK / f"model-{name}-depth-over-{divisor}"
    if (out / "config.json").exists():
        return out
    real = json.loads((Path(__file__).resolve().parent / "configs" / f"{name}.json").read_text())
    if real["model_type"] != "qwen2_vl":
        raise SystemExit(f"--widths-of: only Qwen2-VL configs are supported here, {name} is {real['model_type']}")
    config = AutoConfig.from_pretrained(model)
    text, vision, rv = config.text_config, config.vision_config, real["vision_config"]
    text.num_hidden_layers = max(1, round(real["num_hidden_layers"] / divisor))
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.max_window_layers = text.num_hidden_layers
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        setattr(text, key, real[key])
    text.rope_parameters["mrope_section"] = real["rope_scaling"]["mrope_section"]
    vision.depth = max(1, round(rv["depth"] / divisor))
    for key in ("embed_dim", "num_heads", "mlp_ratio", "hidden_size", "patch_size", "spatial_merge_size",
                "temporal_patch_size"):
        setattr(vision, key, rv[key])
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


def run_vlmtax(args, model: Path, data: Path, gc: bool, *extra: str, rows_to_max_length: bool = False,
               hooked_tower: bool = False) -> dict:
    """samples/s over the whole run: the vision cache's pre-pass (inside build_trainer) counts against it.
    `hooked_tower`: leave the input-gradient hooks on the frozen tower, as the code did before FrozenTower
    (the backward pass then runs through the tower)."""
    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import FrozenTower, build_trainer
    from vlmtax.train.recipe import load_recipe

    shutil.rmtree(WORK / "run", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides(args, model, data, gc) + list(extra))
    net, processor = load_model(recipe, "fp32")
    t0 = time.perf_counter()
    trainer = build_trainer(recipe, prepare_model(net, recipe, "fp32"), processor, "fp32")
    if rows_to_max_length:  # what flash-attention's varlen gets; here sdpa attends over the whole masked row
        trainer.data_collator.pack_capacity = recipe.train.max_length
    if hooked_tower:
        trainer.remove_callback(FrozenTower)
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

    from vlmtax.generate.model import lora_target_regex
    from vlmtax.train.recipe import load_recipe

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
                       activation_checkpointing=gc, learning_rate=recipe.train.lr, report_to="none", logging_steps=1000,
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
                        help="give the tiny model's vision tower this many blocks (default: its own 2); measured, "
                             "8 makes its forward 16%% of an uncached LoRA step, 2 about 10%%")
    parser.add_argument("--widths-of", metavar="NAME",
                        help="train a random model with the widths of bench/configs/NAME.json (a Qwen2-VL config, "
                             "e.g. Qwen2-VL-2B-Instruct) and its depths divided by --depth-divisor")
    parser.add_argument("--depth-divisor", type=int, default=8)
    parser.add_argument("--step-times-only", action="store_true",
                        help="--levers: only the alternating single-trainer step times (for models too slow to "
                             "train whole epochs on a CPU)")
    parser.add_argument("--block-steps", type=int, default=10, help="--levers: steps in each timed block")
    parser.add_argument("--no-step-times", action="store_true", help="--levers: only the whole runs")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="--levers: the whole runs to make, comma-separated (before and off always)")
    parser.add_argument("--levers", action="store_true",
                        help="only vlmtax with LLaMA-Factory's settings, the vision cache and packing off and on")
    parser.add_argument("--repeat", type=int, default=1, help="--levers: alternate the runs this many times")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every run alike (0: torch's default); see the module doc")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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


# --levers' whole runs: name -> (description, recipe overrides); "before" is the code as it was before issue
# 16 (no cache, no packing, the backward pass through the frozen tower), "off" today's without either lever.
ARMS = {"before": ("cache off, packing off, backward through the tower (before issue 16)",
                   ("train.cache_vision=false", "train.packing=false")),
        "off": ("cache off, packing off", ("train.cache_vision=false", "train.packing=false")),
        "cache": ("cache on,  packing off", ("train.cache_vision=true", "train.packing=false")),
        "packing": ("cache off, packing on", ("train.cache_vision=false", "train.packing=true")),
        "both": ("cache on,  packing on", ("train.cache_vision=true", "train.packing=true")),
        "rows-to-max": ("cache on,  packing on, rows up to max_length",
                        ("train.cache_vision=true", "train.packing=true"))}


def levers(args, model: Path, data: Path) -> None:
    """LLaMA-Factory-equivalent settings (frozen tower and projector, LoRA on the language model, gradient
    checkpointing on, no evaluation), each lever off and on, alternating in one process, best of --repeat."""
    if args.step_times_only:
        return print_step_times(args, model, data)
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown or not {"before", "off"} <= set(arms):
        raise SystemExit(f"--arms: unknown {sorted(unknown)} or missing before/off; choose from {', '.join(ARMS)}")
    results: dict[str, dict] = {}
    # An untimed first run: the first trainer in a process pays one-time costs (lazy imports, allocator
    # growth) that would otherwise all fall on whichever setting runs first.
    run_vlmtax(argparse.Namespace(**{**vars(args), "epochs": None, "steps": 5}), model, data, True)
    for _ in range(args.repeat):
        for arm in arms:
            r = run_vlmtax(args, model, data, True, *ARMS[arm][1], rows_to_max_length=arm == "rows-to-max",
                           hooked_tower=arm == "before")
            if arm not in results or r["samples_per_s"] > results[arm]["samples_per_s"]:
                results[arm] = r
    length = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
    print(f"\nsft levers: {args.rows} rows, {args.image_size} px, batch {args.batch_size}, {length}, model {model}"
          f", best of {args.repeat} (samples/s over the whole run, the cache's pre-pass included)")
    before, base = results["before"]["samples_per_s"], results["off"]["samples_per_s"]
    for arm, r in results.items():
        print(f"  vlmtax, {ARMS[arm][0]}: {r['samples_per_s']:8.4g} samples/s ({r['samples_per_s'] / base:.2f}x of "
              f"cache off, {r['samples_per_s'] / before:.2f}x of before)  padding {r['padding']:.1%}")
    if not args.no_step_times:
        print_step_times(args, model, data)


def print_step_times(args, model: Path, data: Path) -> None:
    best, tower = step_times(args, model, data)
    before, off, on = best["before"], best["off"], best["on"]
    print(f"  model {model}, {args.image_size} px, batch {args.batch_size}: one trainer, blocks of "
          f"{args.block_steps} steps (collate + forward + backward) alternating, fastest of {args.repeat * 5} "
          f"each: {before * 1000:.1f} ms a step as before this issue (no cache, backward through the frozen tower), "
          f"{off * 1000:.1f} without the cache ({before / off:.2f}x), {on * 1000:.1f} with it ({off / on:.2f}x of "
          f"no cache, {before / on:.2f}x of before); the frozen tower's forward alone {tower * 1000:.1f} ms, "
          f"{tower / off:.0%} of an uncached step")


def step_times(args, model: Path, data: Path) -> tuple[dict[str, float], float]:
    """Seconds a step as before this issue (no cache, the tower hooked so that backward runs through it),
    without the cache and with it, from one trainer switching between the three in alternating blocks (a
    loaded machine slows all alike, and the fastest block of each is kept); and the fastest of ten forwards
    of the frozen tower alone on one batch's images."""
    import torch

    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import build_trainer, drop_frozen_tower_input_grads
    from vlmtax.generate.vision_cache import vision_tower
    from vlmtax.train.recipe import load_recipe

    shutil.rmtree(WORK / "run", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides(args, model, data, True) + ["train.cache_vision=true"])
    net, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(net, recipe, "fp32"), processor, "fp32")
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    drop_frozen_tower_input_grads(trainer.model)  # as training does on its first step
    patch_embed = vision_tower(trainer.model).patch_embed
    collator, cache, n = trainer.data_collator, trainer.data_collator.vision_cache, len(trainer.train_dataset)
    best = {"before": float("inf"), "off": float("inf"), "on": float("inf")}
    for block in range(args.repeat * 15):
        mode = list(best)[block % 3]
        collator.vision_cache = cache if mode == "on" else None
        hook = patch_embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)) if mode == "before" else None
        t0 = time.perf_counter()
        for step in range(args.block_steps):
            start = (block * args.block_steps + step) * args.batch_size
            rows = [{"index": (start + i) % n} for i in range(args.batch_size)]
            trainer.compute_loss(trainer.model, collator(rows)).backward()
        best[mode] = min(best[mode], (time.perf_counter() - t0) / args.block_steps)
        if hook is not None:
            hook.remove()
    collator.vision_cache = None
    batch = collator([{"index": i % n} for i in range(args.batch_size)])
    tower = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        with torch.no_grad():
            trainer.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        tower = min(tower, time.perf_counter() - t0)
    return best, tower


if __name__ == "__main__":
    main()
