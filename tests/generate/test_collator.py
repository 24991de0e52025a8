"""collator: labels are -100 on prompt, image and padding tokens and on masked values, ids elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from vlmtax.data.answer import answer_segments
from vlmtax.data.chat import TokenCounter
from vlmtax.data.records import load_image
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.generate.collator import IGNORE, Collator, record_lengths


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, prepared_dir: Path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    taxonomy = Taxonomy.load(prepared_dir / "taxonomy.json")
    records = json.loads((prepared_dir / "train.json").read_text())
    return processor, taxonomy, records


def test_label_mask_token_by_token(setup):
    processor, taxonomy, records = setup
    tok = processor.tokenizer
    short, long_ = sorted(records[:6], key=lambda r: len(r["messages"][1]["content"]))[0], records[0]
    masked_attr = taxonomy.category(long_["category"]).attributes[1].name
    long_ = {**long_, "masked": [masked_attr]}
    batch = Collator(processor, taxonomy, [long_, short], max_length=4096)([{"index": 0}, {"index": 1}])
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for row, rec in enumerate((long_, short)):
        ids, labels, attn = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(attn.sum())
        answer_start = int((labels != IGNORE).nonzero()[0])
        # Prompt (with every image token) carries no loss.
        assert (labels[:answer_start] == IGNORE).all()
        assert (ids[:answer_start] == image_pad).sum() > 0
        assert (ids[answer_start:n] != image_pad).all()
        # Padding carries no loss and no attention.
        assert (labels[n:] == IGNORE).all() and (attn[n:] == 0).all()
        # The answer region decodes to the record's answer, then the end-of-turn token.
        assert tok.decode(ids[answer_start:n]) == rec["messages"][1]["content"] + "<|im_end|>"
        kept = labels[answer_start:n]
        ignored = (kept == IGNORE).nonzero().flatten().tolist()
        if rec["masked"]:
            value = " " + rec["attributes"][masked_attr]
            value_ids = tok.encode(value, add_special_tokens=False)
            assert len(ignored) == len(value_ids)
            assert ids[answer_start:n][ignored].tolist() == value_ids
        else:
            assert ignored == []
            assert torch.equal(kept, ids[answer_start:n])
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == image_pad).sum()


def test_batch_equals_the_processor_record_by_record(setup):
    """The collator's fast path (one image-processor call, cached prompt ids) equals the processor's output."""
    processor, taxonomy, records = setup
    from vlmtax.data.chat import prompt_text

    recs = records[:6]
    lengths = record_lengths(processor, taxonomy, recs, 3136, 12845056)
    collator = Collator(processor, taxonomy, recs, max_length=4096)
    batch = collator([{"index": i} for i in range(len(recs))])
    pixels = []
    for row, (rec, n) in enumerate(zip(recs, lengths)):
        enc = processor(text=[prompt_text(processor, rec["messages"][0]["content"])],
                        images=[load_image(rec["images"][0])], return_tensors="pt")
        answer = collator.segments.answer(answer_segments(taxonomy.category(rec["category"]), rec["attributes"]))[0]
        expected = enc["input_ids"][0].tolist() + answer
        assert batch["input_ids"][row, :n].tolist() == expected
        assert int(batch["attention_mask"][row].sum()) == n == rec["n_tokens"]
        assert batch["mm_token_type_ids"][row, :n].tolist() == enc["mm_token_type_ids"][0].tolist() + [0] * len(answer)
        pixels.append(enc["pixel_values"])
    torch.testing.assert_close(batch["pixel_values"], torch.cat(pixels))


def test_token_count_at_a_pixel_budget_matches_the_processor(setup, tmp_path: Path):
    processor, taxonomy, records = setup
    from PIL import Image

    from vlmtax.data.chat import prompt_text

    image = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(image)
    rec = {**records[0], "images": [str(image)]}
    cat = taxonomy.category(rec["category"])
    counted = TokenCounter(processor, 3136, 12544).count(
        rec["messages"][0]["content"], answer_segments(cat, rec["attributes"]), 300, 200)
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12544}
    try:
        enc = processor(text=[prompt_text(processor, rec["messages"][0]["content"])],
                        images=[Image.open(image).convert("RGB")], return_tensors="pt")
        answer = Collator(processor, taxonomy, [rec], 4096).segments.answer(answer_segments(cat, rec["attributes"]))
        answer = answer[0]
    finally:
        processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    assert counted == enc["input_ids"].shape[1] + len(answer)
    assert counted < TokenCounter(processor, 3136, 12845056).count(
        rec["messages"][0]["content"], answer_segments(cat, rec["attributes"]), 300, 200)


def test_over_long_record_is_an_error_never_truncated(setup):
    processor, taxonomy, records = setup
    with pytest.raises(VlmtaxError, match="train.max_length"):
        Collator(processor, taxonomy, records, max_length=20)([{"index": 0}])


def test_a_template_with_system_text_and_allowed_values_is_counted_and_collated_alike(setup):
    """json_with_values: system text and the value lists are in the prompt; prepare's count equals the batch."""
    from conftest import DATA_TEMPLATES

    from vlmtax.data.answer import render_answer, render_prompt, with_template
    from vlmtax.data.prepare_write import make_record

    processor, taxonomy, records = setup
    tax = with_template(taxonomy, DATA_TEMPLATES / "json_with_values.yaml")
    cat = tax.category(records[0]["category"])
    prompt = render_prompt(cat, tax.template)
    rec = make_record("sharegpt", prompt, render_answer(cat, records[0]["attributes"], tax.template),
                      records[0]["images"][0], {k: records[0][k] for k in ("id", "category", "attributes", "masked")},
                      tax.template.system)
    batch = Collator(processor, tax, [rec], 4096)([{"index": 0}])
    width, height = load_image(rec["images"][0]).size
    counted = TokenCounter(processor, 3136, 12845056, tax.template.system).count(
        prompt, answer_segments(cat, rec["attributes"], tax.template), width, height)
    assert counted == batch["input_ids"].shape[1]
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert tax.template.system in text and f"{cat.attributes[0].name}: {', '.join(cat.attributes[0].values)}" in text
    answer = batch["input_ids"][0][batch["labels"][0] != IGNORE]
    assert processor.tokenizer.decode(answer).startswith('{"')
