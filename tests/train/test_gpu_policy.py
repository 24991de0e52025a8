"""GPU policy on the CPU: the CUDA queries are mocked as real cards report themselves (a T4 says
`is_bf16_supported() == True`, counting emulation), and GPU-only libraries are replaced by recorders."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE

from vlmtax.errors import VlmtaxError
from vlmtax.generate.merge import merge_dtype
from vlmtax.generate.model import load_model, prepare_model
from vlmtax.generate.trainer import training_args
from vlmtax.models.loading import Hardware, ModelDir, default_device, resolve_dtype
from vlmtax.train.recipe import load_recipe
from vlmtax.train.run import resolve_precision


def _gpu(monkeypatch, capability: tuple[int, int], count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # What torch answers on every CUDA card since it counts emulated bf16 (the default).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.fixture
def t4(monkeypatch):
    _gpu(monkeypatch, (7, 5))


@pytest.fixture
def a100(monkeypatch):
    _gpu(monkeypatch, (8, 0), count=2)


def _recipe(tmp_path: Path, *extra: str, model: str = "m", data: str = "d"):
    return load_recipe(TINY_RECIPE, [f"model={model}", f"data={data}", f"output_dir={tmp_path / 'o'}", *extra])


def _run(precision: str) -> ModelDir:
    return ModelDir(path=Path("run"), kind="adapter", meta={"precision": precision}, base="b")


def test_t4_trains_and_predicts_in_fp16_and_refuses_bf16(t4, tmp_path):
    hw = Hardware.detect()
    assert hw.cuda and not hw.bf16_ok
    assert resolve_precision(_recipe(tmp_path, "precision=auto"), hw) == "fp16"
    with pytest.raises(VlmtaxError, match="bf16"):
        resolve_precision(_recipe(tmp_path, "precision=bf16"), hw)
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", _run("bf16"), cuda) == torch.float16
    assert resolve_dtype("auto", None, cuda) == torch.float16
    assert merge_dtype("auto", _run("bf16"), cuda) == torch.float16
    with pytest.raises(VlmtaxError, match="bf16.*compute capability"):
        resolve_dtype("bf16", None, cuda)
    with pytest.raises(VlmtaxError, match="bf16"):
        merge_dtype("bf16", _run("fp16"), cuda)
    # On the CPU the run's own precision is kept for a merge, and predict runs fp32.
    assert merge_dtype("auto", _run("bf16"), torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", _run("bf16"), torch.device("cpu")) == torch.float32


def test_ampere_keeps_bf16(a100, tmp_path):
    assert Hardware.detect().bf16_ok
    assert resolve_precision(_recipe(tmp_path, "precision=auto"), Hardware.detect()) == "bf16"
    assert resolve_dtype("auto", _run("bf16"), torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", _run("fp16"), torch.device("cuda")) == torch.float16


def test_device_option(a100):
    assert default_device("cuda:1") == torch.device("cuda:1") and default_device("cpu").type == "cpu"
    with pytest.raises(VlmtaxError, match="only 2 GPU"):
        default_device("cuda:2")
    with pytest.raises(VlmtaxError, match="unknown device"):
        default_device("gpu")


def test_device_option_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VlmtaxError, match="no CUDA GPU"):
        default_device("cuda")
    assert default_device(None).type == "cpu"


def test_qlora_loads_onto_each_ranks_own_gpu(tiny_model_dir, tmp_path, monkeypatch):
    seen = {}

    def fake_load(source, dtype, what="model", trust_remote_code=False, **extra):
        seen.update(extra, dtype=dtype)
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2_vl"))

    monkeypatch.setattr("vlmtax.generate.model.load_weights", fake_load)
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_model(_recipe(tmp_path, "quantization=4bit", "finetuning=lora", model=str(tiny_model_dir)), "fp16")
    assert seen["device_map"] == {"": 1}
    assert seen["quantization_config"].load_in_4bit and seen["dtype"] == torch.float16


def test_bf16_keeps_fp32_master_weights(tiny_model_dir, tmp_path):
    full, _ = load_model(_recipe(tmp_path, "finetuning=full", model=str(tiny_model_dir)), "bf16")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    recipe = _recipe(tmp_path, "finetuning=lora", model=str(tiny_model_dir))
    lora, _ = load_model(recipe, "bf16")
    lora = prepare_model(lora, recipe, "bf16")
    trainable = {n: p.dtype for n, p in lora.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_liger_patch_is_applied_per_family_without_its_loss(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen2_vl = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    recipe = _recipe(tmp_path, "train.liger=true", model=str(tiny_model_dir))
    model, _ = load_model(recipe, "fp32")
    assert len(calls) == 1 and calls[0]["model"] is model
    assert calls[0]["fused_linear_cross_entropy"] is False and calls[0]["cross_entropy"] is False
    assert calls[0]["rms_norm"] and calls[0]["swiglu"] and not calls[0]["rope"]  # a no-op on Qwen2-VL (families.py)
    assert training_args(recipe, "fp32", False).use_liger_kernel is False
    model.config.model_type = "llava"
    from vlmtax.generate.model import apply_liger

    with pytest.raises(VlmtaxError, match="model type 'llava', which vlmtax does not support"):
        apply_liger(model)




ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_accelerate_configs_launch_several_processes(path: Path):
    """Each config parses as accelerate reads it and picks a launcher that starts `num_processes` processes
    (accelerate's plain --cpu launcher would start one), with precision left to the recipe."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "train.py"]))
    assert defaults.num_processes >= 2 and args.num_processes == defaults.num_processes
    assert defaults.mixed_precision == "no" and not args.cpu
    assert args.multi_gpu or args.use_deepspeed or args.use_fsdp
    if defaults.distributed_type == DistributedType.FSDP:
        from transformers.models.qwen2_vl import modeling_qwen2_vl

        for name in defaults.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(modeling_qwen2_vl, name), name
        assert args.fsdp_version == "2" or str(defaults.fsdp_config["fsdp_version"]) == "2"
    if defaults.distributed_type == DistributedType.DEEPSPEED:
        assert defaults.deepspeed_config["zero_stage"] == 2 and args.zero_stage == 2
