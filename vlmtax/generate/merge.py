"""The merge stage: a LoRA run dir -> one folder that plain `from_pretrained` loads, verified before success.

The base named by the run is reloaded in the chosen dtype (a QLoRA run merges into a 16-bit reload, never
into quantised weights), the adapter applied and folded in (`merge_and_unload`). Before the folder is
published, a probe (a record of the run's data, else a synthetic image and prompt, teacher-forced with
its answer) must give: merged logits == adapter logits within a dtype tolerance; adapter logits != base
logits (an adapter that changes nothing is an error); and the same after reloading the written folder,
which catches weights lost in saving, such as a trained lm_head dropped because the config still ties it
to the embeddings.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmtax.data.answer import answer_segments, render_prompt
from vlmtax.data.chat import SequenceBuilder
from vlmtax.data.records import load_image, record_prompt_answer, record_values
from vlmtax.data.run_taxonomy import TAXONOMY_FILE, load_taxonomy
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir, check_writable, guard_outputs, write_json
from vlmtax.meta import META_FILE, run_meta
from vlmtax.models.loading import (
    DTYPES,
    ModelDir,
    attach_adapter,
    check_dtype,
    default_device,
    fold_adapter,
    gpu_precision,
    inspect_model_dir,
    load_processor,
    load_weights,
    run_roots,
)

# Largest allowed |logit difference| between merged and adapter model, relative to the largest |logit|.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MAX_SHARD_SIZE = "4GB"


@dataclass
class Verification:
    merged_vs_adapter: float
    reloaded_vs_adapter: float
    base_vs_adapter: float
    tolerance: float
    probe: str


def _probe_record(meta: dict[str, Any], taxonomy: Taxonomy) -> dict[str, Any] | None:
    """The first record of the run's data whose image is still there (validation data first)."""
    data = Path(meta["data"]) if meta.get("data") else None
    for name in ("val.json", "train.json"):
        if data is None or not (data / name).is_file():
            continue
        try:
            records = json.loads((data / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for rec in records[:50]:
            if rec.get("category") in taxonomy.categories and rec.get("images") and Path(rec["images"][0]).is_file():
                return rec
    return None


def probe_inputs(processor: Any, taxonomy: Taxonomy, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """One teacher-forced sequence (prompt, image, answer), as training builds it; and where it came from."""
    rec = _probe_record(meta, taxonomy)
    if rec is not None:
        category = taxonomy.category(rec["category"])
        values, prompt = record_values(rec, taxonomy), record_prompt_answer(rec)[0]
        image, source = load_image(rec["images"][0]), f"record {rec.get('id')} of {meta['data']}"
    else:
        category = next(iter(taxonomy.categories.values()))
        values, prompt = {a.name: a.mode for a in category.attributes}, render_prompt(category, taxonomy.template)
        ramp = np.linspace(0, 255, 112, dtype=np.uint8)
        image = Image.fromarray(np.stack([np.tile(ramp, (112, 1)), np.tile(ramp[:, None], (1, 112)),
                                          np.full((112, 112), 128, np.uint8)], axis=-1))
        source = "synthetic image and prompt"
    batch, _, _ = SequenceBuilder(processor, taxonomy.template.system).teacher_forced(
        prompt, [image], answer_segments(category, values, taxonomy.template))
    return batch, source


@torch.no_grad()
def probe_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _check_out(out: Path, run_dir: Path, base: str | None = None, data: str | None = None) -> None:
    """Refuse an output that is, holds or sits in an input (run, base, data), or holds anything but an earlier
    merge of this run."""
    run = run_dir.resolve()
    guard_outputs({"the run dir": run_dir, "the base model": base if base and Path(base).exists() else None,
                   "the run's data": data if data and Path(data).exists() else None}, {"--out": out})
    check_writable(out, "--out", "dir")
    if out.is_dir() and any(out.iterdir()):
        try:
            meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("stage") != "merge" or meta.get("source_run") != str(run):
            raise VlmtaxError(f"--out {out} already holds something else", "choose an empty or new folder for --out")


def merge_dtype(name: str, model_dir: ModelDir, device: torch.device) -> torch.dtype:
    """auto = the run's training precision (its compute dtype for QLoRA), fp32 when unknown; on a GPU without
    bf16 in hardware a bf16 run merges in fp16 (the same rule as predict)."""
    if name != "auto":
        return check_dtype(name, device)
    precision = model_dir.meta.get("precision")
    if device.type == "cuda":
        precision = gpu_precision(precision or "fp32", device)
    return DTYPES.get(precision or "fp32", torch.float32)


def save_merged(model: Any, processor: Any, taxonomy: Taxonomy, model_dir: ModelDir, folder: Path,
                meta: dict[str, Any]) -> None:
    model.save_pretrained(str(folder), max_shard_size=MAX_SHARD_SIZE)
    processor.save_pretrained(str(folder))
    taxonomy.save(folder / TAXONOMY_FILE)
    for root in run_roots(model_dir.path):
        if (root / "recipe.yaml").is_file():
            shutil.copyfile(root / "recipe.yaml", folder / "recipe.yaml")
            break
    write_json(folder / META_FILE, meta)


def verify(v: Verification, stage: str) -> None:
    """Raise unless the adapter changes the base and the merged (or reloaded) model reproduces the adapter."""
    if v.base_vs_adapter <= v.tolerance:
        raise VlmtaxError(
            f"the adapter changes nothing: base and adapter logits differ by at most {v.base_vs_adapter:.3g} "
            f"(tolerance {v.tolerance:.3g})", "check that training ran (loss fell) and that this is the right run dir")
    diff = v.merged_vs_adapter if stage == "merged" else v.reloaded_vs_adapter
    if diff > v.tolerance:
        what = "the merged model" if stage == "merged" else "the saved merged folder, reloaded,"
        raise VlmtaxError(
            f"verification failed: {what} does not reproduce the adapter's logits (max |diff| {diff:.3g} > "
            f"tolerance {v.tolerance:.3g}); nothing was written",
            "merge in fp32 (--dtype fp32); if it persists, report it with the run's vlmtax_meta.json")


def merge(run_dir: str | Path, out: str | Path, dtype: str = "auto", device: str | None = None) -> Path | None:
    """Fold the run's adapter into its base, verify, write `out` atomically; None for runs that need no merge.

    `device`: cpu, cuda or cuda:N (default: the first GPU, else the CPU). A QLoRA run whose 16-bit reload does
    not fit the GPU merges with device="cpu" (see docs/troubleshooting.md for the RAM it needs)."""
    run_dir, out = Path(run_dir), Path(out)
    model_dir = inspect_model_dir(run_dir)
    if model_dir.kind != "adapter":
        what = "fully fine-tuned" if model_dir.finetuning == "full" else "plain model"
        print(f"{run_dir} holds {what} weights and needs no merge; nothing copied. "
              f"Use it as it is: vlmtax predict --model {run_dir} ...", flush=True)
        return None
    _check_out(out, run_dir, model_dir.base, model_dir.meta.get("data"))
    dev = default_device(device)
    torch_dtype = merge_dtype(dtype, model_dir, dev)
    taxonomy = load_taxonomy(run_dir, None)
    remote = model_dir.trust_remote_code
    processor = load_processor(model_dir.path, fallback=model_dir.base, padding_side=None, trust_remote_code=remote)
    batch, source = probe_inputs(processor, taxonomy, model_dir.meta)

    peft_model = attach_adapter(load_weights(model_dir.base, torch_dtype, "base model", remote), model_dir).to(dev)
    adapter = probe_logits(peft_model, batch)
    with peft_model.disable_adapter():
        base = probe_logits(peft_model, batch)
    merged_model = fold_adapter(peft_model)
    merged = probe_logits(merged_model, batch)
    tolerance = RELATIVE_TOLERANCE[torch_dtype] * max(1.0, float(adapter.abs().max()))
    check = Verification(_max_diff(merged, adapter), float("nan"), _max_diff(base, adapter), tolerance, source)
    verify(check, "merged")

    name = {v: k for k, v in DTYPES.items()}[torch_dtype]
    sft_meta = {k: v for k, v in model_dir.meta.items() if k not in ("history", "versions")}
    with atomic_dir(out) as tmp:
        meta = run_meta(stage="merge", source_run=str(run_dir.resolve()), base_model=model_dir.base,
                        trust_remote_code=remote, dtype=name,
                        finetuning="lora", data=model_dir.meta.get("data"), source_meta=sft_meta)
        save_merged(merged_model, processor, taxonomy, model_dir, tmp, meta)
        del merged_model, peft_model
        reloaded = probe_logits(load_weights(tmp, torch_dtype, "merged model", remote).to(dev), batch)
        check.reloaded_vs_adapter = _max_diff(reloaded, adapter)
        verify(check, "reloaded")
        meta["verification"] = asdict(check)
        write_json(tmp / META_FILE, meta)
    print(f"verified on {source} ({name}): max |logit diff| merged vs adapter {check.merged_vs_adapter:.3g}, "
          f"reloaded vs adapter {check.reloaded_vs_adapter:.3g} (tolerance {tolerance:.3g}); "
          f"base vs adapter {check.base_vs_adapter:.3g} (the adapter changes the model)", flush=True)
    print(f"merged model written to {out}", flush=True)
    return out
