"""Stage: the tiny vision backbones. Randomly initialised CLIP / SigLIP vision encoders for the classify route.

The folder it writes loads through `AutoModel` / `AutoImageProcessor` exactly like a hub checkpoint
(`openai/clip-vit-large-patch14`, `google/siglip2-base-patch16-224`): same classes, same config and
preprocessor files, only the sizes are small. Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir
from vlmtax.models.tiny_model import MARKER

VISION_FAMILIES = ("clip", "siglip")
BUILD_VERSION = 1
# 64 px in 8 px patches: 64 tokens per image. The synthetic catalogue's stripes and checks (period
# 1/16 of the side) and its sleeve and hem geometry survive this size; training stays fast on 2 cores.
IMAGE_SIZE, PATCH = 64, 8
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
             patch_size=PATCH)


def _build(family: str, **sizes):
    """(model, processor) of `family` at SIZES, widths or depth replaced by `sizes` (bench/visible.py); the
    image and patch sizes stay, since the processor is built for them."""
    if fixed := sorted({"image_size", "patch_size"} & sizes.keys()):
        raise ValueError(f"{', '.join(fixed)} cannot be overridden: the image processor is built for {IMAGE_SIZE} px")
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    if family == "clip":
        # CLIP's preprocessing: resize the short side, centre crop; CLIP mean/std are the class defaults.
        processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return CLIPVisionModel(CLIPVisionConfig(**{**SIZES, **sizes})), processor
    processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return SiglipVisionModel(SiglipVisionConfig(**{**SIZES, **sizes})), processor


def build_tiny_vision(out_dir: str | Path, family: str = "clip", seed: int = 0, **sizes: int) -> Path:
    """Write a tiny random vision encoder and its image processor to `out_dir`; kept if already built.
    `sizes` replace widths or depth of SIZES (bench/visible.py's bigger encoders) and are recorded in the marker."""
    if family not in VISION_FAMILIES:
        raise VlmtaxError(f"unknown vision family {family!r}", f"use one of {', '.join(VISION_FAMILIES)}")
    out = Path(out_dir)
    want = {"build": BUILD_VERSION, "seed": seed, "family": family}
    if sizes:  # left out otherwise, so the markers of default builds stay as they were
        want["sizes"] = sizes
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and all(meta.get(k) == v for k, v in want.items()) and meta.get("sizes", {}) == sizes:
            return out
        raise VlmtaxError(f"{out} already exists and holds other files", "choose another folder or delete it")

    import torch
    import transformers

    import vlmtax

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _build(family, **sizes)
    meta = {**want, "vlmtax": vlmtax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
