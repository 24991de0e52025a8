"""recipe: schema validation, overrides, shipped recipes, GPU-only features configured but refused on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vlmtax.errors import VlmtaxError
from vlmtax.generate.model import check_gpu_features, lora_config, lora_target_regex, quantization_config
from vlmtax.models.families import FAMILIES, family_of
from vlmtax.models.loading import Hardware
from vlmtax.train.recipe import load_recipe
from vlmtax.train.run import resolve_precision
from vlmtax.train.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
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
    with pytest.raises(VlmtaxError, match="flash_attention_2 needs a CUDA GPU.*attn_implementation=sdpa"):
        check_gpu_features(_recipe(attn_implementation="flash_attention_2"), CPU)
    with pytest.raises(VlmtaxError, match="fp16 or bf16 only"):
        check_gpu_features(_recipe(attn_implementation="flash_attention_2", precision="fp32"), A100)


def test_flash_attention_without_the_package_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_flash(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flash)
    with pytest.raises(VlmtaxError, match="flash_attn is not installed.*pip install flash-attn"):
        check_gpu_features(_recipe(attn_implementation="flash_attention_2"), A100)


def test_attn_implementation_is_checked():
    assert _recipe().attn_implementation == "sdpa"
    with pytest.raises(VlmtaxError, match="attn_implementation"):
        load_recipe(RECIPES[0], ["attn_implementation=flash"])


def test_qlora_config_that_would_be_passed_to_bitsandbytes():
    cfg = quantization_config(_recipe(quantization="4bit"), torch.float16, FAMILIES["qwen2_vl"])
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    assert r"model\.visual" in cfg.llm_int8_skip_modules and "lm_head" in cfg.llm_int8_skip_modules
    assert quantization_config(_recipe(quantization="8bit"), torch.float16, FAMILIES["qwen2_vl"]).load_in_8bit
    assert quantization_config(_recipe(), torch.float16, FAMILIES["qwen2_vl"]) is None


def test_lora_targets_never_hit_vision_blocks_unless_unfrozen():
    qwen2 = FAMILIES["qwen2_vl"]
    lang = "model.language_model.layers.0.self_attn.q_proj"
    mlp = "model.language_model.layers.1.mlp.down_proj"
    vis = "model.visual.blocks.0.attn.qkv"
    merger = "model.visual.merger.mlp.0"
    frozen = lora_target_regex(_recipe(), qwen2)
    assert re.fullmatch(frozen, lang) and re.fullmatch(frozen, mlp)
    assert not re.fullmatch(frozen, vis) and not re.fullmatch(frozen, merger) and not re.fullmatch(frozen, "lm_head")
    open_ = lora_target_regex(_recipe(freeze={"vision": False}), qwen2)
    assert re.fullmatch(open_, vis) and re.fullmatch(open_, "model.visual.blocks.1.mlp.fc2")
    only_q = lora_target_regex(_recipe(lora={"target": ["q_proj"]}), qwen2)
    assert re.fullmatch(only_q, lang) and not re.fullmatch(only_q, mlp)


@pytest.mark.parametrize(("family", "vision_mlp", "language_extra"), [
    ("qwen2_5_vl", ("gate_proj", "up_proj", "down_proj"), ()),
    ("qwen3_vl", ("linear_fc1", "linear_fc2"), ()),
    ("qwen3_5", ("linear_fc1", "linear_fc2"), ("linear_attn.in_proj_qkv", "linear_attn.out_proj")),
])
def test_each_family_targets_its_own_module_names(family, vision_mlp, language_extra):
    fam = FAMILIES[family]
    frozen = lora_target_regex(_recipe(), fam)
    open_ = lora_target_regex(_recipe(freeze={"vision": False}), fam)
    for leaf in vision_mlp:  # the vision MLP is hit only when the vision tower trains
        assert re.fullmatch(open_, f"model.visual.blocks.3.mlp.{leaf}")
        assert not re.fullmatch(frozen, f"model.visual.blocks.3.mlp.{leaf}")
    for leaf in language_extra:
        assert re.fullmatch(frozen, f"model.language_model.layers.0.{leaf}")
    for projector in ("model.visual.merger.linear_fc1", "model.visual.deepstack_merger_list.0.linear_fc2"):
        assert not re.fullmatch(open_, projector)
    if family == "qwen3_vl":  # DeepStack mergers are projector: frozen and trained with it
        assert fam.part("model.visual.deepstack_merger_list.1.norm.weight") == "projector"
    assert fam.part("model.visual.merger.linear_fc1.weight") == "projector"
    assert fam.part("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert fam.part("model.language_model.layers.0.mlp.up_proj.weight") == "language"


def test_an_unsupported_family_is_a_one_line_error_listing_the_supported_ones():
    from transformers import LlavaConfig

    with pytest.raises(VlmtaxError, match="model type 'llava'.*does not support") as err:
        family_of(LlavaConfig())
    assert all(name in err.value.fix for name in FAMILIES)


def skeleton(family: str):
    """The family's tiny architecture on the meta device: module names without weights or a tokenizer."""
    from transformers import AutoModelForImageTextToText

    from vlmtax.models.tiny_families import TINY_FAMILIES
    from vlmtax.models.tiny_model import SPECIAL_TOKENS

    config = TINY_FAMILIES[family].config({t: i for i, t in enumerate(SPECIAL_TOKENS)}, 256)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize(("family", "projector"), [("qwen2_vl", {"merger"}), ("qwen2_5_vl", {"merger"}),
                                                  ("qwen3_vl", {"merger", "deepstack_merger_list.0"}),
                                                  ("qwen3_5", {"merger"})])
def test_lora_config_trains_projector_when_unfrozen(family, projector):
    model = skeleton(family)
    cfg = lora_config(_recipe(freeze={"projector": False}, lora={"modules_to_save": ["lm_head"], "rank": 4}), model)
    assert set(cfg.modules_to_save) == {"lm_head", *projector} and cfg.r == 4
    assert lora_config(_recipe(lora={"modules_to_save": []}), model).modules_to_save is None
