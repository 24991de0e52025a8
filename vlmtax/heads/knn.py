"""The kNN route (seed 002; the Meesho 0.778 baseline): frozen features, a cosine k-nearest-neighbour vote.

Fitting stores the training rows' L2-normalised features as the bank; never the validation rows: tune
predicts val.csv, where each row would find itself (cosine 1) and vote for its own label. A query is
compared with the bank rows of its own category only; each of its k nearest neighbours votes for its
label with weight (1 + cosine) / 2, and a value's probability is its share of the votes. Neighbours
whose label is missing do not vote; with no vote at all, the training value frequencies stand in.
FAISS (`pip install 'vlmtax[knn]'`) searches when installed, else scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlmtax.heads.losses import IGNORE
from vlmtax.heads.model import HeadSpec


def fit_knn(recipe: Any, data: Any, encoder: Any, processor: Any) -> dict[str, torch.Tensor]:
    from vlmtax.heads.features import FeatureCache, backbone_fingerprint, cached_features, default_cache_dir

    cache = FeatureCache(recipe.heads.cache_dir or default_cache_dir(),
                         backbone_fingerprint(recipe.model, processor, next(encoder.parameters()).dtype))
    feats, _ = cached_features(encoder, processor, data.train.images, cache, recipe.heads.extract_batch_size)
    return {"features": torch.nn.functional.normalize(feats.float(), dim=-1), "labels": data.train.labels,
            "categories": torch.tensor(data.train.categories, dtype=torch.long)}


def _neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, indices) of the k nearest bank rows per query; inputs are L2-normalised."""
    k = min(k, len(bank))
    try:
        import faiss
    except ImportError:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank).kneighbors(queries)
        return 1.0 - dist, idx
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def knn_probabilities(bank: dict[str, torch.Tensor], layout: list[HeadSpec], categories: list[str], k: int,
                      features: torch.Tensor, category: torch.Tensor) -> list[dict[str, dict[str, float]]]:
    """Per query row: {attribute: {value: probability}} from its category's neighbours' votes."""
    queries = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
    out: list[dict[str, dict[str, float]]] = [{} for _ in range(len(queries))]
    for c, name in enumerate(categories):
        rows = (category == c).nonzero(as_tuple=True)[0].numpy()
        members = (bank["categories"] == c).nonzero(as_tuple=True)[0].numpy()
        if len(rows) == 0:
            continue
        heads = [h for h in layout if h.category == name]
        labels = bank["labels"].numpy()[members] if len(members) else np.empty((0, 0), dtype=np.int64)
        if len(members):
            sims, idx = _neighbours(bank["features"].numpy()[members], queries[rows], k)
        for h in heads:
            prior = np.bincount(labels[:, h.slot][labels[:, h.slot] != IGNORE], minlength=len(h.values)) \
                if len(members) else np.zeros(len(h.values))
            prior = prior / prior.sum() if prior.sum() else np.full(len(h.values), 1 / len(h.values))
            for q, r in enumerate(rows):
                votes = np.zeros(len(h.values))
                if len(members):
                    lab = labels[idx[q], h.slot]
                    known = lab != IGNORE
                    np.add.at(votes, lab[known], (1.0 + sims[q][known]) / 2.0)
                p = votes / votes.sum() if votes.sum() > 0 else prior
                out[r][h.attribute] = dict(zip(h.values, p.tolist()))
    return out
