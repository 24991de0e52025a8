"""The vision-feature cache of sft: a frozen tower's merged image features, computed once, read every epoch.

With `freeze.vision` and `freeze.projector` on, the features the language model receives for an image
are the same at every step, yet the stock path decodes, resizes and encodes the image again each
time. `train.cache_vision` computes them in a pre-pass before training (each process its own share of
the images not yet cached), stores one safetensors file per image at the dtype the training forward
produces them in, and the collator then reads them back (memory-mapped) instead of the pixels. The
model receives them through transformers' `mm_encoder_outputs`, so it still places them at the image
tokens and computes the M-RoPE positions from `image_grid_thw` itself: the language model sees the
same inputs as without the cache.

Layout: `<cache dir>/<key of the vision weights, processor settings and dtype>/<sha256 of the image
file>.safetensors`, holding `features` (image tokens x hidden) and `grid_thw`. Files are written under
a temporary name and renamed, so an interrupted pre-pass leaves no partial entry and a resumed run
computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtax.data.chat import image_token_count
from vlmtax.data.records import load_image
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_path, file_sha256, os_error
from vlmtax.models.families import FAMILIES
from vlmtax.train.schema import Recipe

CACHE_DIRNAME = "vision_cache"


def wanted(recipe: Recipe, model_type: str) -> bool:
    """train.cache_vision: null means on exactly when the tower and projector are both frozen."""
    setting = recipe.train.cache_vision
    frozen = recipe.freeze.vision and recipe.freeze.projector
    if setting and not frozen:
        raise VlmtaxError("train.cache_vision=true needs a frozen vision tower and projector",
                          "set freeze.vision=true freeze.projector=true, or train.cache_vision=false")
    able = model_type in FAMILIES and FAMILIES[model_type].vision_cache  # the family table says (models/families.py)
    if setting and not able:
        supported = ", ".join(f.name for f in FAMILIES.values() if f.vision_cache)
        raise VlmtaxError(f"train.cache_vision is not supported for model type {model_type!r}",
                          f"set train.cache_vision=false (supported: {supported})")
    return bool(frozen and able) if setting is None else setting


def find_vision_tower(model: Any) -> torch.nn.Module | None:
    """The model's vision tower (the first module named `visual`, PEFT-wrapped or not), or None."""
    return next((module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "visual"), None)


def vision_tower(model: Any) -> torch.nn.Module:
    tower = find_vision_tower(model)
    if tower is None:
        raise VlmtaxError("the model has no vision tower named 'visual'", "set train.cache_vision=false")
    return tower


def weights_key(tower: torch.nn.Module, processor: Any, dtype: str) -> str:
    """Hash of the tower's weights (merger included), the image processor's settings and the feature dtype."""
    h = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(dtype.encode())
    return h.hexdigest()[:24]


def estimated_bytes(processor: Any, paths: list[str], recipe: Recipe, hidden: int, dtype: torch.dtype) -> int:
    """Disk the cache needs: image tokens (from the image headers) x hidden size x bytes per value."""
    tokens = 0
    for path in paths:
        with Image.open(path) as img:
            width, height = img.size
        tokens += image_token_count(processor, width, height, recipe.image.min_pixels, recipe.image.max_pixels)
    return tokens * hidden * torch.empty((), dtype=dtype).element_size()


