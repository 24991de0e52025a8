"""What FSDP changes in the Trainer, reached on the CPU: accelerate ignores its FSDP plugin on a CPU-only
process, so the Trainer's own flag is set as accelerate sets it on GPUs (`state.fsdp_plugin is not None`)."""

from __future__ import annotations

import pytest
import torch
from conftest import RECIPES, TINY_RECIPE, tiny_overrides
from transformers import Trainer

from vlmtax.train.recipe import load_recipe


@pytest.fixture
def fsdp_on(monkeypatch):
    original = Trainer.create_accelerator_and_postprocess

    def with_fsdp(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_fsdp)


def test_generate_route_builds_its_lora_plus_optimizer_under_fsdp(fsdp_on, tiny_model_dir, prepared_dir, tmp_path):
    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import build_trainer

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora",
                                                     "lora.plus_ratio=16", "train.lr=0.001", "train.eval=false"))
    model, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
    assert trainer.is_fsdp_enabled and trainer.optimizer is None  # nothing passed in: the Trainer allows it
    optimizer = trainer.create_optimizer()
    assert {0.001, 0.016} <= {round(g["lr"], 6) for g in optimizer.param_groups}  # LoRA+: B at 16x A


def test_classify_route_builds_its_optimizer_under_fsdp(fsdp_on, tiny_clip_dir, prepared_dir, tmp_path):
    from vlmtax.heads.data import load_classify_data
    from vlmtax.heads.train import build_classifier
    from vlmtax.heads.trainer import build_heads_trainer

    recipe = load_recipe(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(
        tiny_clip_dir, prepared_dir, tmp_path / "run", "heads.mode=full", "train.lr=0.01", "heads.backbone_lr=0.001",
        "train.eval=false"))
    data = load_classify_data(prepared_dir)
    model, processor, _, encoder = build_classifier(recipe, data, "fp32")
    trainer = build_heads_trainer(recipe, model, data, encoder, processor, "fp32")
    assert trainer.is_fsdp_enabled and trainer.optimizer is None
    optimizer = trainer.create_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.001]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.fixture
def lora_trainer(fsdp_on, tiny_model_dir, prepared_dir, tmp_path):
    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import build_trainer

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora",
                                                     "train.eval=false"))
    model, processor = load_model(recipe, "fp32")
    return recipe, processor, build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")


def test_sharded_state_dict_config_still_saves_the_weights(lora_trainer, monkeypatch):
    """recipes/accelerate/fsdp.yaml keeps SHARDED_STATE_DICT for its checkpoints; the run dir gets whole weights."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from vlmtax.generate.train import save_run

    recipe, processor, trainer = lora_trainer
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)
    save_run(trainer, recipe, processor, "fp32")
    out = recipe.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "vlmtax_meta.json").is_file()


def test_a_run_without_weights_is_never_marked_finished(lora_trainer, monkeypatch):
    from vlmtax.errors import VlmtaxError
    from vlmtax.generate.train import save_run

    recipe, processor, trainer = lora_trainer
    monkeypatch.setattr(trainer, "save_model", lambda output_dir=None: None)  # what a sharded save wrote
    with pytest.raises(VlmtaxError, match="saved no weights"):
        save_run(trainer, recipe, processor, "fp32")
    assert not (recipe.output_dir / "vlmtax_meta.json").exists()


def test_vision_cache_prepass_runs_on_the_ranks_device(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    """Under DeepSpeed or FSDP the Trainer leaves the model where it was loaded (the CPU); the pre-pass must still
    encode on the rank's device (cuda:1 here, mocked), where its tower visits for the pass."""
    import contextlib
    import types

    from vlmtax.data.records import load_records
    from vlmtax.generate import vision_cache
    from vlmtax.generate.model import load_model, prepare_model

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "finetuning=lora",
                                                     "freeze.vision=true", "freeze.projector=true"))
    model, processor = load_model(recipe, "fp32")
    model = prepare_model(model, recipe, "fp32")
    rank1 = torch.device("cuda", 1)
    acc = types.SimpleNamespace(device=rank1, process_index=1, num_processes=2, mixed_precision="bf16",
                                autocast=contextlib.nullcontext, wait_for_everyone=lambda: None)
    seen = []
    monkeypatch.setattr(vision_cache.VisionCache, "fill", lambda self, *args: seen.append(args[-1]))
    trainer = types.SimpleNamespace(model=model, accelerator=acc)
    assert vision_cache.setup(trainer, recipe, processor, load_records(prepared_dir, "train.json")[:4]) is not None
    assert seen == [rank1] and next(model.parameters()).device.type == "cpu"


def test_fill_takes_the_tower_to_the_device_and_back(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    """The pre-pass on a device the model is not on: the tower moves there, the pixels follow, and the tower goes
    home afterwards, error or not ("meta" stands in for a GPU on a CPU-only machine)."""
    import contextlib

    from vlmtax.generate import vision_cache
    from vlmtax.models.loading import load_processor, load_weights

    model = load_weights(tiny_model_dir, torch.float32)
    tower = vision_cache.vision_tower(model)
    moves, seen = [], []

    class Encoded(Exception):
        pass

    def encode(pixels, grid):
        seen.append(pixels.device)
        raise Encoded

    monkeypatch.setattr(tower, "to", lambda device: moves.append(torch.device(device)) or tower)
    monkeypatch.setattr(model, "get_image_features", encode)
    image = str(next((synth_dir / "test_images").glob("*.jpg")))
    cache = vision_cache.VisionCache(tmp_path, "key")
    with pytest.raises(Encoded):
        cache.fill(model, load_processor(tiny_model_dir), [image], 1, contextlib.nullcontext, torch.device("meta"))
    assert moves == [torch.device("meta"), torch.device("cpu")] and seen == [torch.device("meta")]
