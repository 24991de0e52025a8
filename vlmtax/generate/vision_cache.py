"""The vision-feature cache of sft: a frozen tower's merged image features, computed once, read every epoch.

With `freeze.vision` and `freeze.projector` on, the features the language model receives for an image
are the same at every step, yet the stock path decodes, resizes and encodes the image again each
time. `train.cache_vision` computes them in a pre-pass before training (each process its own share of
the images not yet cached), stores one safetensors file per image in the dtype the model consumes them in
or in fp8 with per-row scales (vision_cache_storage.py: the formats, and the disk they need against the
free disk), and the collator then reads them back (memory-mapped) instead of the pixels. The
model receives them through transformers' `mm_encoder_outputs`, so it still places them at the image
tokens and computes the M-RoPE positions from `image_grid_thw` itself: the language model sees the
same inputs as without the cache.

Layout: `<cache dir>/<key of the vision weights, processor settings and autocast>-<storage>-<dtype>/<sha256
of the image file>.safetensors`, holding `features` (image tokens x hidden), `grid_thw`, and in fp8
`scale`. Files are written under a temporary name and renamed, so an interrupted pre-pass leaves no
partial entry and a resumed run computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtax.data.chat import image_token_count
from vlmtax.data.records import load_image
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_path, file_sha256, os_error
from vlmtax.generate.vision_cache_storage import Storage, candidates, exact_dtype, shortfall, usable_bytes
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


def image_tokens(processor: Any, paths: Iterable[str], recipe: Recipe) -> dict[str, int]:
    """Image tokens of each image, from its header and the processor's own resize arithmetic."""
    tokens = {}
    for path in paths:
        with Image.open(path) as img:
            width, height = img.size
        tokens[path] = image_token_count(processor, width, height, recipe.image.min_pixels, recipe.image.max_pixels)
    return tokens


class VisionCache:
    """One folder of per-image feature files for one (tower weights, processor settings, storage format).
    `storage` None stores the features as produced (tests); `names` shares image hashes between caches."""

    def __init__(self, root: Path, key: str, storage: Storage | None = None, names: dict[str, str] | None = None):
        self.dir = Path(root) / key
        self.storage = storage
        self._names: dict[str, str] = {} if names is None else names
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
                feat = feat.detach().cpu()
                stored = self.storage.encode(feat) if self.storage else {"features": feat.contiguous()}
                with atomic_path(self.file(image)) as tmp:
                    save_file({**stored, "grid_thw": g.clone()}, str(tmp))
            self.computed += len(chunk)

    def batch(self, images: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Collator inputs for `images` in order: their features end to end, their grids, their token counts."""
        from safetensors import safe_open

        feats, grids = [], []
        for image in images:
            with safe_open(str(self.file(image)), framework="pt") as f:
                stored = {name: f.get_tensor(name) for name in f.keys()}
            feats.append(self.storage.decode(stored) if self.storage else stored["features"])
            grids.append(stored["grid_thw"])
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


def choose_cache(trainer: Any, recipe: Recipe, processor: Any, images: list[str]) -> VisionCache | None:
    """The first storage format of train.cache_vision_storage whose cache fits (vision_cache_storage.py), or
    None after one warning naming the sizes and the fix. Every process decides on its own disk figures, then
    all take the most cautious decision, so no process waits at a barrier that another skipped."""
    model, acc = trainer.model, trainer.accelerator
    tower = vision_tower(model)
    base = weights_key(tower, processor, f"{acc.mixed_precision}/v2")
    exact = exact_dtype(model, next(tower.parameters()).dtype, acc.mixed_precision)
    storages = candidates(recipe.train.cache_vision_storage, exact)
    root = Path(recipe.train.cache_vision_dir or recipe.output_dir / CACHE_DIRNAME)
    tokens = image_tokens(processor, sorted(set(images)), recipe)
    hidden, cap = model.config.get_text_config().hidden_size, recipe.train.cache_vision_max_gb
    usable, free = usable_bytes(root)
    names: dict[str, str] = {}
    caches, needs = [], []
    for storage in storages:
        cache = VisionCache(root, f"{base}-{storage.name}-{str(storage.dtype).removeprefix('torch.')}", storage, names)
        todo = cache.missing(images)
        caches.append(cache)
        needs.append((storage.bytes_for(sum(tokens.values()), hidden),
                      storage.bytes_for(sum(tokens[p] for p in todo), hidden)))
    pick = next((i for i, (total, write) in enumerate(needs)
                 if write <= usable and (cap is None or total <= cap * 1e9)), len(caches))
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        pick = max(gather_object([pick]))
    if pick == len(caches):
        warnings.warn(shortfall(storages, needs, root, cap, free, usable), stacklevel=3)
        return None
    if pick > 0:
        sys.stderr.write(f"vision cache: {needs[0][0] / 1e9:.1f} GB in {exact} does not fit, "
                         f"storing fp8 ({needs[pick][0] / 1e9:.1f} GB)\n")
    return caches[pick]


def setup(trainer: Any, recipe: Recipe, processor: Any, records: list[dict[str, Any]]) -> VisionCache | None:
    """Build or complete the cache for every record's images before training; None when it is off.

    Every process lists the missing images before any writes (a barrier), then encodes every n-th of
    them, so no image is encoded twice; a second barrier waits for all files."""
    model = trainer.model
    if not wanted(recipe, model.config.model_type):
        return None
    images = [p for rec in records for p in rec["images"]]
    cache = choose_cache(trainer, recipe, processor, images)
    if cache is None:
        return None
    acc = trainer.accelerator
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
