"""Constrained decoding: always allowed values, scores equal to a teacher-forced pass, one forward per attribute."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from vlmtax.data.answer import DEFAULT_TEMPLATE, answer_segments, render_prompt
from vlmtax.data.chat import SegmentTokenizer, SequenceBuilder
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.data.template import load_template
from vlmtax.generate.decoding import AnswerPlans, ConstrainedDecoder, free_decode
from vlmtax.generate.decoding_rows import tree_mask
from vlmtax.models.loading import load_for_inference

DATA_TEMPLATES = Path(__file__).resolve().parents[2] / "data_templates"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def taxonomy(prepared_dir) -> Taxonomy:
    return Taxonomy.load(prepared_dir / "taxonomy.json")


@pytest.fixture(scope="module")
def rows(synth_dir, taxonomy):
    """Two test rows of every category, one image resized so that image token counts differ within a batch."""
    test = pd.read_csv(synth_dir / "test.csv", dtype=str)
    picked = test.groupby("Category").head(2)
    assert set(picked["Category"]) == set(taxonomy.categories)
    images = [Image.open(synth_dir / "test_images" / f"{int(i):06d}.jpg").convert("RGB") for i in picked["id"]]
    images[1] = images[1].resize((84, 140))
    return images, [taxonomy.category(c) for c in picked["Category"]]


@pytest.fixture(scope="module")
def untrained(tiny_model_dir):
    return load_for_inference(tiny_model_dir)[:2]


@pytest.fixture(scope="module")
def trained(trained_run_dir):
    return load_for_inference(trained_run_dir)[:2]


def _assert_allowed(results, categories):
    for res, cat in zip(results, categories):
        assert list(res.values) == cat.attribute_names()
        for attr in cat.attributes:
            assert res.values[attr.name] in attr.values
            assert len(res.logliks[attr.name]) == len(attr.values)


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_constrained_values_are_always_allowed_for_every_category(which, rows, request):
    model, processor = request.getfixturevalue(which)
    images, categories = rows
    decoder = ConstrainedDecoder(model, processor)
    results = decoder.decode(images, categories)
    _assert_allowed(results, categories)
    # One forward per attribute of the longest category: the prompt rides along with the first one.
    assert decoder.forward_calls == max(len(c.attributes) for c in categories)
    for size in (1, 3):  # other batch compositions give the same answers
        again = [r for i in range(0, len(images), size)
                 for r in decoder.decode(images[i: i + size], categories[i: i + size])]
        assert [r.values for r in again] == [r.values for r in results]


def _teacher_forced(model, processor, image, category, values, template=DEFAULT_TEMPLATE):
    """Per attribute: log-likelihood of the value's tokens plus the token closing it, from one plain forward."""
    batch, start, owners = SequenceBuilder(processor, template.system).teacher_forced(
        render_prompt(category, template), [image], answer_segments(category, values, template))
    with torch.no_grad():
        logits = model(**batch).logits[0]
    logp, ids, out = torch.log_softmax(logits.float(), -1), batch["input_ids"], {}
    for attr in category.attributes:
        idx = [start + j for j, o in enumerate(owners) if o == attr.name]
        scored = idx + [idx[-1] + 1]  # the value's tokens, then the first token after it
        out[attr.name] = sum(float(logp[i - 1, ids[0, i]]) for i in scored)
    return out


