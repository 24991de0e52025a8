"""Benchmark the vision cache's storage formats: what bf16 and fp8 storage change in the features and a step.

    python bench/vision_cache_fp8.py [--rows 48] [--batches 6] [--batch-size 4]

On the tiny Qwen2-VL (random weights, text width 64) in fp32, LoRA with the tower and projector frozen: the
cache is built once in fp32, then each batch's step (loss and LoRA gradients) runs on the features as
stored exactly, rounded to bf16, and through fp8 e4m3 with a per-row and with a per-image (per-tensor)
scale. Prints per format: the features' relative RMS error, the largest |loss - exact loss| and relative
loss change, and the gradients' relative L2 difference, each the worst over the batches. Figures:
docs/recipes.md, "The vision cache".
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLMTAX_PROGRESS", "0")

import torch  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def _per_tensor_fp8(x: torch.Tensor) -> torch.Tensor:
    from vlmtax.generate.vision_cache_storage import FP8, FP8_MAX

    scale = x.abs().amax().clamp_min(1e-30) / FP8_MAX
    return (x / scale).to(FP8).float() * scale


def _per_row_fp8(x: torch.Tensor) -> torch.Tensor:
    from vlmtax.generate.vision_cache_storage import fp8_decode, fp8_encode

    return fp8_decode(*fp8_encode(x), torch.float32)


FORMATS = {"bf16": lambda x: x.to(torch.bfloat16).float(), "fp8 per row": _per_row_fp8,
           "fp8 per image": _per_tensor_fp8}


class Rounded:
    """A vision cache whose features pass through `fn`, image by image, as if stored in that format."""

    def __init__(self, cache, fn):
        self.cache, self.fn, self.error = cache, fn, 0.0

    def batch(self, images):
        feats, per_image = self.cache.batch(images)
        exact = feats["image_embeds"]
        feats["image_embeds"] = torch.cat([self.fn(x) for x in exact.split(per_image)])
        err = (feats["image_embeds"] - exact).norm() / exact.norm()
        self.error = max(self.error, float(err))
        return feats, per_image


def _step(trainer, rows):
    batch = trainer.data_collator(rows)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])
    return float(loss.detach()), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    from vlmtax.data.prepare import prepare
    from vlmtax.data.synth import synth
    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import build_trainer
    from vlmtax.models.tiny_model import build_tiny_model
    from vlmtax.train.recipe import load_recipe

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny", seed=0)
        syn = synth(work / "syn", rows=args.rows, test_rows=1, seed=0, image_size=112)
        prepare(csv=syn / "train.csv", images=syn / "train_images", attributes=syn / "category_attributes.parquet",
                out=work / "data", model=model_dir, max_pixels=12544, workers=1)
        recipe = load_recipe(RECIPE, [f"model={model_dir}", f"data={work / 'data'}", f"output_dir={work / 'run'}",
                                      "finetuning=lora", "freeze.vision=true", "freeze.projector=true",
                                      "train.eval=false", "lora.dropout=0", "train.cache_vision_storage=exact"])
        model, processor = load_model(recipe, "fp32")
        trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
        cache = trainer.data_collator.vision_cache
        batches = [[{"index": i} for i in range(b * args.batch_size, (b + 1) * args.batch_size)]
                   for b in range(args.batches)]
        exact = []
        for rows in batches:
            trainer.data_collator.vision_cache = cache
            exact.append(_step(trainer, rows))
        print(f"{'format':<14} {'feature rel. RMS err':>21} {'max |dloss|':>12} {'max rel. dloss':>15} "
              f"{'max grad rel. L2':>17}")
        for name, fn in FORMATS.items():
            rounded = Rounded(cache, fn)
            trainer.data_collator.vision_cache = rounded
            dloss, rel, grad = 0.0, 0.0, 0.0
            for rows, (loss0, grads0) in zip(batches, exact):
                loss, grads = _step(trainer, rows)
                dloss, rel = max(dloss, abs(loss - loss0)), max(rel, abs(loss - loss0) / abs(loss0))
                grad = max(grad, float((grads - grads0).norm() / grads0.norm()))
            print(f"{name:<14} {rounded.error:>21.2e} {dloss:>12.2e} {rel:>15.2e} {grad:>17.2e}")


if __name__ == "__main__":
    main()
