"""The classify route on each VLM family's real tower layout (tiny models mirror the checkpoints)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, RECIPES, tiny_overrides

from vlmtax.backbone import load_encoder
from vlmtax.classify import lora_encoder
from vlmtax.recipe import load_recipe


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_mode_wraps_every_linear_of_a_vlm_tower(family, family_model_dirs, tmp_path):
    """all-linear once became leaf names; the merger's Sequential gave "0" and "2", which hit `blocks.0`."""
    model = family_model_dirs[family]
    recipe = load_recipe(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(model, tmp_path, tmp_path / "o",
                                                                           "heads.mode=lora"))
    encoder = load_encoder(model)
    linear = {n for n, m in encoder.model.named_modules() if type(m) is torch.nn.Linear}
    wrapped = lora_encoder(encoder, recipe)
    lora = {n.removeprefix("base_model.model.") for n, m in wrapped.model.named_modules() if hasattr(m, "lora_A")}
    assert lora == linear


def test_each_classify_rank_puts_its_backbone_on_its_own_gpu(tiny_clip_dir, prepared_dir, tmp_path, monkeypatch):
    """Rank 1 of a launched run (LOCAL_RANK=1) on a 2-GPU machine: its backbone goes to cuda:1, not cuda:0."""
    from vlmtax.loading import Hardware
    from vlmtax.sft import train

    seen = []

    class Placed(Exception):
        pass

    def record(recipe, data, precision, device=None):
        seen.append(device)
        raise Placed

    monkeypatch.setattr("vlmtax.classify.build_classifier", record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    recipe = load_recipe(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(tiny_clip_dir, prepared_dir, tmp_path / "o"))
    with pytest.raises(Placed):
        train(recipe, Hardware(cuda=True, bf16_ok=True))
    assert seen == [torch.device("cuda", 1)]