@pytest.mark.parametrize("run", ["trained_run_dir", "json_run_dir"])
def test_scores_equal_a_teacher_forced_forward_pass(run, rows, request):
    """For the lines layout and for a run trained on JSON answers (data_templates/json.yaml)."""
    run_dir = request.getfixturevalue(run)
    model, processor = load_for_inference(run_dir)[:2]
    tax = Taxonomy.load(run_dir / "taxonomy.json")
    images, categories = rows[0], [tax.category(c.name) for c in rows[1]]
    results = ConstrainedDecoder(model, processor, tax.template).decode(images, categories)
    for image, cat, res in zip(images, categories, results):
        forced = _teacher_forced(model, processor, image, cat, res.values, tax.template)
        for attr in cat.attributes:
            chosen = res.logliks[attr.name][attr.values.index(res.values[attr.name])]
            assert chosen == pytest.approx(forced[attr.name], abs=1e-4)
            assert chosen == max(res.logliks[attr.name])
    # Every alternative value of the first and the last attribute of one row, in its own context.
    image, cat, res = images[1], categories[1], results[1]
    for attr in (cat.attributes[0], cat.attributes[-1]):
        for k, value in enumerate(attr.values[:6]):
            forced = _teacher_forced(model, processor, image, cat, {**res.values, attr.name: value}, tax.template)
            assert res.logliks[attr.name][k] == pytest.approx(forced[attr.name], abs=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_scores_equal_teacher_forcing_in_every_family(family, family_model_dirs, rows):
    """Positions (rope index, DeepStack, interleaved M-RoPE) and the tree mask hold in each attention-only family;
    Qwen3.5's recurrent layers get a row per candidate, the batch's rows together (decoding_rows.py), scored alike."""
    model, processor = load_for_inference(family_model_dirs[family])[:2]
    images, categories = rows
    images, categories = images[:4], categories[:4]
    decoder = ConstrainedDecoder(model, processor)
    results = decoder.decode(images, categories)
    _assert_allowed(results, categories)
    most = max(len(c.attributes) for c in categories)
    if decoder.family.tree_mask:
        assert decoder.forward_calls == most
    else:  # the prompts, a branch per attribute, an advance after some (test below)
        assert most + 1 <= decoder.forward_calls <= 2 * most
    assert [r.values for r in decoder.decode(images[1:2], categories[1:2])] == [results[1].values]
    for image, cat, res in zip(images, categories, results):
        forced = _teacher_forced(model, processor, image, cat, res.values)
        for attr in cat.attributes:
            chosen = res.logliks[attr.name][attr.values.index(res.values[attr.name])]
            assert chosen == pytest.approx(forced[attr.name], abs=1e-4)
    image, cat, res = images[1], categories[1], results[1]
    attr = cat.attributes[0]
    for k, value in enumerate(attr.values[:6]):  # alternatives, shorter and longer than the chosen value
        forced = _teacher_forced(model, processor, image, cat, {**res.values, attr.name: value})
        assert res.logliks[attr.name][k] == pytest.approx(forced[attr.name], abs=1e-4)


def test_hybrid_batch_mixes_chosen_values_of_different_token_lengths(family_model_dirs, rows, monkeypatch):
    """Qwen3.5, one batch of every category (prompts of different lengths, left padded): at one step the rows' chosen
    values differ in token length, so some candidate rows end in padding. Both ways a state moves on are taken (a
    chosen row that ended unpadded carries it; else one advance of a common length), every score equals teacher
    forcing, and a branch split by the state-copy budget scores the same."""
    import vlmtax.generate.decoding_rows as decoding_rows

    model, processor = load_for_inference(family_model_dirs["qwen3_5"])[:2]
    images, categories = rows
    decoder = ConstrainedDecoder(model, processor)
    results = decoder.decode(images, categories)
    plans = [decoder.plans(c) for c in categories]
    lengths = [{len(p.slots[i].value_ids[p.slots[i].values.index(r.values[p.slots[i].attribute])])
                for p, r in zip(plans, results) if i < len(p.slots)} for i in range(max(len(p.slots) for p in plans))]
    assert any(len(n) > 1 for n in lengths), lengths
    most = max(len(c.attributes) for c in categories)
    assert most + 1 < decoder.forward_calls < 2 * most
    for image, cat, res in zip(images, categories, results):
        forced = _teacher_forced(model, processor, image, cat, res.values)
        for attr in cat.attributes:
            chosen = res.logliks[attr.name][attr.values.index(res.values[attr.name])]
            assert chosen == pytest.approx(forced[attr.name], abs=1e-4)
    monkeypatch.setattr(decoding_rows, "BRANCH_STATE_BYTES", 1)  # every input row branches in a forward of its own
    split = ConstrainedDecoder(model, processor).decode(images[:2], categories[:2])
    for a, b in zip(results, split):
        assert a.values == b.values
        for name in a.logliks:
            assert a.logliks[name] == pytest.approx(b.logliks[name], abs=1e-5)


@pytest.mark.parametrize("template", ["lines", "json", "json_with_values"])
def test_plan_tokens_are_the_training_tokens(untrained, taxonomy, template):
    _, processor = untrained
    template = load_template(DATA_TEMPLATES / f"{template}.yaml")
    plans, seg = AnswerPlans(processor.tokenizer, template), SegmentTokenizer(processor.tokenizer)
    for cat in taxonomy.categories.values():
        plan = plans(cat)
        values = {a.name: a.values[-1] for a in cat.attributes}
        ids = list(plan.key0)
        for slot in plan.slots:
            ids += list(slot.value_ids[slot.values.index(values[slot.attribute])]) + list(slot.next_ids)
        assert ids == seg.answer(answer_segments(cat, values, template))[0]
        assert plan.max_tokens >= len(ids)


def test_tree_mask_isolates_candidates():
    # Cache of 2 (second unusable), forced token, value 0 (2 tokens), value 1 (1 token), padding.
    group = torch.tensor([[0, 1, 1, 2, -1]])
    allowed = tree_mask(torch.tensor([[True, False]]), group, torch.float32)[0, 0] == 0
    expect = torch.tensor([
        [1, 0, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expect)


def test_free_decoding_snaps_to_allowed_values(untrained, rows):
    model, processor = untrained
    images, categories = rows
    results = free_decode(model, processor, images[:3], categories[:3], AnswerPlans(processor.tokenizer))
    for res, cat in zip(results, categories):
        assert all(res.values[a.name] in a.values for a in cat.attributes)
        assert 0 <= res.snapped <= len(cat.attributes)
    assert sum(r.snapped for r in results) > 0  # a random model does not write the format


def test_scores_are_computed_in_bounded_chunks(untrained, rows, monkeypatch):
    """No head call projects more positions than the chunk bound allows, and chunking changes no score."""
    import vlmtax.generate.decoding as decoding

    model, processor = untrained
    images, categories = rows[0][:4], rows[1][:4]
    whole = ConstrainedDecoder(model, processor).decode(images, categories)
    decoder = ConstrainedDecoder(model, processor)
    monkeypatch.setattr(decoding, "LOGIT_CHUNK_ELEMENTS", decoder.vocab_size * 5)
    head, sizes = decoder.head, []

    def recording_head(hidden):
        sizes.append(hidden.shape[:-1].numel())
        return head(hidden)

    decoder.head = recording_head
    chunked = decoder.decode(images, categories)
    assert sizes and max(sizes) <= 5
    for a, b in zip(whole, chunked):
        assert a.values == b.values
        for name in a.logliks:
            assert a.logliks[name] == pytest.approx(b.logliks[name], abs=1e-5)


def test_decoder_refuses_flash_attention_and_non_finite_scores(untrained, rows):
    from types import SimpleNamespace

    from vlmtax.errors import VlmtaxError

    fake = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(VlmtaxError, match="sdpa or eager.*flash_attention_2"):
        ConstrainedDecoder(fake, untrained[1])
    decoder = ConstrainedDecoder(*untrained)
    head = decoder.head
    decoder.head = lambda hidden: head(hidden) * float("inf")  # what an fp16 overflow leaves behind
    with pytest.raises(VlmtaxError, match=r"non-finite value scores while decoding in float32") as err:
        decoder.decode(rows[0][:2], rows[1][:2])
    assert "--dtype fp32" in err.value.fix


@pytest.mark.parametrize("template", ["lines", "json"])
def test_prompts_equal_the_processor_output_left_padded(template, rows, untrained):
    """The decoders' prompts (the training builder, image tokens expanded from each image's grid) equal the
    processor's own call on the templated texts, padding and image sizes differing within the batch."""
    from vlmtax.data.chat import prompt_text
    from vlmtax.generate.decoding import encode_prompts

    _, processor = untrained
    images, categories = rows
    tmpl = load_template(DATA_TEMPLATES / f"{template}.yaml")
    ours = encode_prompts(processor, images, categories, torch.device("cpu"), tmpl)
    texts = [prompt_text(processor, render_prompt(c, tmpl), tmpl.system) for c in categories]
    theirs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(ours) == set(theirs)
    assert (theirs["attention_mask"] == 0).any()  # left padding is exercised
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
