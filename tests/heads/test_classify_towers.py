"""The classify route on each VLM family's real tower layout (tiny models mirror the checkpoints)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import FAMILIES, RECIPES, tiny_overrides

from vlmtax.heads.train import lora_encoder
from vlmtax.models.backbone import load_encoder
from vlmtax.train.recipe import load_recipe


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
    from vlmtax.models.loading import Hardware
    from vlmtax.sft import train

    seen = []

    class Placed(Exception):
        pass

    def record(recipe, data, precision, device=None):
        seen.append(device)
        raise Placed

    monkeypatch.setattr("vlmtax.heads.train.build_classifier", record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    recipe = load_recipe(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(tiny_clip_dir, prepared_dir, tmp_path / "o"))
    with pytest.raises(Placed):
        train(recipe, Hardware(cuda=True, bf16_ok=True))
    assert seen == [torch.device("cuda", 1)]


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_predict_runs_the_backbone_in_the_training_precision(mode, tiny_clip_dir, tmp_path, monkeypatch):
    """A run trained in bf16 on an A100, predicted there: a frozen backbone extracts in bf16 as it did for the
    features the heads learnt from; a trained one is fp32 weights under bf16 autocast, as in training."""
    import json

    from vlmtax.heads.predictor import HeadsPredictor
    from vlmtax.heads.train import encoder_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    run = tmp_path / "run"
    run.mkdir()
    layout = [{"category": "A", "attribute": "color", "slot": 0, "values": ["red", "blue"]}]
    (run / "classifier.json").write_text(json.dumps({"backbone": str(tiny_clip_dir), "mode": mode, "kind": "mlp",
                                                     "trained_backbone": mode != "frozen", "layout": layout}))
    (run / "vlmtax_meta.json").write_text(json.dumps({"precision": "bf16"}))
    shutil.copy(tiny_clip_dir / "preprocessor_config.json", run)
    seen = []

    class Loaded(Exception):
        pass

    def record(source, dtype=torch.float32, trust_remote_code=False):
        seen.append(dtype)
        raise Loaded

    monkeypatch.setattr("vlmtax.heads.predictor.load_encoder", record)
    monkeypatch.setattr("vlmtax.heads.predictor.layout_matches", lambda layout, taxonomy: None)
    recipe = load_recipe(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(tiny_clip_dir, tmp_path, tmp_path / "o",
                                                                          f"heads.mode={mode}"))
    with pytest.raises(Loaded):
        HeadsPredictor(run, None, device="cuda:0")  # the taxonomy check is stubbed above
    assert seen == [encoder_dtype(recipe, "bf16")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vlm_backbone_loads_its_tower_alone(family, family_model_dirs, monkeypatch):
    """The tower's weights, bit for bit, without the language model ever being built from the checkpoint."""
    from transformers import AutoModelForImageTextToText

    model = family_model_dirs[family]
    vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.bfloat16)
    want = vlm.model.visual.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("the whole VLM was loaded for its tower")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)
    tower = load_encoder(model, torch.bfloat16).model
    got = tower.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sum(p.numel() for p in tower.parameters()) < sum(p.numel() for p in vlm.parameters()) / 2
