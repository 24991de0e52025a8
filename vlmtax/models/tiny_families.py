"""Per-family parts of the tiny model (`tiny_model.py`): config layout, processor classes, chat template.

Each builder mirrors the smallest real checkpoint of its family (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B,
Qwen3.5's small multimodal ones) at toy sizes: the same config classes and fields, the same vision layout
(window attention, DeepStack mergers, gated-delta-net layers), the same processor classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmtax.models.tiny_templates import QWEN2_VL_TEMPLATE, QWEN3_5_TEMPLATE, QWEN3_VL_TEMPLATE

# Qwen2's pre-tokenizer split (Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizer.json). transformers 5 rebuilds
# the tokenizer backend from vocab + merges with this exact regex on load, so training must use it too.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's (tokenization_qwen3_5.py): combining marks join letters.
QWEN3_5_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Qwen2-VL-2B-Instruct's preprocessor_config.json pixel budget (CLIP mean/std are the class defaults).
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
# Qwen3-VL's (16-pixel patches, mean/std 0.5).
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 65536, 16777216


@dataclass(frozen=True)
class TinyFamily:
    name: str
    label: str
    split_regex: str
    tokenizer_class: str
    chat_template: str
    config: Callable[[dict[str, int], int], Any]  # (special token ids, vocab size) -> config
    processor: Callable[[Any], Any]  # tokenizer -> processor


def _text(vocab_size: int, ids: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                   rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]), **extra}


def _tokens(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen2_vl_config(ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen2-VL-2B at toy sizes: head_dim 16 -> 8 rotary frequencies, split over (t, h, w) like [16, 24, 24]."""
    from transformers import Qwen2VLConfig

    text = _text(vocab_size, ids, use_sliding_window=False, max_window_layers=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=4, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_tokens(ids))


def qwen2_5_vl_config(ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen2.5-VL-3B at toy sizes: SwiGLU vision MLP (gate/up/down_proj), window attention with one
    full-attention block, RMSNorm, tied embeddings (the 3B ties them)."""
    from transformers import Qwen2_5_VLConfig

    text = _text(vocab_size, ids, use_sliding_window=False, max_window_layers=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu",
                  window_size=112, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_tokens(ids))


def qwen3_vl_config(ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen3-VL-2B at toy sizes: interleaved M-RoPE, q/k norms, 16-pixel patches with learned position
    embeddings, a DeepStack merger feeding vision features into an early language layer."""
    from transformers import Qwen3VLConfig

    text = _text(vocab_size, ids, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_tokens(ids))


def qwen3_5_config(ids: dict[str, int], vocab_size: int) -> Any:
    """Qwen3.5 at toy sizes: four layers, three gated-delta-net (linear attention) and one full attention (its
    1-in-4 pattern), gated attention output, partial interleaved M-RoPE (a quarter of each head rotates)."""
    from transformers import Qwen3_5Config

    text = _text(vocab_size, ids, num_hidden_layers=4, head_dim=32, linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 layer_types=["linear_attention"] * 3 + ["full_attention"],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [2, 1, 1],
                                  "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                  num_position_embeddings=64)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True, **_tokens(ids))


def _qwen2_processor(cls_name: str, template: str) -> Callable[[Any], Any]:
    def build(tokenizer: Any) -> Any:
        import transformers
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
        image = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
        return getattr(transformers, cls_name)(image_processor=image, tokenizer=tokenizer,
                                               video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    return build


def _qwen3_processor(template: str) -> Callable[[Any], Any]:
    def build(tokenizer: Any) -> Any:
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        size = {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}
        image = Qwen2VLImageProcessor(size=size, patch_size=16, temporal_patch_size=2, merge_size=2,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                chat_template=template)
    return build


TINY_FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily("qwen2_vl", "Qwen2-VL", QWEN2_SPLIT, "Qwen2Tokenizer", QWEN2_VL_TEMPLATE, qwen2_vl_config,
               _qwen2_processor("Qwen2VLProcessor", QWEN2_VL_TEMPLATE)),
    # Qwen2.5-VL-3B-Instruct ships Qwen2-VL's chat template unchanged.
    TinyFamily("qwen2_5_vl", "Qwen2.5-VL", QWEN2_SPLIT, "Qwen2Tokenizer", QWEN2_VL_TEMPLATE, qwen2_5_vl_config,
               _qwen2_processor("Qwen2_5_VLProcessor", QWEN2_VL_TEMPLATE)),
    TinyFamily("qwen3_vl", "Qwen3-VL", QWEN2_SPLIT, "Qwen2Tokenizer", QWEN3_VL_TEMPLATE, qwen3_vl_config,
               _qwen3_processor(QWEN3_VL_TEMPLATE)),
    TinyFamily("qwen3_5", "Qwen3.5", QWEN3_5_SPLIT, "Qwen3_5Tokenizer", QWEN3_5_TEMPLATE, qwen3_5_config,
               _qwen3_processor(QWEN3_5_TEMPLATE)),
)}
