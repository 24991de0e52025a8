"""The generate route's decoders: a VLM run's constrained (or free) decoder for predict, and the same decoder on the
model being trained for the validation metric during sft."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtax.data.taxonomy import Taxonomy
from vlmtax.data.template import Template
from vlmtax.generate.decoding import ConstrainedDecoder, FreeDecoder
from vlmtax.inference.rows import Row, decode_batch, make_batches
from vlmtax.models.loading import load_for_inference


def vlm_decoder(vlm_path: Path, tax: Taxonomy, dtype: str, device: str | None, mode: str) -> Any:
    """The VLM at `vlm_path` (a run dir, checkpoint or merged folder) with the constrained or free decoder."""
    loaded, processor, _ = load_for_inference(vlm_path, dtype=dtype, device=device)
    return (ConstrainedDecoder if mode == "constrained" else FreeDecoder)(loaded, processor, tax.template)


PredictRows = Callable[[Any, list[Row]], dict[int, dict[str, Any]]]


def generate_route(processor: Any, batch_size: int, template: Template) -> PredictRows:
    """The generate route's rows -> records: predict's constrained decoder on the model being trained, in the
    run's answer layout (`template`, the taxonomy's), as predict decodes the finished run."""
    def run(model: Any, rows: list[Row]) -> dict[int, dict[str, Any]]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA stays active
        decoder = ConstrainedDecoder(base, processor, template)
        done: dict[int, dict[str, Any]] = {}
        for batch in make_batches(rows, batch_size):
            done.update((rec["row"], rec) for rec in decode_batch(decoder, batch, False))
        return done

    return run
