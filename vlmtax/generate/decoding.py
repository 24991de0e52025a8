"""The decoding stage: a batch of (image, category) -> attribute values, constrained to the taxonomy or free.

Constrained decoding spends exactly one forward pass per attribute (forward calls per batch = the most
attributes of a category in it), never one on a token that the format or the vocabulary already fixes:

1. Attribute i: ONE forward over, per row, [forced text not yet cached] + [every allowed value of
   attribute i, side by side]. Forced text is the previous attribute's chosen value and the template's
   fixed text before this attribute's value (`\\nneck:`, or `", "neck": "` in JSON); for the first
   attribute it is the templated prompt with its image (left padded) and the first fixed text, so the
   prefill costs no forward of its own. A custom 4D mask lets each value see the cache, the forced text
   and its own earlier tokens only; explicit M-RoPE positions start every value right after the forced
   text. So each value is scored exactly as if it were the sole continuation (a tree sharing one
   prefix), which the tests check against a teacher-forced forward pass.
2. A value's score is the log-likelihood of its tokens plus that of the token that closes it (the first
   token of the next fixed text, or of the closing text, or <|im_end|>): a value that is a prefix of
   another ("blue", "blue green") then competes fairly. Probabilities are the softmax of the scores over
   the allowed values.
3. The values' cache entries are cropped away; the chosen value is fed as forced text in the next step.

Cost: a step processes rows x (forced + all value tokens) tokens; memory is one KV cache row per input
row (values never get cache copies of the prompt). Value scores are `logit[target] - logsumexp(logits)`
over chunks of positions, so the full (rows, values' tokens, vocabulary) logits never exist at once.

Every piece is tokenised segment by segment with `chat.SegmentTokenizer`, exactly as in training.
A family whose layers are not all attention (Qwen3.5's linear-attention recurrences: `models/families.py`, tree_mask)
cannot lay values side by side; `decoding_rows.py` gives each value its own row instead, with the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmtax.data.answer import DEFAULT_TEMPLATE, escape, layout, parse_answer, render_prompt, snap
from vlmtax.data.chat import SegmentTokenizer, SequenceBuilder
from vlmtax.data.taxonomy import Category
from vlmtax.data.template import Template
from vlmtax.errors import VlmtaxError
from vlmtax.generate.decoding_rows import RowResult, decode_rowwise, tree_mask
from vlmtax.models.families import family_of

# fp32 logits scored at once (16 MiB): 27 positions of Qwen2-VL's 151,936-token vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Slot:
    """One attribute of a category, its allowed values laid side by side as one token block."""

    attribute: str
    values: list[str]
    value_ids: list[tuple[int, ...]]
    next_ids: tuple[int, ...]  # forced text after the value: the next fixed text, or the closing one + end of turn
    first: list[int]  # first token of each value, scored from the forced text's last position
    tokens: list[int]  # every value's tokens, concatenated (S of them)
    owner: list[int]  # index of the value each token belongs to
    offset: list[int]  # position of the token inside its value
    target: list[int]  # token scored at each position: the value's next token, or the closing one


@dataclass(frozen=True)
class Plan:
    key0: tuple[int, ...]
    slots: list[Slot]
    max_tokens: int  # longest possible answer, end of turn included (free generation's budget)


class AnswerPlans:
    """Token plans per category, built once (keys and values repeat across every row)."""

    def __init__(self, tokenizer: Any, template: Template = DEFAULT_TEMPLATE):
        self.segments = SegmentTokenizer(tokenizer)
        self.template = template
        self._plans: dict[str, Plan] = {}
        self._sequences: SequenceBuilder | None = None

    def sequences(self, processor: Any) -> SequenceBuilder:
        """The prompt builder for `processor` in this template (its per-category prompt ids are kept)."""
        if self._sequences is None or self._sequences.processor is not processor:
            self._sequences = SequenceBuilder(processor, self.template.system)
        return self._sequences

    def __call__(self, category: Category) -> Plan:
        if category.name not in self._plans:
            self._plans[category.name] = self._build(category)
        return self._plans[category.name]

    def _build(self, category: Category) -> Plan:
        enc = self.segments.encode
        lay = layout(category, self.template)
        keys = [enc(text) if text else () for text in lay.fixed]
        keys[-1] += self.segments.end_ids
        slots = []
        for i, attr in enumerate(category.attributes):
            next_ids = keys[i + 1]
            value_ids = [enc(lay.prefixes[i] + escape(v, self.template)) for v in attr.values]
            tokens, owner, offset, target = [], [], [], []
            for k, ids in enumerate(value_ids):
                for j, tok in enumerate(ids):
                    tokens.append(tok)
                    owner.append(k)
                    offset.append(j)
                    target.append(ids[j + 1] if j + 1 < len(ids) else next_ids[0])
            slots.append(Slot(attr.name, list(attr.values), value_ids, next_ids, [ids[0] for ids in value_ids],
                              tokens, owner, offset, target))
        longest = sum(len(k) for k in keys) + sum(max(map(len, s.value_ids)) for s in slots)
        return Plan(key0=keys[0], slots=slots, max_tokens=longest)


def encode_prompts(processor: Any, images: list[Any], categories: list[Category], device: torch.device,
                   template: Template = DEFAULT_TEMPLATE, sequences: SequenceBuilder | None = None) -> dict:
    """Templated prompts + images, left padded, built by the training builder (`chat.SequenceBuilder`: the
    processor's own output, without re-tokenising each row's expanded image tokens); pass the same
    `sequences` across batches and each category's prompt is tokenised once."""
    sequences = sequences or SequenceBuilder(processor, template.system)
    vision, counts = sequences.image_inputs(images)
    ids = [sequences.prompt_ids(render_prompt(c, template), [n]) for c, n in zip(categories, counts)]
    width, pad = max(map(len, ids)), processor.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], dtype=torch.long)
    enc = {"input_ids": input_ids, "attention_mask": mask,
           "mm_token_type_ids": (input_ids == sequences.image_pad).long() * mask, **vision}
    return {k: v.to(device) for k, v in enc.items()}


