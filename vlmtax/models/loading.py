"""Model loading for sft, merge and predict: dtypes and the hardware's precision, what a model folder holds,
and how it comes back as a plain model.

A folder is one of: a LoRA run dir (or one of its checkpoint-N folders: adapter + the base named in
vlmtax_meta.json), a merged dir, a full fine-tuning run dir, or a base model (plain weights). Prediction
always runs on a plain model: an adapter is folded into a fresh 16/32-bit load of its base in memory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtax.errors import VlmtaxError, first_line
from vlmtax.meta import META_FILE
from vlmtax.models.families import family_of, supported

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def bf16_supported(device: torch.device | str | None = None) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0 or newer (A100, L4, H100, RTX 30xx+). Not
    `torch.cuda.is_bf16_supported()`: it counts emulation and says True on a T4 (sm_75) or V100 (sm_70),
    where bf16 then runs emulated and slow while the fp16 path is never taken."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16_ok: bool

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16_ok=cuda and bf16_supported())


def gpu_precision(preferred: str | None, device: torch.device) -> str:
    """The 16/32-bit precision to run in on `device`: fp32 on the CPU; on a GPU `preferred` (a run's training
    precision, bf16 when unknown), with bf16 turned into fp16 where the GPU has no bf16 in hardware."""
    if device.type != "cuda":
        return "fp32"
    precision = preferred if preferred in DTYPES else "bf16"
    if precision == "bf16" and not bf16_supported(device):
        return "fp16"
    return precision


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """An explicitly named dtype; bf16 is refused on a GPU without it (it would run emulated)."""
    if name not in DTYPES:
        raise VlmtaxError(f"unknown dtype {name!r}", f"use auto or one of {', '.join(DTYPES)}")
    if name == "bf16" and device.type == "cuda" and not bf16_supported(device):
        raise VlmtaxError(f"{device} has no bf16 support (T4/V100 class, compute capability below 8.0)",
                          "use --dtype fp16 or auto")
    return DTYPES[name]


@dataclass
class ModelDir:
    """What a model folder holds. `meta` is its own vlmtax_meta.json, or its run's for a checkpoint-N folder."""

    path: Path
    kind: str  # "adapter" | "weights"
    meta: dict[str, Any]
    base: str | None  # the base model an adapter applies to

    @property
    def finetuning(self) -> str | None:
        return self.meta.get("finetuning")

    @property
    def trust_remote_code(self) -> bool:
        """Only when the recipe that trained it turned remote code on (sft and merge record it)."""
        return bool(self.meta.get("trust_remote_code", False))


def run_roots(path: Path) -> list[Path]:
    """A checkpoint-N folder shares its run's metadata and taxonomy."""
    return [path, path.parent] if re.fullmatch(r"checkpoint-\d+", path.name) else [path]


def _read_meta(path: Path) -> dict[str, Any]:
    for candidate in (folder / META_FILE for folder in run_roots(path)):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise VlmtaxError(f"{candidate} is not valid JSON", "restore it from the run") from None
    return {}


def _resolve_base(name: str, near: Path) -> str:
    """The base as recorded; a relative path is tried from the working folder, then from the run's folders."""
    if Path(name).exists():
        return str(Path(name).resolve())
    for folder in (near, near.parent, near.parent.parent):
        if (folder / name).exists():
            return str((folder / name).resolve())
    return name


def inspect_model_dir(path: str | Path) -> ModelDir:
    path = Path(path)
    if not path.is_dir():
        if _HUB_ID.fullmatch(str(path)) and not path.exists():
            return ModelDir(path=path, kind="weights", meta={}, base=None)
        raise VlmtaxError(f"model folder not found: {path}", "pass a run dir, a merged dir or a model folder")
    meta = _read_meta(path)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise VlmtaxError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}", "restore the adapter weights")
        try:
            recorded = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError:
            raise VlmtaxError(f"{path / ADAPTER_CONFIG} is not valid JSON", "restore it from the run") from None
        base = meta.get("base_model") or recorded
        if not base:
            raise VlmtaxError(f"adapter in {path} does not name its base model",
                              f"add base_model to {META_FILE} (the folder or hub id it was trained on)")
        return ModelDir(path=path, kind="adapter", meta=meta, base=_resolve_base(str(base), path))
    if (path / "config.json").is_file():
        return ModelDir(path=path, kind="weights", meta=meta, base=None)
    if meta.get("task") == "classify":
        raise VlmtaxError(f"{path} is a classify run (its {META_FILE} says task: classify) but classifier.json, "
                          "which describes its heads, is missing",
                          "restore classifier.json from the run, or re-run sft")
    raise VlmtaxError(f"{path} holds neither an adapter ({ADAPTER_CONFIG}) nor model weights (config.json)",
                      "pass a finished `vlmtax sft` run dir, a `vlmtax merge` output or a model folder")


