"""QLoRA on the CPU: the 4-bit config that sft builds, checked with transformers' own skip rule on each family's
real module names, and what prepare_model leaves in 16 bits (bitsandbytes itself needs a CUDA GPU)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, TINY_RECIPE, tiny_overrides
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from vlmtax.generate.model import load_model, prepare_model, skeleton
from vlmtax.train.recipe import load_recipe


def _recipe(model, tmp_path, *extra):
    return load_recipe(TINY_RECIPE, tiny_overrides(model, tmp_path / "data", tmp_path / "run", *extra))


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_quantises_the_language_model_only(family, family_model_dirs, tmp_path, monkeypatch):
    seen = {}

    def fake_load(source, dtype, what="model", trust_remote_code=False, **extra):
        seen.update(extra)
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=family))

    monkeypatch.setattr("vlmtax.generate.model.load_weights", fake_load)
    recipe = _recipe(family_model_dirs[family], tmp_path, "quantization=4bit", "finetuning=lora")
    load_model(recipe, "fp16")
    model = skeleton(recipe)  # the real module names, as the quantizer walks them
    config = seen["quantization_config"]
    skip = HfQuantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                                  model._keep_in_fp32_modules)
    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    converted = {n for n in linear if should_convert_module(n, skip)}
    tower = [n for n in linear if n.startswith("model.visual.")]
    assert tower and not converted & set(tower), sorted(converted & set(tower))[:3]
    assert any("merger" in n for n in tower)
    assert "lm_head" not in converted
    assert {n for n in linear if ".language_model." in n} <= converted


def test_qlora_upcasts_only_what_trains(tiny_model_dir, tmp_path):
    """prepare_model_for_kbit_training upcast every 16-bit tensor (embeddings, tower, norms) to fp32."""
    recipe = _recipe(tiny_model_dir, tmp_path, "finetuning=lora", "freeze.projector=true")
    model, _ = load_model(recipe, "bf16")  # the 16-bit parts a 4-bit load keeps (bitsandbytes needs CUDA)
    model = prepare_model(model, recipe.model_copy(update={"quantization": "4bit"}), "bf16")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}, {n: d for n, d in frozen.items() if d != torch.bfloat16}


def _gpu_check():
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_finds_a_4bit_tower(tiny_model_dir, tmp_path):
    """make gpu-check's QLoRA stage (bitsandbytes needs CUDA): its check run on the module classes a 4-bit load
    would give, converted by transformers' own rule, with sft's skip list and with the bare names it once had."""
    from vlmtax.generate.model import quantization_config
    from vlmtax.models.families import family_of

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes.nn.Linear4bit
        pass

    recipe = _recipe(tiny_model_dir, tmp_path, "quantization=4bit", "finetuning=lora")
    found = {}
    for label, skip in (("sft", None), ("bare names", ["visual", "lm_head"])):
        model = skeleton(recipe)
        if skip is None:
            skip = quantization_config(recipe, torch.float16, family_of(model)).llm_int8_skip_modules
        skip = HfQuantizer.get_modules_to_not_convert(model, skip, model._keep_in_fp32_modules)
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and should_convert_module(name, skip):
                module.__class__ = Linear4bit
        found[label] = _gpu_check().quantised_tower_linears(model, Linear4bit)
    in_tower, in_language, tower = found["sft"]
    assert not in_tower and in_language and any(".merger." in n for n in tower)
    assert found["bare names"][0]  # the check fails on the skip list that quantised the tower
