"""vision_cache: cached features give the same step as the pixels, each image is encoded once, fallbacks."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, tiny_overrides

from vlmtax.errors import VlmtaxError
from vlmtax.generate import vision_cache
from vlmtax.generate.model import load_model, prepare_model
from vlmtax.generate.trainer import build_trainer
from vlmtax.train.recipe import load_recipe

FROZEN = ("finetuning=lora", "freeze.vision=true", "freeze.projector=true", "train.eval=false")


@pytest.fixture(scope="module")
def cached_trainer(tiny_model_dir, prepared_dir, tmp_path_factory):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir,
                                                     tmp_path_factory.mktemp("vc") / "run", *FROZEN))
    assert recipe.train.cache_vision is None  # the default: on because both are frozen
    model, processor = load_model(recipe, "fp32")
    trainer = build_trainer(recipe, prepare_model(model, recipe, "fp32"), processor, "fp32")
    return trainer, recipe, processor


def _step(trainer, cache, rows):
    trainer.data_collator.vision_cache = cache
    batch = trainer.data_collator(rows)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return batch, loss.detach(), grads


def test_cached_step_equals_the_pixel_step(cached_trainer):
    trainer, _, _ = cached_trainer
    cache = trainer.data_collator.vision_cache
    assert cache is not None and cache.computed > 0
    rows = [{"index": i} for i in (0, 3, 5, 7)]
    cached, loss_c, grads_c = _step(trainer, cache, rows)
    plain, loss_p, grads_p = _step(trainer, None, rows)
    trainer.data_collator.vision_cache = cache
    assert "pixel_values" not in cached and "pixel_values" in plain
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    assert torch.equal(cached["image_grid_thw"], plain["image_grid_thw"])
    assert abs(loss_c.item() - loss_p.item()) <= 1e-6
    assert grads_c.keys() == grads_p.keys() and any(g.abs().sum() > 0 for g in grads_p.values())
    for name in grads_p:
        assert torch.allclose(grads_c[name], grads_p[name], rtol=0, atol=1e-6), name
    collator = trainer.data_collator
    collator.packing, collator.pack_capacity = True, 2048  # packed rows reorder the cached features
    try:
        packed, loss_k, _ = _step(trainer, cache, rows)
    finally:
        collator.packing, collator.pack_capacity = False, None
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    assert abs(loss_k.item() - loss_p.item()) <= 1e-5


def test_ranks_and_resume_encode_each_image_once(cached_trainer, tmp_path):
    trainer, _, processor = cached_trainer
    images = [p for rec in trainer.data_collator.records[:12] for p in rec["images"]]
    key = vision_cache.weights_key(vision_cache.vision_tower(trainer.model), processor, "test")
    ranks = [vision_cache.VisionCache(tmp_path, key) for _ in range(2)]
    todo = [cache.missing(images) for cache in ranks]  # every rank lists before any rank writes
    assert todo[0] == todo[1] and len(todo[0]) == len(set(images))
    for rank, cache in enumerate(ranks):
        cache.fill(trainer.model, processor, todo[rank][rank::2], 4, contextlib.nullcontext, torch.device("cpu"))
    assert [c.computed for c in ranks] == [len(todo[0][0::2]), len(todo[0][1::2])]
    resumed = vision_cache.VisionCache(tmp_path, key)
    assert resumed.missing(images) == []  # a resumed run encodes nothing
    feats, per_image = resumed.batch(images[:2])
    assert feats["image_embeds"].shape[0] == sum(per_image) and feats["image_embeds"].dtype == torch.float32


def test_over_the_size_bound_trains_without_it_after_one_warning(cached_trainer):
    trainer, recipe, processor = cached_trainer
    small = recipe.model_copy(update={"train": recipe.train.model_copy(update={"cache_vision_max_gb": 1e-9})})
    with pytest.warns(UserWarning, match="train.cache_vision_max_gb") as caught:
        assert vision_cache.setup(trainer, small, processor, trainer.data_collator.records) is None
    own = [w for w in caught if "site-packages" not in Path(w.filename).parts]
    assert len(own) == 1  # vlmtax's own warnings: a library's are its own business (and the suite's filters)


def test_cache_needs_a_frozen_tower(tiny_model_dir, prepared_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "r",
                                                     "train.cache_vision=true", "freeze.vision=false"))
    with pytest.raises(VlmtaxError, match="needs a frozen vision tower"):
        vision_cache.wanted(recipe, "qwen2_vl")
    with warnings.catch_warnings():
        assert not vision_cache.wanted(load_recipe(TINY_RECIPE, tiny_overrides(
            tiny_model_dir, prepared_dir, tmp_path / "r")), "qwen2_vl")  # tiny_cpu trains the tower