def resolve_dtype(name: str, model_dir: ModelDir | None, device: torch.device) -> torch.dtype:
    """auto: fp32 on the CPU; on a GPU the run's training precision (bf16/fp16), bf16 only where supported."""
    if name != "auto":
        return check_dtype(name, device)
    return DTYPES[gpu_precision(model_dir.meta.get("precision") if model_dir else None, device)]


_DEVICE = re.compile(r"cpu|cuda(?::\d+)?")


def default_device(device: str | None = None) -> torch.device:
    """`--device` (cpu, cuda, cuda:N) checked against the machine; default: the first GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(device):
        raise VlmtaxError(f"unknown device {device!r}", "use cpu, cuda or cuda:N")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VlmtaxError(f"--device {device}: no CUDA GPU is visible", "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VlmtaxError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible",
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def training_device(hw: Hardware) -> torch.device:
    """This process's device in training: the GPU of its LOCAL_RANK under a launcher (accelerate, torchrun set
    it before the script runs), cuda:0 alone, the CPU without a GPU. A bare "cuda" put every rank on GPU 0."""
    if not hw.cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def useful_processes(requested: int, work: int, unit: str, what: str, device: str | None = None) -> int:
    """`--num-processes` capped at what can help: one process per GPU (per CPU core without one, or with
    `device` cpu) and per unit of `work` (batches, records); a cap is said in one line. Below 1 is an error."""
    import sys

    gpus = device != "cpu" and torch.cuda.is_available()
    if requested < 1:
        raise VlmtaxError(f"--num-processes {requested} is not positive", "use 1 or more")
    devices = torch.cuda.device_count() if gpus else len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
    limits = {f"{devices} {'GPU' if gpus else 'CPU core'}{'s' if devices != 1 else ''}": devices,
              f"{work} {unit}{'' if work == 1 else 'es' if unit.endswith(('ch', 's')) else 's'}": work}
    cap = max(1, min(requested, *limits.values()))
    if cap < requested:
        why = ", ".join(k for k, v in limits.items() if v == cap)
        sys.stderr.write(f"{what}: --num-processes {requested} capped at {cap} ({why})\n")
    return cap


def load_weights(source: str | Path, dtype: torch.dtype, what: str = "model", trust_remote_code: bool = False,
                 attn_implementation: str = "sdpa", **extra: Any) -> Any:
    """`from_pretrained` in one dtype. Merges and predictions run on plain 16/32-bit weights; only sft passes
    `extra` (a quantization_config with its per-rank device_map)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        family_of(config, f"{what} {source}")
        # sdpa, the default, takes the custom 4D masks that constrained decoding builds (flash attention cannot);
        # only training may ask for another kernel (the recipe's attn_implementation).
        return AutoModelForImageTextToText.from_pretrained(str(source), dtype=dtype,
                                                           attn_implementation=attn_implementation,
                                                           trust_remote_code=trust_remote_code, **extra)
    except SafetensorError as exc:
        raise VlmtaxError(f"the weights of {what} {source} are damaged ({exc})",
                          "restore the folder (a truncated or empty model.safetensors), or re-create it") from None
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise VlmtaxError(f"cannot load {what} {source}: {first}",
                          f"check the folder (no hub access here?) and that it holds a model of: {supported()}"
                          ) from None