class VisionCache:
    """One folder of per-image feature files for one (tower weights, processor settings, dtype)."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self._names: dict[str, str] = {}
        self.computed = 0  # images this process encoded, for tests and the log

    def file(self, image: str) -> Path:
        if image not in self._names:
            self._names[image] = file_sha256(image)
        return self.dir / f"{self._names[image]}.safetensors"

    def missing(self, images: list[str]) -> list[str]:
        """Images without a cache file, each file once (identical images share one entry), in a fixed order."""
        todo: dict[Path, str] = {}
        for image in sorted(set(images)):
            path = self.file(image)
            if not path.is_file() and path not in todo:
                todo[path] = image
        return list(todo.values())

    def fill(self, model: Any, processor: Any, images: list[str], batch_size: int, context: Any,
             device: torch.device) -> None:
        """Encode `images` on `device` (this rank's) with the model's own image path, under the training
        forward's autocast `context`. Under DeepSpeed or FSDP the Trainer has not placed the model yet
        (place_model_on_device is off): the tower visits `device` for the pass, else it ran on the CPU, in fp32."""
        from safetensors.torch import save_file

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.dir) from None
        tower = vision_tower(model)
        home = next(tower.parameters()).device
        if images and home != device:
            tower.to(device)
        try:
            self._encode(model, processor, images, batch_size, context, device, save_file)
        finally:
            if images and home != device:
                tower.to(home)

    def _encode(self, model: Any, processor: Any, images: list[str], batch_size: int, context: Any,
                device: torch.device, save_file: Any) -> None:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            vision = processor.image_processor(images=[load_image(p) for p in chunk], return_tensors="pt")
            grid = vision["image_grid_thw"]
            with torch.no_grad(), context():
                feats = model.get_image_features(vision["pixel_values"].to(device), grid.to(device)).pooler_output
            for image, feat, g in zip(chunk, feats, grid):
                with atomic_path(self.file(image)) as tmp:
                    save_file({"features": feat.detach().cpu().contiguous(), "grid_thw": g.clone()}, str(tmp))
            self.computed += len(chunk)

    def batch(self, images: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Collator inputs for `images` in order: their features end to end, their grids, their token counts."""
        from safetensors import safe_open

        feats, grids = [], []
        for image in images:
            with safe_open(str(self.file(image)), framework="pt") as f:
                feats.append(f.get_tensor("features"))
                grids.append(f.get_tensor("grid_thw"))
        if not feats:
            return {}, []
        return ({"image_embeds": torch.cat(feats), "image_grid_thw": torch.stack(grids)},
                [len(f) for f in feats])


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Cached features go to the model as `mm_encoder_outputs`, which it scatters onto the image tokens."""
    embeds = inputs.pop("image_embeds", None)
    if embeds is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(embeds,))}
    return inputs


def setup(trainer: Any, recipe: Recipe, processor: Any, records: list[dict[str, Any]]) -> VisionCache | None:
    """Build or complete the cache for every record's images before training; None when it is off.

    Every process lists the missing images before any writes (a barrier), then encodes every n-th of
    them, so no image is encoded twice; a second barrier waits for all files."""
    model = trainer.model
    if not wanted(recipe, model.config.model_type):
        return None
    images = [p for rec in records for p in rec["images"]]
    dtype = next(vision_tower(model).parameters()).dtype
    need = estimated_bytes(processor, sorted(set(images)), recipe, model.config.get_text_config().hidden_size, dtype)
    if need > recipe.train.cache_vision_max_gb * 1e9:
        warnings.warn(f"the vision cache would need {need / 1e9:.1f} GB, over train.cache_vision_max_gb="
                      f"{recipe.train.cache_vision_max_gb}: training without it", stacklevel=2)
        return None
    root = recipe.train.cache_vision_dir or recipe.output_dir / CACHE_DIRNAME
    acc = trainer.accelerator
    # The features are stored as the training forward computes them: in the tower's dtype, under the
    # mixed-precision autocast accelerate wraps the forward in.
    cache = VisionCache(root, weights_key(vision_tower(model), processor, f"{dtype}/{acc.mixed_precision}"))
    todo = cache.missing(images)
    acc.wait_for_everyone()
    cache.fill(model, processor, todo[acc.process_index::acc.num_processes], recipe.train.batch_size,
               acc.autocast, acc.device)
    acc.wait_for_everyone()
    # One write of the whole line: print() writes the text and the newline separately, and two processes'
    # lines then run together on a shared stderr.
    sys.stderr.write(f"vision cache {cache.dir}: {len(set(images))} images, {len(todo)} missing, {cache.computed} "
                     f"encoded by process {acc.process_index}\n")
    sys.stderr.flush()
    return cache
