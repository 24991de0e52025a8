"""The family table's `liger_rope` against transformers' own modeling modules: the RoPE kernel is asked for only
where the function liger replaces is one the family's attention calls."""

from __future__ import annotations

import importlib
import inspect

import pytest

from vlmtax.models.families import FAMILIES

# What liger-kernel 0.8's apply_liger_kernel_to_<family>(rope=True) assigns in transformers' modeling module
# (liger_kernel/transformers/monkey_patch.py); Qwen3.5's patch refuses rope=True.
LIGER_ROPE_TARGETS = {"qwen2_vl": ["apply_multimodal_rotary_pos_emb"],
                      "qwen2_5_vl": ["apply_multimodal_rotary_pos_emb"],
                      "qwen3_vl": ["apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"],
                      "qwen3_5": []}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_liger_rope_only_where_the_patched_function_is_called(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    source = inspect.getsource(module)
    called = [name for name in LIGER_ROPE_TARGETS[family] if f" {name}(" in source and hasattr(module, name)]
    assert FAMILIES[family].liger_rope == bool(called) and called == (LIGER_ROPE_TARGETS[family] if called else [])
