"""The vision cache's storage (sft's pre-pass): how features are stored, and whether they fit on the disk.

Two storage formats (`train.cache_vision_storage`):
- `exact`: the features in the dtype the language model consumes (it casts what it receives to its input
  embeddings' dtype), or in the narrower dtype the tower produces them in under autocast: either way the
  model sees exactly what the uncached step gives it. 2 bytes a value in 16-bit training.
- `fp8`: float8_e4m3fn with one fp32 scale per image token (per row: amax / 448, the format's largest
  finite value), half the disk and the reads of 16-bit storage for a rounding of about 2-3% of a value
  (e4m3 keeps 3 mantissa bits). Per row rather than per tensor, so one outlier token does not push the
  other rows of an image towards e4m3's subnormals.
`auto` (the default) takes `exact` when it fits and `fp8` when only that fits.

Whether it fits: the bytes still to write must fit in the cache folder's free disk less a headroom (10% of
the free space, at least 5 GB, for checkpoints and logs), and the whole cache under
`train.cache_vision_max_gb` where that is set. Before this, a fixed 50 GB bound refused the 68 GB that a
70,000-image catalogue needs at Qwen2-VL-2B's shipped pixel budget, whatever the disk held.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
HEADROOM_SHARE = 0.10  # of the free space, left for checkpoints, logs and other processes
HEADROOM_MIN = 5e9  # bytes
FORMAT_VERSION = "2"  # in the cache key: a change of layout gets a new folder, old files are never misread
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def exact_dtype(model: Any, tower_dtype: torch.dtype, mixed_precision: str) -> torch.dtype:
    """The narrowest dtype that loses nothing the model uses: what it consumes (its input embeddings' dtype,
    to which it casts the features), or what the tower produces under autocast when that is narrower (a
    16-bit autocast output upcast to fp32 embeddings carries no more than its 16 bits)."""
    consumed = model.get_input_embeddings().weight.dtype
    produced = _AUTOCAST.get(mixed_precision, tower_dtype)
    return produced if produced.itemsize < consumed.itemsize else consumed


@dataclass(frozen=True)
class Storage:
    """One storage format: `exact` (features in `dtype`) or `fp8` (e4m3 values, fp32 scales, read as `dtype`)."""

    name: str
    dtype: torch.dtype

    @property
    def key(self) -> str:
        return f"v{FORMAT_VERSION}/{self.name}/{self.dtype}"

    def bytes_for(self, tokens: int, hidden: int) -> int:
        if self.name == "fp8":
            return tokens * (hidden + 4)  # one byte a value, a 4-byte scale a row
        return tokens * hidden * self.dtype.itemsize

    def encode(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store for one image's features (tokens x hidden)."""
        if self.name != "fp8":
            return {"features": features.to(self.dtype).contiguous()}
        values, scale = fp8_encode(features)
        return {"features": values, "scale": scale}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        if "scale" in stored:
            return fp8_decode(stored["features"], stored["scale"], self.dtype)
        return stored["features"]


def fp8_encode(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scaled e4m3: (values, fp32 scales of shape rows x 1). An all-zero row keeps scale 1."""
    x = features.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.contiguous()


def fp8_decode(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def candidates(setting: str, exact: torch.dtype) -> list[Storage]:
    """The formats to try, in order of preference, for `train.cache_vision_storage`."""
    fp8 = Storage("fp8", exact)
    if setting == "fp8":
        return [fp8]
    return [Storage("exact", exact)] if setting == "exact" else [Storage("exact", exact), fp8]


def free_bytes(folder: Path) -> int:
    """Free disk where `folder` will live (its nearest existing parent: it may not exist yet)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def usable_bytes(folder: Path) -> tuple[int, int]:
    """(bytes the cache may add in `folder`, free bytes there): free disk less the headroom."""
    free = free_bytes(folder)
    return max(0, int(free - max(HEADROOM_MIN, HEADROOM_SHARE * free))), free


def shortfall(storages: list[Storage], needs: list[tuple[int, int]], folder: Path, cap_gb: float | None,
              free: int, usable: int) -> str:
    """The one-line warning when no format fits: the figures, then the fixes. `needs` holds each format's
    (bytes of the whole cache, bytes still to write)."""
    sizes = ", ".join(f"{total / 1e9:.1f} GB {s.name if s.name == 'fp8' else str(s.dtype).removeprefix('torch.')}"
                      for s, (total, _) in zip(storages, needs))
    over_cap = cap_gb is not None and all(total > cap_gb * 1e9 for total, _ in needs)
    where = (f"over train.cache_vision_max_gb={cap_gb:g}" if over_cap else
             f"more than the {usable / 1e9:.1f} GB usable in {folder} ({free / 1e9:.1f} GB free less headroom)")
    fix = ("raise train.cache_vision_max_gb" if over_cap else
           "point train.cache_vision_dir at a disk with room or free some space")
    if all(s.name != "fp8" for s in storages):
        fix += ", or set train.cache_vision_storage=fp8 (half the size)"
    return f"the vision cache would need {sizes}, {where}: training without it; {fix}"
