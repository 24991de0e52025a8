"""The classify route's backbones: any transformers vision encoder with an image processor, or the vision
tower of a Qwen2-VL-family checkpoint, as one module mapping processed images to one vector per image.

Pooled features are the model's pooler output where it has one (CLIP's projected-free CLS, SigLIP's
attention pool, DINOv2's CLS, ConvNeXt's pooled map), else the mean of the last hidden states. For a
Qwen2-VL-family tower the pooler output is the merger's tokens (what the language model sees), averaged
per image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtax.errors import VlmtaxError, first_line
from vlmtax.families import FAMILIES

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class Encoder(nn.Module):
    """Processed images in, one pooled feature vector per image out."""

    def __init__(self, model: nn.Module, qwen_merge: int | None = None):
        super().__init__()
        self.model = model
        self.qwen_merge = qwen_merge  # spatial merge size of a Qwen tower; None for plain encoders

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        if self.qwen_merge is not None:
            out = self.model(pixel_values, grid_thw=image_grid_thw)
            tokens = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
            sizes = (image_grid_thw.prod(-1) // self.qwen_merge ** 2).tolist()
            return torch.stack([t.mean(0) for t in tokens.split(sizes)])
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(1)
        return pooled.flatten(1)


def _check_source(source: str) -> None:
    if not Path(source).exists() and not _HUB_ID.fullmatch(source):
        raise VlmtaxError(f"model path {source} does not exist", "set model: to a local folder or a hub id")


def load_image_processor(source: str | Path, trust_remote_code: bool = False) -> Any:
    """The backbone's image processor; a model without one cannot be a classify backbone."""
    from transformers import AutoConfig, AutoImageProcessor

    source = str(source)
    _check_source(source)
    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        try:
            kind = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
        except (OSError, ValueError, KeyError):
            kind = "unknown"
        first = first_line(exc)
        raise VlmtaxError(f"model {source!r} (type {kind}) has no image processor: {first[:200]}",
                          "use a vision encoder that ships preprocessor_config.json (CLIP, SigLIP, DINOv2, "
                          "ConvNeXt, a Qwen2-VL checkpoint)") from None


def load_encoder(source: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Encoder:
    """The vision encoder of `source`: a vision model, a dual-encoder's vision half, or a VLM's tower."""
    from transformers import AutoConfig, AutoModel

    source = str(source)
    _check_source(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if config.model_type in FAMILIES:
            tower = _vlm_tower(source, config, dtype, trust_remote_code)
            return Encoder(tower, qwen_merge=config.vision_config.spatial_merge_size)
        model = AutoModel.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise VlmtaxError(f"cannot load backbone {source!r}: {first[:200]}",
                          "use a local model folder (no hub access?) or check the hub id") from None
    # CLIPModel / SiglipModel hold a text tower too: keep the vision half only.
    return Encoder(model.vision_model if hasattr(model, "vision_model") else model)


def _vlm_tower(source: str, config: Any, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A VLM's vision tower alone: its class from a weightless (meta-device) skeleton, then only the checkpoint's
    `visual.*` / `model.visual.*` tensors renamed onto it (transformers' key_mapping). Loading the whole VLM to
    keep `.visual` took the language model too (about 15 GB in fp32 for Qwen2.5-VL-3B)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        cls = type(AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code).model.visual)
    # The language model's tensors are expected to be left out: no report of them (a missing tower key still warns).
    tower_only = type(cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": [r".*"]})
    return tower_only.from_pretrained(source, config=config.vision_config, dtype=dtype,
                                      trust_remote_code=trust_remote_code,
                                      key_mapping={r"^(?:model\.)?visual\.": ""})


def process_images(processor: Any, images: list) -> dict[str, torch.Tensor]:
    """One processor call per batch; only the tensors the encoder takes."""
    out = processor(images=images, return_tensors="pt")
    return {k: out[k] for k in ("pixel_values", "image_grid_thw") if k in out}


def set_qwen_pixels(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """A Qwen tower's processor takes the recipe's pixel budget (saved with the run, so predict agrees)."""
    if type(processor).__name__.startswith("Qwen"):
        processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


@torch.no_grad()
def feature_dim(encoder: Encoder, processor: Any) -> int:
    from PIL import Image

    device = next(encoder.parameters()).device
    inputs = process_images(processor, [Image.new("RGB", (224, 224), (128, 128, 128))])
    was = encoder.training
    encoder.eval()
    dim = encoder(**{k: v.to(device) for k, v in inputs.items()}).shape[-1]
    encoder.train(was)
    return int(dim)
