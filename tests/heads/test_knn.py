"""The kNN bank: training rows only, so that a validation row never finds itself (tune fits on val)."""

from __future__ import annotations

import torch
from conftest import RECIPES, tiny_overrides

from vlmtax.heads.data import load_classify_data
from vlmtax.heads.knn import fit_knn, knn_probabilities
from vlmtax.models.backbone import load_encoder, load_image_processor
from vlmtax.train.recipe import load_recipe


def test_knn_bank_holds_no_validation_row(tiny_clip_dir, prepared_dir, tmp_path):
    recipe = load_recipe(RECIPES / "clip_l14_knn.yaml", tiny_overrides(
        tiny_clip_dir, prepared_dir, tmp_path / "run", f"heads.cache_dir={tmp_path / 'cache'}",
        "heads.extract_batch_size=16", "heads.k=1"))
    data = load_classify_data(prepared_dir)
    assert data.val.images, "the fixture must hold validation rows"
    processor = load_image_processor(tiny_clip_dir)
    encoder = load_encoder(tiny_clip_dir, torch.float32)
    bank = fit_knn(recipe, data, encoder, processor)
    assert len(bank["features"]) == len(bank["labels"]) == len(bank["categories"]) == len(data.train.images)
    # A validation row's nearest neighbour is another row, never itself (a leaked bank gives cosine 1).
    from vlmtax.heads.features import FeatureCache, backbone_fingerprint, cached_features

    cache = FeatureCache(tmp_path / "cache", backbone_fingerprint(recipe.model, processor, torch.float32))
    val, _ = cached_features(encoder, processor, data.val.images, cache, 16)
    sims = torch.nn.functional.normalize(val.float(), dim=-1) @ bank["features"].T
    assert (sims.max(dim=1).values < 1 - 1e-4).all()
    probs = knn_probabilities(bank, data.layout, data.categories, 1, val, torch.tensor(data.val.categories))
    assert len(probs) == len(data.val.images)
