"""The classify route's backbones: any transformers vision encoder with an image processor, the vision
tower of a Qwen2-VL-family checkpoint, or a timm model (`timm/NAME` or a local timm folder), as one module
mapping processed images to one vector per image.

Pooled features are the model's pooler output where it has one (CLIP's projected-free CLS, SigLIP's
attention pool, DINOv2's CLS, ConvNeXt's pooled map, a timm model's `forward_head` without classifier),
else the mean of the last hidden states. For a Qwen2-VL-family tower the pooler output is the merger's
tokens (what the language model sees), averaged per image.

timm models load through transformers' `TimmWrapperModel` (built with `num_classes=0`) and
`TimmWrapperImageProcessor` (timm's `resolve_data_config` + `create_transform` over the model's own
`pretrained_cfg`): the same `AutoModel` / `AutoImageProcessor` calls, dtype handling and pooler output as
every other encoder here, so features, heads, LoRA, the trainer and predict need no timm branch.
What differs between the three kinds of backbone is the table KINDS.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtax.errors import VlmtaxError, first_line
from vlmtax.models.families import FAMILIES
from vlmtax.models.timm_backbone import check_timm_name, timm_name

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Kind:
    """What differs between kinds of classify backbone."""

    name: str
    # `lora.target: all-linear` wraps these module types (a timm convnet has no nn.Linear once its classifier
    # is gone: its 1x1 ungrouped convolutions, the pointwise layers, are its linear maps)
    lora_types: tuple[type, ...]
    channels_last: bool  # frozen extraction and predict in channels_last memory format (convolutions run faster)


KINDS = {k.name: k for k in (
    Kind("transformers", (nn.Linear,), False),
    Kind("qwen_tower", (nn.Linear,), False),  # sized by image.min_pixels/max_pixels (set_qwen_pixels)
    Kind("timm", (nn.Linear, nn.Conv2d), True),  # sized by image.size/crop_pct (resize_timm)
)}


class Encoder(nn.Module):
    """Processed images in, one pooled feature vector per image out."""

    def __init__(self, model: nn.Module, qwen_merge: int | None = None, kind: Kind = KINDS["transformers"]):
        super().__init__()
        self.model = model
        self.qwen_merge = qwen_merge  # spatial merge size of a Qwen tower; None for plain encoders
        self.kind = kind

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
    name = timm_name(source)
    if name is not None and not Path(source).exists():
        check_timm_name(name)  # an unknown timm/NAME fails here, with the nearest names, not at the hub


def kind_of(source: str | Path) -> Kind:
    """The backbone kind of a model folder or hub id (a Qwen tower is told apart when its config loads)."""
    return KINDS["timm"] if timm_name(str(source)) is not None else KINDS["transformers"]


@contextmanager
def _quiet_timm_load(source: str):
    """A timm folder keeps its ImageNet classifier (`vlmtax backbone import`'s sanity check needs it); the
    features model is built without one, and transformers would print a table of the two unused tensors."""
    if kind_of(source) is not KINDS["timm"]:
        yield
        return
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_image_processor(source: str | Path, trust_remote_code: bool = False) -> Any:
    """The backbone's image processor; a model without one cannot be a classify backbone."""
    from transformers import AutoConfig, AutoImageProcessor

    source = str(source)
    _check_source(source)
    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if kind_of(source) is KINDS["timm"]:
            raise VlmtaxError(f"cannot load timm backbone {source!r}: {first_line(exc)[:200]}",
                              "with no hub access, use a local timm folder (`vlmtax backbone import`, or a "
                              "downloaded timm/NAME repo: config.json + model.safetensors)") from None
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
            return Encoder(tower, qwen_merge=config.vision_config.spatial_merge_size, kind=KINDS["qwen_tower"])
        with _quiet_timm_load(source):
            model = AutoModel.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        first = first_line(exc)
        raise VlmtaxError(f"cannot load backbone {source!r}: {first[:200]}",
                          "use a local model folder (no hub access?) or check the hub id") from None
    # CLIPModel / SiglipModel hold a text tower too: keep the vision half only.
    return Encoder(model.vision_model if hasattr(model, "vision_model") else model, kind=kind_of(source))


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


def _is_timm_processor(processor: Any) -> bool:
    return hasattr(processor, "data_config") and hasattr(processor, "val_transforms")


def resize_timm(processor: Any, size: int | None, crop_pct: float | None = None) -> Any:
    """A timm processor at `size` px square (and `crop_pct`), all else from its pretrained_cfg; `size` None
    keeps the processor. Resizing any other processor is an error (`image.size` is a timm key)."""
    if size is None and crop_pct is None:
        return processor
    if not _is_timm_processor(processor):
        raise VlmtaxError(f"image.size / image.crop_pct set the input of timm backbones; this backbone's "
                          f"processor is {type(processor).__name__}", "leave image.size and image.crop_pct out")
    cfg = dict(processor.data_config)
    if size is not None:
        cfg["input_size"] = (3, size, size)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return type(processor)(pretrained_cfg=cfg, architecture=processor.architecture)


def save_processor(processor: Any, out: Path) -> None:
    """The processor into a run dir, where `load_image_processor(run dir)` finds it. transformers saves a timm
    processor only inside the model's config.json, so its resolved data config is written as the
    pretrained_cfg of a preprocessor_config.json here (a run dir holds no model config)."""
    if not _is_timm_processor(processor):
        processor.save_pretrained(str(out))
        return
    from vlmtax.fileio import write_json

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in processor.data_config.items()}
    write_json(out / PROCESSOR_FILE, {"image_processor_type": type(processor).__name__,
                                      "architecture": processor.architecture, "pretrained_cfg": cfg}, indent=1)


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
