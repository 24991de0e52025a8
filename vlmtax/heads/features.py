"""The frozen feature cache: pooled backbone features, extracted once, kept on disk between runs.

A cache folder per backbone fingerprint (the backbone's config and weight files, the image processor's
settings, the dtype); inside it, shards of features, each with the sha256 of the image bytes of its
rows. A second run on the same images (another loss, another head width, a resumed run) reads the
shards back and extracts nothing; new images are extracted and written as one more shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from vlmtax.fileio import file_sha256, save_safetensors, write_json
from vlmtax.models.backbone import Encoder, process_images
from vlmtax.models.timm_backbone import MARKER as TIMM_MARKER
from vlmtax.models.tiny_model import MARKER as TINY_MARKER
from vlmtax.progress import progress_iter

MARKERS = (TINY_MARKER, TIMM_MARKER)  # who built a folder and when: not what decides its features


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMTAX_CACHE") or Path.home() / ".cache" / "vlmtax" / "features")


def backbone_fingerprint(source: str, processor: Any, dtype: torch.dtype) -> str:
    """Hash of what decides the features: weights (file hashes for a local folder), config, preprocessing."""
    h = hashlib.sha256()
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.name not in MARKERS]
        for f in sorted(files):
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    else:
        h.update(source.encode())  # a hub id: the revision is the hub's concern
    h.update(json.dumps(processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:24]


class FeatureCache:
    def __init__(self, root: Path, fingerprint: str):
        self.dir = Path(root) / fingerprint

    def load(self) -> dict[str, torch.Tensor]:
        """image sha256 -> feature vector, over every shard."""
        from safetensors.torch import load_file

        found: dict[str, torch.Tensor] = {}
        for index in sorted(self.dir.glob("shard-*.json")) if self.dir.is_dir() else []:
            weights = index.with_suffix(".safetensors")
            if not weights.is_file():
                continue
            keys = json.loads(index.read_text(encoding="utf-8"))
            feats = load_file(str(weights))["features"]
            found.update(zip(keys, feats))
        return found

    def save(self, keys: list[str], feats: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}"
        save_safetensors({"features": feats.contiguous()}, self.dir / f"{name}.safetensors")
        write_json(self.dir / f"{name}.json", keys, indent=None)  # written last: its presence marks a whole shard


def extract(encoder: Encoder, processor: Any, paths: list[str], batch_size: int,
            desc: str = "features") -> torch.Tensor:
    """Pooled features of `paths`, in order, in fp32 on the CPU.

    Under inference mode (no autograd bookkeeping at all), and in channels_last where the backbone's kind
    says (convolutions; bench/heads.py measures both). The result is concatenated outside inference mode, so
    the heads may train on it."""
    from vlmtax.data.records import load_image

    device = next(encoder.parameters()).device
    was = encoder.training
    encoder.eval()
    fmt = torch.channels_last if encoder.kind.channels_last else torch.contiguous_format
    encoder.to(memory_format=fmt)
    out = []
    starts = range(0, len(paths), batch_size)
    with torch.inference_mode():
        for s in progress_iter(starts, total=len(starts), desc=desc, unit="batches"):
            inputs = process_images(processor, [load_image(p) for p in paths[s: s + batch_size]])
            inputs = {k: v.to(device, memory_format=fmt) if v.dim() == 4 else v.to(device) for k, v in inputs.items()}
            out.append(encoder(**inputs).float().cpu())
    encoder.to(memory_format=torch.contiguous_format)
    encoder.train(was)
    return torch.cat(out) if out else torch.empty(0)


def cached_features(encoder: Encoder, processor: Any, paths: list[str], cache: FeatureCache | None,
                    batch_size: int) -> tuple[torch.Tensor, int]:
    """Features of `paths` through the cache; also returns how many images had to be extracted."""
    if cache is None:
        return extract(encoder, processor, paths, batch_size), len(paths)
    keys = [file_sha256(p) for p in paths]
    have = cache.load()
    todo = sorted({k: p for k, p in zip(keys, paths) if k not in have}.items())
    if todo:
        feats = extract(encoder, processor, [p for _, p in todo], batch_size, desc="features (caching)")
        cache.save([k for k, _ in todo], feats)
        have.update(zip((k for k, _ in todo), feats))
    return torch.stack([have[k] for k in keys]), len(todo)
