"""The predict stage for classify runs: images + categories -> per-attribute probabilities -> values.

`HeadsPredictor.probabilities(images, categories)` is the reusable forward (tuning and ensembling read
the same numbers through `predict --probs`); `decode` gives predict.py what the constrained decoder gives
it for generate runs, so the submission, probabilities JSONL, rejects and resume logic are shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmtax.data.taxonomy import Category, Taxonomy
from vlmtax.errors import VlmtaxError, first_line
from vlmtax.heads.model import (
    BACKBONE_WEIGHTS,
    CLASSIFIER_FILE,
    HEADS_WEIGHTS,
    KNN_BANK,
    Heads,
    HeadSpec,
    head_probabilities,
    layout_matches,
    load_heads_state,
)
from vlmtax.meta import META_FILE
from vlmtax.models.backbone import load_encoder, load_image_processor, process_images
from vlmtax.models.loading import DTYPES, gpu_precision, run_roots


def run_precision(root: Path, spec: dict, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(backbone load dtype, autocast dtype) that repeat training's numerics on `device`: frozen features came from
    a backbone in the run's precision, a trained backbone and the heads ran in fp32 under that precision's
    autocast. fp32 on the CPU (where training ran in fp32 too)."""
    meta = root / META_FILE
    trained = json.loads(meta.read_text(encoding="utf-8")).get("precision") if meta.is_file() else None
    precision = gpu_precision(trained, device)
    if precision == "fp32":
        return torch.float32, None
    return (torch.float32 if spec.get("trained_backbone") else DTYPES[precision]), DTYPES[precision]


def heads_run_root(path: str | Path) -> Path | None:
    """The run folder holding classifier.json for a classify run (or one of its checkpoints), else None."""
    return next((p for p in run_roots(Path(path)) if (p / CLASSIFIER_FILE).is_file()), None)


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """A classify run's weights file; a missing, empty or truncated one is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load

    try:
        return load(str(path))
    except (SafetensorError, OSError) as exc:
        raise VlmtaxError(f"weights file {path} of the classify run is damaged or missing ({first_line(exc)})",
                          "restore the file from a copy of the run, or re-run sft") from None


@dataclass
class HeadsResult:
    values: dict[str, str]
    probs: dict[str, dict[str, float]]
    logliks: dict[str, list[float]] = field(default_factory=dict)
    snapped: int = 0


class HeadsPredictor:
    def __init__(self, run_dir: str | Path, taxonomy: Taxonomy, device: str | None = None):
        root = heads_run_root(run_dir)
        if root is None:
            raise VlmtaxError(f"{run_dir} is not a classify run (no {CLASSIFIER_FILE})",
                              "pass a `task: classify` run dir")
        spec = json.loads((root / CLASSIFIER_FILE).read_text(encoding="utf-8"))
        self.layout = [HeadSpec(h["category"], h["attribute"], h["slot"], tuple(h["values"])) for h in spec["layout"]]
        problem = layout_matches(self.layout, taxonomy)
        if problem:
            raise VlmtaxError(f"the taxonomy does not match the heads of {root}: {problem}",
                              "predict with the run's own taxonomy.json (drop --taxonomy) or retrain on this taxonomy")
        self.categories = list(dict.fromkeys(h.category for h in self.layout))
        self.spec, self.forward_calls = spec, 0
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = load_image_processor(root, spec.get("trust_remote_code", False))
        dtype, self.autocast = run_precision(root, spec, self.device)
        self.encoder = load_encoder(spec["backbone"], dtype, spec.get("trust_remote_code", False))
        if spec.get("trained_backbone"):
            self.encoder.load_state_dict(load_file(root / BACKBONE_WEIGHTS))
        self.encoder.to(self.device).eval()
        if self.encoder.kind.channels_last:  # convolutional backbones run faster so (bench/heads.py measures it)
            self.encoder.to(memory_format=torch.channels_last)
        if spec["kind"] == "knn":
            self.bank, self.heads = load_file(root / KNN_BANK), None
        else:
            self.heads = Heads(self.layout, spec["dim"], spec["kind"], spec["width"], spec["dropout"], spec["trunk"])
            load_heads_state(self.heads, load_file(root / HEADS_WEIGHTS))
            self.heads.to(self.device).eval()

    @torch.inference_mode()
    def probabilities(self, images: list, categories: list[str]) -> list[dict[str, dict[str, float]]]:
        """Per image: {attribute: {value: probability}} for its category's attributes."""
        from vlmtax.heads.knn import knn_probabilities

        inputs = process_images(self.processor, images)
        cats = torch.tensor([self.categories.index(c) for c in categories], device=self.device)
        self.forward_calls += 1
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            features = self.encoder(**{k: v.to(self.device) for k, v in inputs.items()})
            if self.heads is None:
                return knn_probabilities(self.bank, self.layout, self.categories, self.spec["k"], features.cpu(),
                                         cats.cpu())
            return head_probabilities(self.heads, features, cats)

    def decode(self, images: list, categories: list[Category]) -> list[HeadsResult]:
        """The most probable allowed value per attribute (ties: the taxonomy's order, most frequent first)."""
        return [HeadsResult(most_probable(probs, cat), probs)
                for probs, cat in zip(self.probabilities(images, [c.name for c in categories]), categories)]


def most_probable(probs: dict[str, dict[str, float]], category: Category) -> dict[str, str]:
    """{attribute: value} with the highest probability (ties: the taxonomy's order, most frequent first)."""
    return {a.name: max(a.values, key=lambda v, p=probs[a.name]: p[v]) for a in category.attributes}


def heads_route(collate, val_ids: list[str], n_train: int, batch_size: int):
    """The classify route's rows -> records for `train.eval_metric` (vlmtax.train.evaluation.PredictRows): the
    heads forward of the model being trained on the validation rows, batched by the training collator
    (cached features in frozen mode, the same image processing otherwise; never augmented), decided as
    `predict` decides."""
    position = {rid: n_train + j for j, rid in enumerate(val_ids)}

    @torch.no_grad()
    def run(model, rows: list) -> dict[int, dict]:
        from vlmtax.heads.model import head_probabilities

        device = next(model.parameters()).device
        done: dict[int, dict] = {}
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start:start + batch_size]
            batch = collate([position[r.id] for r in batch_rows])
            batch.pop("targets")
            batch = {k: v.to(device) for k, v in batch.items()}
            category = batch.pop("category")
            features = batch.pop("features", None)
            if features is None:
                features = model.encoder(**batch)
            for r, probs in zip(batch_rows, head_probabilities(model.heads, features, category)):
                done[r.index] = {"row": r.index, "values": most_probable(probs, r.category)}
        return done

    return run

