"""recipe: schema validation, overrides, shipped recipes, GPU-only features configured but refused on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vlmtax.errors import VlmtaxError
from vlmtax.loading import Hardware
from vlmtax.recipe import Recipe, load_recipe
from vlmtax.sft import (
    check_gpu_features,
    lora_config,
    lora_target_regex,
    quantization_config,
    resolve_precision,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
CPU, A100 = Hardware(cuda=False, bf16_ok=False), Hardware(True, True)


def _recipe(**kw) -> Recipe:
    return Recipe.model_validate({"model": "m", "data": "d", "output_dir": "o", **kw})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.output_dir and recipe.data
    assert path.read_text().lstrip().startswith("#"), "each recipe opens with a comment saying what it is for"


def test_overrides_are_typed_and_nested(tmp_path: Path):
    recipe = load_recipe(RECIPES[0], ["train.epochs=1", "lora.rank=8", "quantization=null", "lora.target=[q_proj]"])
    assert recipe.train.epochs == 1 and recipe.lora.rank == 8 and recipe.quantization is None
    assert recipe.lora.target == ["q_proj"]


def test_unknown_key_suggests_the_closest(tmp_path: Path):
    with pytest.raises(VlmtaxError, match=r"unknown recipe key 'train.epoch'.*train.epochs"):
        load_recipe(RECIPES[0], ["train.epoch=1"])
    with pytest.raises(VlmtaxError, match=r"unknown recipe key 'lora_rank'"):
        load_recipe(RECIPES[0], ["lora_rank=1"])
    with pytest.raises(VlmtaxError, match="bad override"):
        load_recipe(RECIPES[0], ["train.epochs"])


def test_malformed_and_missing_recipes(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(VlmtaxError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(VlmtaxError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    partial = tmp_path / "partial.yaml"
    partial.write_text("data: d\noutput_dir: o\n")
    with pytest.raises(VlmtaxError, match="'model' is required"):
        load_recipe(partial)
    with pytest.raises(VlmtaxError, match="precision"):
        load_recipe(RECIPES[0], ["precision=fp8"])


def test_precision_resolution_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(_recipe(), Hardware.detect()) == "fp32"
    with pytest.raises(VlmtaxError, match="CUDA"):
        resolve_precision(_recipe(precision="fp16"), Hardware.detect())


def test_gpu_features_are_refused_on_cpu_with_a_fix():
    with pytest.raises(VlmtaxError, match="quantization=4bit.*CUDA"):
        check_gpu_features(_recipe(quantization="4bit"), CPU)
    with pytest.raises(VlmtaxError, match="liger"):
        check_gpu_features(_recipe(train={"liger": True}), CPU)
    with pytest.raises(VlmtaxError, match="full"):
        check_gpu_features(_recipe(quantization="4bit", finetuning="full"), A100)


def test_qlora_config_that_would_be_passed_to_bitsandbytes():
    cfg = quantization_config(_recipe(quantization="4bit"), torch.float16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    assert "visual" in cfg.llm_int8_skip_modules and "lm_head" in cfg.llm_int8_skip_modules
    assert quantization_config(_recipe(quantization="8bit"), torch.float16).load_in_8bit
    assert quantization_config(_recipe(), torch.float16) is None


def test_lora_targets_never_hit_vision_blocks_unless_unfrozen():
    lang = "model.language_model.layers.0.self_attn.q_proj"
    mlp = "model.language_model.layers.1.mlp.down_proj"
    vis = "model.visual.blocks.0.attn.qkv"
    merger = "model.visual.merger.mlp.0"
    frozen = lora_target_regex(_recipe())
    assert re.fullmatch(frozen, lang) and re.fullmatch(frozen, mlp)
    assert not re.fullmatch(frozen, vis) and not re.fullmatch(frozen, merger) and not re.fullmatch(frozen, "lm_head")
    open_ = lora_target_regex(_recipe(freeze={"vision": False}))
    assert re.fullmatch(open_, vis) and re.fullmatch(open_, "model.visual.blocks.1.mlp.fc2")
    for qwen25 in ("gate_proj", "up_proj", "down_proj"):  # Qwen2.5-VL's vision MLP
        assert re.fullmatch(open_, f"model.visual.blocks.3.mlp.{qwen25}")
        assert not re.fullmatch(frozen, f"model.visual.blocks.3.mlp.{qwen25}")
    only_q = lora_target_regex(_recipe(lora={"target": ["q_proj"]}))
    assert re.fullmatch(only_q, lang) and not re.fullmatch(only_q, mlp)


def test_lora_config_trains_projector_when_unfrozen():
    cfg = lora_config(_recipe(freeze={"projector": False}, lora={"modules_to_save": ["lm_head"], "rank": 4}))
    assert set(cfg.modules_to_save) == {"lm_head", "merger"} and cfg.r == 4
