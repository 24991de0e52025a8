"""train.extra: SFTConfig's own arguments through the recipe, each key checked against SFTConfig's fields."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_RECIPE, tiny_overrides

from vlmtax.errors import VlmtaxError
from vlmtax.generate.trainer import training_args
from vlmtax.train.recipe import load_recipe


def _recipe(tmp_path: Path, *extra: str):
    return load_recipe(TINY_RECIPE, tiny_overrides(tmp_path / "model", tmp_path / "data", tmp_path / "run", *extra))


def test_report_to_and_optim_reach_sft_config(tmp_path):
    recipe = _recipe(tmp_path, "train.extra.report_to=[mlflow]", "train.extra.optim=sgd", "lora.plus_ratio=null",
                     "train.extra.dataloader_drop_last=true")
    args = training_args(recipe, "fp32", has_eval=True)
    assert args.report_to == ["mlflow"]
    assert args.optim == "sgd"
    assert args.dataloader_drop_last is True
    plain = training_args(_recipe(tmp_path), "fp32", has_eval=True)
    assert plain.report_to in ([], "none", ["none"]) and plain.optim != "sgd" and plain.dataloader_drop_last is False


def test_report_to_adds_to_log_tensorboard(tmp_path):
    recipe = _recipe(tmp_path, "log.tensorboard=true", "train.extra.report_to=wandb")
    assert training_args(recipe, "fp32", has_eval=True).report_to == ["tensorboard", "wandb"]


def test_unknown_key_suggests_the_closest_field(tmp_path):
    with pytest.raises(VlmtaxError, match=r"train.extra.optimizer is not an SFTConfig argument.*did you mean optim\?"):
        _recipe(tmp_path, "train.extra.optimizer=sgd")
    with pytest.raises(VlmtaxError, match="report_to"):
        _recipe(tmp_path, "train.extra.reportto=[wandb]")


@pytest.mark.parametrize("key,owner", [("learning_rate", "train.lr"), ("num_train_epochs", "train.epochs"),
                                       ("bf16", "precision"), ("per_device_eval_batch_size", "train.batch_size"),
                                       ("dataloader_num_workers", "train.num_workers")])
def test_a_key_the_recipe_owns_is_refused_naming_the_recipe_field(tmp_path, key, owner):
    with pytest.raises(VlmtaxError, match=rf"train.extra.{key} is set by the recipe.*use the recipe key {owner}"):
        _recipe(tmp_path, f"train.extra.{key}=1")


def test_keys_vlmtax_relies_on_are_refused(tmp_path):
    with pytest.raises(VlmtaxError, match="fixed by vlmtax"):
        _recipe(tmp_path, "train.extra.remove_unused_columns=true")


def test_optim_with_loraplus_is_refused(tmp_path):
    with pytest.raises(VlmtaxError, match="lora.plus_ratio: null"):
        _recipe(tmp_path, "finetuning=lora", "lora.plus_ratio=16", "train.extra.optim=sgd")


def test_a_value_sft_config_refuses_is_a_one_line_error(tiny_model_dir, prepared_dir, tmp_path):
    from vlmtax.sft import sft

    overrides = tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "lora.plus_ratio=null",
                               "train.extra.optim=no_such_optimizer", "train.max_steps=1")
    with pytest.raises(VlmtaxError, match="SFTConfig refused the training arguments"):
        sft(TINY_RECIPE, overrides)


def test_optim_is_the_optimizer_the_trainer_builds(tiny_model_dir, prepared_dir, tmp_path):
    import torch

    from vlmtax.generate.model import load_model, prepare_model
    from vlmtax.generate.trainer import build_trainer

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run",
                                                     "lora.plus_ratio=null", "train.extra.optim=sgd"))
    model, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
    assert isinstance(trainer.create_optimizer(), torch.optim.SGD)