def attach_adapter(base: Any, model_dir: ModelDir) -> Any:
    """Base + adapter as a PeftModel; an adapter trained on another base is refused, not half-applied."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights = model_dir.path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only: a truncated or empty file fails here
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise VlmtaxError(f"adapter weights {weights} are damaged ({exc})",
                          "restore the file from the run's latest checkpoint-N folder, or re-run sft") from None
    try:
        model = PeftModel.from_pretrained(base, str(model_dir.path))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc)[:300]
        raise VlmtaxError(f"adapter in {model_dir.path} does not match base model {model_dir.base}: {first}",
                          f"point base_model in {META_FILE} at the model the run was trained on") from None
    saved = set(load_file(str(model_dir.path / ADAPTER_WEIGHTS)).keys())
    expected = set(get_peft_model_state_dict(model).keys())
    if saved != expected:
        odd = sorted(saved ^ expected)
        raise VlmtaxError(
            f"adapter in {model_dir.path} does not match base model {model_dir.base}: "
            f"{len(odd)} adapter weight(s) without a place, e.g. {odd[0]}",
            f"point base_model in {META_FILE} at the model the run was trained on")
    return model.eval()


def fold_adapter(peft_model: Any) -> Any:
    """merge_and_unload, keeping a trained output layer: an lm_head that no longer equals the (tied) embeddings
    must be saved as its own weight, or `save_pretrained` would drop it and reload the embeddings instead."""
    model = peft_model.merge_and_unload()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
    return model.eval()


def restore_full_weights(model: Any, checkpoint: str | Path) -> bool:
    """Copy a full fine-tuning checkpoint's weights into `model` in place (so an optimizer built on its
    parameters stays valid); False where the checkpoint holds no full weights (a LoRA adapter).

    The Trainer's own loaders (resume_from_checkpoint, load_best_model_at_end) read the checkpoint's state
    dict into the model as is and non-strictly, but transformers 5 saves Qwen2-VL under its legacy key names
    (model.layers.* for model.language_model.*): no key matches and the weights silently stay as they
    were. from_pretrained converts the names. A classify run's model is not a transformers model: the
    Trainer's own loading matches its keys, and this returns False."""
    folder = Path(checkpoint)
    if hasattr(model, "peft_config") or not hasattr(type(model), "from_pretrained") or not any(
            (folder / n).exists() for n in ("model.safetensors", "model.safetensors.index.json")):
        return False
    loaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
    return True


def load_processor(path: str | Path, fallback: str | None = None, padding_side: str | None = "left",
                   trust_remote_code: bool = False) -> Any:
    """The processor saved with the model (the run's image budget included); left padding for batched decoding
    (None keeps the saved side, for a processor that is only copied on)."""
    from transformers import AutoProcessor

    last: Exception | None = None
    for source in (str(path), fallback):
        if source is None:
            continue
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
            break
        except (OSError, ValueError) as exc:
            last = exc
    else:
        first = first_line(last) if last is not None and str(last).strip() else "no processor files"
        raise VlmtaxError(f"cannot load a processor from {path}: {first}", "the folder needs its processor files")
    tok = getattr(processor, "tokenizer", None)
    if tok is None:  # an image processor alone: a vision encoder (CLIP, SigLIP, timm), not a VLM
        raise VlmtaxError(f"{path} is a vision encoder ({type(processor).__name__}, no tokenizer), not a "
                          "vision-language model", "set `task: classify` to train heads on it, or point model: at "
                          f"a VLM of: {supported()}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return processor


def load_for_inference(path: str | Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any, ModelDir]:
    """(plain model in eval mode on `device`, processor, what the folder was)."""
    model_dir = inspect_model_dir(path)
    dev = default_device(device)
    torch_dtype = resolve_dtype(dtype, model_dir, dev)
    if model_dir.kind == "adapter":
        remote = model_dir.trust_remote_code
        base = load_weights(model_dir.base, torch_dtype, "base model", trust_remote_code=remote)
        model = fold_adapter(attach_adapter(base, model_dir))
        processor = load_processor(model_dir.path, fallback=model_dir.base, trust_remote_code=remote)
    else:
        model = load_weights(model_dir.path, torch_dtype, trust_remote_code=model_dir.trust_remote_code).eval()
        processor = load_processor(model_dir.path, trust_remote_code=model_dir.trust_remote_code)
    return model.to(dev), processor, model_dir
