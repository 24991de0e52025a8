"""bench/sft_cost.py: the cost model's FLOP split and byte counts on the tiny model, checked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import RECIPES, TINY_RECIPE

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sft_cost.py"


@pytest.fixture(scope="module")
def sft_cost():
    spec = importlib.util.spec_from_file_location("sft_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_recipe_figures_match_hand_counts(sft_cost, tiny_model_dir, tmp_path):
    out = tmp_path / "cost.json"
    [r] = sft_cost.main(["--recipe", str(TINY_RECIPE), "--json", str(out), "--prompt-tokens", "20",
                         "--answer-tokens", "6", f"model={tiny_model_dir}", "finetuning=lora", "freeze.vision=true",
                         "freeze.projector=true", "train.batch_size=2", "image.max_pixels=12544",
                         "train.gradient_checkpointing=true", "lora.rank=4", "lora.modules_to_save=[]"])
    assert json.loads(out.read_text())[0]["flops"] == r["flops"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    hidden, vocab, layers = text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]
    b, seq, answer = 2, r["tokens_per_record"], 6
    assert seq == 20 + r["image_tokens"] + answer
    # lm_head is frozen (tied): forward and the input gradient, 2 FLOPs a multiply-add each.
    assert r["flops"]["lm_head"] == 4 * b * answer * hidden * vocab
    assert r["levers"]["answer_only_logits"]["flops"] == 4 * b * (seq - 1 - answer) * hidden * vocab
    assert r["levers"]["answer_only_logits"]["bytes"] > 0
    assert r["flops"]["language_checkpointing_on"] > r["flops"]["language_checkpointing_off"]
    assert r["bytes"]["activations_checkpointing_on"] < r["bytes"]["activations_checkpointing_off"]
    assert r["flops"]["vision"] > 0 and r["levers"]["vision_cache"]["flops"] == r["flops"]["vision"]
    assert r["levers"]["vision_cache"]["applicable"] and r["levers"]["packing"]["applicable"]
    # LoRA rank 4 on the seven linear layers of every language layer, fp32.
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    dim, inter = hidden // heads, text["intermediate_size"]
    shapes = [(hidden, hidden), (hidden, kv * dim), (hidden, kv * dim), (hidden, hidden), (hidden, inter),
              (hidden, inter), (inter, hidden)]
    assert r["bytes"]["trainable"] == 4 * layers * sum(4 * (i + o) for i, o in shapes)
    assert r["peak_bytes"] > r["bytes"]["weights_language"] + r["bytes"]["weights_vision"]


def test_model_without_config_is_an_error(sft_cost):
    with pytest.raises(SystemExit, match="error: no config for someone/Unknown-VL"):
        sft_cost.main(["--recipe", str(RECIPES / "qwen2vl_2b.yaml"), "model=someone/Unknown-VL"])


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_newer_families_report_refused_levers_as_not_applicable(sft_cost, family_model_dirs, family, capsys):
    from vlmtax.models.families import FAMILIES

    [r] = sft_cost.main(["--recipe", str(TINY_RECIPE), "--prompt-tokens", "8", "--answer-tokens", "4",
                         f"model={family_model_dirs[family]}", "finetuning=lora", "freeze.vision=true",
                         "freeze.projector=true", "train.batch_size=1", "image.max_pixels=16384", "lora.rank=2",
                         "lora.modules_to_save=[]"])
    label = FAMILIES[family].label
    assert r["family"] == label and r["flops"]["vision"] > 0 and r["flops"]["language"] > 0
    # Neither lever is open to these families (families.py), so neither gets a saving.
    for name in ("vision_cache", "packing"):
        assert r["levers"][name]["applicable"] is False and r["levers"][name]["flops"] is None
    out = capsys.readouterr().out
    assert f"the vision cache: not applicable to {label}" in out and f"packing: not applicable to {label}" in out
