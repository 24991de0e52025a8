"""What differs between the supported VLM families, in one table: sft, merge, loading and decoding read it.

A new family is one `Family` entry here plus a tiny-model config in `tiny_model.py`. Module names are the
transformers 5 layouts (`model.language_model.layers.N...`, `model.visual.blocks.N...`, `model.visual.merger`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from vlmtax.errors import VlmtaxError

ATTENTION_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEAR = ("gate_proj", "up_proj", "down_proj")
# Qwen3.5's gated-delta-net (linear attention) projections. in_proj_a/in_proj_b are left out: they produce
# one gate value per head, too narrow for a rank-r adapter to help.
DELTANET_LINEAR = ("in_proj_qkv", "in_proj_z", "out_proj")


@dataclass(frozen=True)
class Family:
    """One model family (its `config.model_type`)."""

    name: str
    label: str  # as users write it
    language_linear: tuple[str, ...]  # LoRA targets of `lora.target: all-linear` in the language model
    vision_linear: tuple[str, ...]  # LoRA targets in the vision blocks (used when freeze.vision is false)
    projector: tuple[str, ...]  # modules mapping vision features into the language model (merger, DeepStack)
    liger_patch: str  # liger_kernel.transformers function that patches this family
    # Whether that patch's RoPE kernel replaces a function this family's attention really calls. liger 0.8 replaces
    # `apply_multimodal_rotary_pos_emb` for Qwen2-VL / Qwen2.5-VL, which transformers 5 no longer calls (the M-RoPE
    # sections are merged in the rotary embedding, then the plain `apply_rotary_pos_emb` runs), so it stays off
    # there; for Qwen3-VL it replaces `apply_rotary_pos_emb` and `apply_rotary_pos_emb_vision`, both called.
    liger_rope: bool
    tree_mask: bool  # every decoder layer is attention: candidates may sit side by side under a tree mask
    # train.cache_vision: the merged tower output is all the language model receives of an image (Qwen3-VL
    # also injects DeepStack features into early layers, which the cache does not hold)
    vision_cache: bool = False
    # train.packing: a block-diagonal mask and per-record M-RoPE keep packed records apart (a recurrent layer,
    # as in Qwen3.5, would carry state from one record into the next)
    packing: bool = False
    # The vision tower with its merger(s), as a module path of the loaded *ForConditionalGeneration. QLoRA keeps
    # it in 16 bits: transformers 5 matches a skip name only from the start or the end of the full module name
    # (quantizers_utils.should_convert_module), so the bare "visual" skipped nothing.
    tower: str = "model.visual"

    @property
    def projector_regex(self) -> str:
        """Module names of the projector: the merger itself and each DeepStack merger."""
        return r"(?:.*\.)?visual\.(?:" + "|".join(rf"{re.escape(p)}(?:\.\d+)?" for p in self.projector) + ")"

    def part(self, name: str) -> str:
        """language | vision | projector | other, for a parameter or module name."""
        if re.match(self.projector_regex + r"(?:\.|$)", name):
            return "projector"
        if ".visual." in f".{name}":
            return "vision"
        if ".language_model." in f".{name}":
            return "language"
        return "other"

    def rope_index(self, model: Any, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions (3, rows, length) of a left-padded prompt batch with images, and each row's offset
        of the next text position from its token count."""
        return model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                          image_grid_thw=enc["image_grid_thw"], attention_mask=enc["attention_mask"])

    @staticmethod
    def positions(text: torch.Tensor, mrope: torch.Tensor | None = None) -> torch.Tensor:
        """(3, rows, L) position_ids from (rows, L) text positions, or the M-RoPE ones. Qwen3.5 also takes a fourth,
        leading text row, used only to build its masks; without it the model builds them as in a plain forward."""
        return mrope if mrope is not None else text[None].expand(3, -1, -1)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2_vl", "Qwen2-VL", ATTENTION_LINEAR + MLP_LINEAR, ("qkv", "proj", "fc1", "fc2"), ("merger",),
           "apply_liger_kernel_to_qwen2_vl", False, True, vision_cache=True, packing=True),
    Family("qwen2_5_vl", "Qwen2.5-VL", ATTENTION_LINEAR + MLP_LINEAR, ("qkv", "proj") + MLP_LINEAR, ("merger",),
           "apply_liger_kernel_to_qwen2_5_vl", False, True, vision_cache=True, packing=True),
    Family("qwen3_vl", "Qwen3-VL", ATTENTION_LINEAR + MLP_LINEAR, ("qkv", "proj", "linear_fc1", "linear_fc2"),
           ("merger", "deepstack_merger_list"), "apply_liger_kernel_to_qwen3_vl", True, True),
    # Hybrid: three of every four layers are gated-delta-net recurrences, so no tree mask (decoding_rows.py).
    Family("qwen3_5", "Qwen3.5", ATTENTION_LINEAR + MLP_LINEAR + DELTANET_LINEAR,
           ("qkv", "proj", "linear_fc1", "linear_fc2"), ("merger",), "apply_liger_kernel_to_qwen3_5", False, False),
)}


def supported() -> str:
    return ", ".join(f"{f.name} ({f.label})" for f in FAMILIES.values())


def family_of(config_or_model: Any, where: str = "the model") -> Family:
    """The family of a config or model; an unsupported one is a one-line error listing the supported ones."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise VlmtaxError(f"{where} is of model type {model_type!r}, which vlmtax does not support",
                          f"use a model of a supported family: {supported()}")
    return FAMILIES[model_type]


def lora_target_regex(family: Family, names: tuple[str, ...] | None, vision: bool) -> str:
    """LoRA targets as one regex over module names: the language model's linear layers named `names` (None:
    the family's all-linear set), and the vision blocks' when `vision`. PEFT's own "all-linear" would
    silently hit the vision blocks and the projector."""
    names = family.language_linear if names is None else names
    parts = [rf".*language_model\..*\.(?:{'|'.join(map(re.escape, names))})"]
    if vision:
        parts.append(rf".*visual\.blocks\.\d+\..*\.(?:{'|'.join(map(re.escape, family.vision_linear))})")
    return "|".join(f"(?:{p})" for p in parts)


def projector_modules(family: Family, model: Any) -> list[str]:
    """Names of the projector modules in `model` (each DeepStack merger separately: PEFT saves a module whole
    but cannot wrap the ModuleList that holds them)."""
    pattern = re.compile(family.projector_regex)
    return [n for n, m in model.named_modules() if pattern.fullmatch(n) and not isinstance(m, torch.nn.ModuleList)]


def wrapped_counts(family: Family, model: Any) -> dict[str, int]:
    """LoRA-wrapped linear layers per part, plus the modules trained whole (modules_to_save) per part."""
    counts = {"language": 0, "vision": 0, "projector": 0}
    whole: dict[str, int] = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        part = family.part(name)
        if hasattr(module, "lora_A") and part in counts:
            counts[part] += 1
        elif type(module).__name__ == "ModulesToSaveWrapper":
            whole[part] = whole.get(part, 0) + 1
    return {**counts, **{f"{part} whole": n for part, n in whole.items()}}


def trainable_counts(family: Family, model: Any) -> dict[str, int]:
    """Trainable parameter tensors per part (full fine-tuning)."""
    counts = {"language": 0, "vision": 0, "projector": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[family.part(name)] += 1
    return counts