class ConstrainedDecoder:
    """Scores every allowed value of every attribute; emits the best one. Works for any model, trained or not."""

    def __init__(self, model: Any, processor: Any, template: Template = DEFAULT_TEMPLATE):
        self.model, self.processor, self.template = model, processor, template
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise VlmtaxError(f"constrained decoding needs sdpa or eager attention, not {impl}: it scores every "
                              "value through a custom 4D attention mask, which flash attention cannot take",
                              "load the model with attn_implementation='sdpa' (vlmtax's loaders do)")
        self.head = model.get_output_embeddings()
        self.vocab_size = self.head.weight.shape[0]
        self.plans = AnswerPlans(processor.tokenizer, template)
        self.pad_id = processor.tokenizer.pad_token_id
        self.family = family_of(model)
        self.forward_calls = 0

    def _prompt(self, images: list[Any], categories: list[Category]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded prompt inputs with their (M-RoPE) positions, and each row's next text position."""
        enc = encode_prompts(self.processor, images, categories, self.model.device, self.template,
                             self.plans.sequences(self.processor))
        mask2d = enc["attention_mask"]
        text = (mask2d.cumsum(-1) - 1).clamp(min=0)
        if "image_grid_thw" in enc:
            mrope, deltas = self.family.rope_index(self.model, enc)
            next_pos = mask2d.sum(-1) + deltas.view(-1)
        else:
            mrope, next_pos = None, mask2d.sum(-1)
        enc["position_ids"] = self.family.positions(text, mrope)
        return enc, next_pos

    def check_finite(self, scores: torch.Tensor, slot: Slot) -> None:
        if not torch.isfinite(scores).all():
            raise VlmtaxError(
                f"non-finite value scores while decoding in {str(self.model.dtype).removeprefix('torch.')} "
                f"(attribute {slot.attribute!r}): the activations overflowed",
                "predict with --dtype fp32 (or bf16 on a GPU that has it); fp16 overflows in Qwen2-VL")

    @torch.no_grad()
    def decode(self, images: list[Any], categories: list[Category]) -> list[RowResult]:
        """The allowed value of every attribute of every row, with each value's score. Families whose layers are all
        attention score all candidates in one tree-masked forward; the others a row of candidates each."""
        if not self.family.tree_mask:
            return decode_rowwise(self, images, categories)
        prompt, next_pos = self._prompt(images, categories)
        plans = [self.plans(c) for c in categories]
        results = [RowResult(values={}) for _ in categories]
        active = list(range(len(categories)))
        forced = [p.key0 for p in plans]
        cache, keymask, step = None, None, 0
        while active:
            slots = [plans[r].slots[step] for r in active]
            scores, cache, keymask, next_pos = self._step(cache, keymask, next_pos, forced, slots,
                                                          prompt if step == 0 else None)
            choice, listed = scores.argmax(dim=1).tolist(), scores.tolist()
            keep, forced = [], []
            for a, r in enumerate(active):
                slot, k = slots[a], choice[a]
                results[r].values[slot.attribute] = slot.values[k]
                results[r].logliks[slot.attribute] = listed[a][: len(slot.values)]
                if step + 1 < len(plans[r].slots):
                    keep.append(a)
                    forced.append(slot.value_ids[k] + slot.next_ids)
            if keep and len(keep) < len(active):
                index = torch.tensor(keep, device=keymask.device)
                cache.batch_select_indices(index)
                keymask, next_pos = keymask[index], next_pos[index]
            active = [active[a] for a in keep]
            step += 1
        return results

    def _target_logprobs(self, hidden: torch.Tensor, first: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(rows, 1 + S, K) log-probabilities: position 0 of the K first tokens, positions 1.. of their one
        target each (column 0)."""
        rows, width, _ = hidden.shape
        k = first.shape[1]
        index = torch.zeros((rows, width, k), dtype=torch.long, device=hidden.device)
        index[:, 0] = first
        index[:, 1:, 0] = target
        return self.chunked_logprobs(hidden.reshape(rows * width, -1), index.reshape(rows * width, k)).view(
            rows, width, k)

    def chunked_logprobs(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(positions, K) log-probabilities of the tokens `index` (positions, K) after each hidden state of `flat`
        (positions, hidden), as logit[target] - logsumexp(logits) over chunks of positions, so the fp32 logits held
        at once stay under LOGIT_CHUNK_ELEMENTS whatever the vocabulary and the value count."""
        picked = torch.empty(index.shape, dtype=torch.float32, device=flat.device)
        step = max(1, LOGIT_CHUNK_ELEMENTS // self.vocab_size)
        for start in range(0, flat.shape[0], step):
            logits = self.head(flat[start: start + step]).float()
            picked[start: start + step] = logits.gather(1, index[start: start + step]) - \
                torch.logsumexp(logits, dim=-1, keepdim=True)
            del logits
        return picked

    def _step(self, cache: Any, keymask: torch.Tensor | None, next_pos: torch.Tensor, forced: list[tuple[int, ...]],
              slots: list[Slot], prompt: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, Any, torch.Tensor,
                                                                                 torch.Tensor]:
        """One forward: [prompt, first step only] + forced text (right-aligned) + all values of the slot.

        Returns (rows, max values) scores (-inf past a row's values), the cache, its usable-entry mask, positions.
        """
        c_max, s_max = max(map(len, forced)), max(len(s.tokens) for s in slots)
        k_max = max(len(s.values) for s in slots)
        ids, group, pos, first, target, owner, valid = [], [], [], [], [], [], []
        for f, s, p in zip(forced, slots, next_pos.tolist()):
            lead, tail, n_values = c_max - len(f), s_max - len(s.tokens), len(s.values)
            ids.append([self.pad_id] * lead + list(f) + s.tokens + [self.pad_id] * tail)
            group.append([-1] * lead + [0] * len(f) + [k + 1 for k in s.owner] + [-1] * tail)
            start = p + len(f)
            pos.append([0] * lead + list(range(p, start)) + [start + o for o in s.offset] + [0] * tail)
            first.append(s.first + [0] * (k_max - n_values))
            target.append(s.target + [0] * tail)
            owner.append(s.owner + [k_max] * tail)  # padding sums into a spare column
            valid.append([k < n_values for k in range(k_max)])
        device = next_pos.device
        as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        ids, group, pos = as_t(ids), as_t(group), self.family.positions(as_t(pos))
        kwargs: dict[str, Any] = {"cache": cache}
        if prompt is not None:  # the prompt joins the first step: it is forced text with the prompt's positions
            width = prompt["input_ids"].shape[1]
            ids = torch.cat([prompt["input_ids"], ids], dim=1)
            group = torch.cat([torch.where(prompt["attention_mask"].bool(), 0, -1), group], dim=1)
            pos = torch.cat([prompt["position_ids"], pos], dim=-1)
            kwargs.update({k: prompt[k] for k in ("pixel_values", "image_grid_thw") if k in prompt})
            keymask = torch.zeros((len(slots), 0), dtype=torch.bool, device=device)
            c_max += width
        mask = tree_mask(keymask, group, self.model.dtype)
        self.forward_calls += 1
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
        # The last forced token predicts each value's first token; value tokens predict the rest and the closer.
        picked = self._target_logprobs(out.last_hidden_state[:, c_max - 1:], as_t(first), as_t(target))
        first_lp, token_lp = picked[:, 0], picked[:, 1:, 0]
        sums = torch.zeros((len(slots), k_max + 1), device=device).scatter_add_(1, as_t(owner), token_lp)
        valid_t = as_t(valid).bool()
        scores = first_lp + sums[:, :k_max]
        self.check_finite(scores[valid_t], slots[0])
        scores = scores.masked_fill(~valid_t, float("-inf")).cpu()
        cache = out.cache
        cache.crop(-s_max)  # drop the values' entries; the chosen one comes back as forced text
        keymask = torch.cat([keymask, group[:, :c_max] == 0], dim=1)
        return scores, cache, keymask, next_pos + torch.tensor(list(map(len, forced)), device=device)


def generate_answers(model: Any, processor: Any, images: list[Any], categories: list[Category],
                     plans: AnswerPlans) -> list[str]:
    """Plain greedy `generate` of the answer text, with a budget of the longest possible answer."""
    tok = processor.tokenizer
    enc = encode_prompts(processor, images, categories, model.device, plans.template, plans.sequences(processor))
    budget = max(plans(c).max_tokens for c in categories)
    stop = sorted({*plans.segments.end_ids, tok.eos_token_id} - {None})
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=budget, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def free_decode(model: Any, processor: Any, images: list[Any], categories: list[Category],
                plans: AnswerPlans) -> list[RowResult]:
    """Unconstrained generation parsed back; each slot snapped to its closest allowed value (and counted)."""
    results = []
    for text, category in zip(generate_answers(model, processor, images, categories, plans), categories):
        parsed = parse_answer(text, category, plans.template)
        values, snapped = {}, 0
        for attr in category.attributes:
            values[attr.name], changed = snap(parsed[attr.name], attr.values)
            snapped += changed
        results.append(RowResult(values=values, snapped=snapped))
    return results


class FreeDecoder:
    """`predict --mode free`: the decoder interface of ConstrainedDecoder over `free_decode`."""

    def __init__(self, model: Any, processor: Any, template: Template = DEFAULT_TEMPLATE):
        self.model, self.processor = model, processor
        self.plans = AnswerPlans(processor.tokenizer, template)
        self.forward_calls = 0  # only constrained decoding counts its forwards; generate's are its own

    def decode(self, images: list[Any], categories: list[Category]) -> list[RowResult]:
        return free_decode(self.model, self.processor, images, categories, self.plans)
