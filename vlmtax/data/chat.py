"""Record -> token ids: the chat template around the prompt, the answer tokenised segment by segment.

Training (the collator), merge's verification probe, token counting (prepare --model) and constrained
decoding all go through these functions, so the tokens a value is scored with at prediction time are
exactly the tokens it was trained on. `SequenceBuilder` is the one place that joins prompt, image tokens
and answer ids into a teacher-forced sequence.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pandas as pd
import torch

from vlmtax.data.answer import IMAGE_PLACEHOLDER, Segment, answer_segments, render_prompt
from vlmtax.data.taxonomy import Taxonomy

END_OF_TURN = "<|im_end|>"


def user_messages(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """Turn a prompt with `<image>` placeholders into chat-template content parts (after the template's system
    text, if it sets one)."""
    content: list[dict[str, Any]] = []
    for i, part in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    head = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    return head + [{"role": "user", "content": content}]


def prompt_text(processor: Any, prompt: str, system: str | None = None) -> str:
    """The templated user turn (after the template's system text, if any) plus the assistant header, ready
    for the answer tokens. Thinking off: Qwen3.5's template then closes an empty think block, so the answer
    follows directly. Passed only to a template that reads it: transformers warns on every call about a
    keyword the template does not use."""
    thinking = {"enable_thinking": False} if "enable_thinking" in str(processor.chat_template or "") else {}
    return processor.apply_chat_template(user_messages(prompt, system), tokenize=False, add_generation_prompt=True,
                                         **thinking)


class SegmentTokenizer:
    """Tokenises answer segments one at a time (cached: keys and values repeat across records)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._encode = lru_cache(maxsize=65536)(self._encode_uncached)
        self.end_ids = tuple(tokenizer.encode(END_OF_TURN, add_special_tokens=False))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> tuple[int, ...]:
        return self._encode(text)

    def answer(self, segments: list[Segment]) -> tuple[list[int], list[str | None]]:
        """Answer ids followed by the end-of-turn token; each id tagged with its value's attribute."""
        ids: list[int] = []
        owners: list[str | None] = []
        for seg in segments:
            piece = self.encode(seg.text)
            ids.extend(piece)
            owners.extend([seg.attribute] * len(piece))
        ids.extend(self.end_ids)
        owners.extend([None] * len(self.end_ids))
        return ids, owners


def image_token_count(processor: Any, width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """How many <|image_pad|> tokens the processor expands one image of this size into."""
    ip = processor.image_processor
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}  # the processor's own names for the budget
    patches = ip.get_number_of_image_patches(height, width, {"size": size})
    return patches // (ip.merge_size**2)


class TokenCounter:
    """Tokens of a record exactly as the collator builds it: templated prompt, image pads, answer, end of turn."""

    def __init__(self, processor: Any, min_pixels: int, max_pixels: int, system: str | None = None):
        self.processor, self.system = processor, system
        self.segments = SegmentTokenizer(processor.tokenizer)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._prompt: dict[str, int] = {}
        self._image: dict[tuple[int, int], int] = {}

    def count(self, prompt: str, segments: list[Segment], width: int, height: int) -> int:
        if prompt not in self._prompt:
            # The template holds one <|image_pad|> that the processor expands; counted with the image below.
            text = prompt_text(self.processor, prompt, self.system)
            self._prompt[prompt] = len(self.segments.encode(text)) - prompt.count(IMAGE_PLACEHOLDER)
        if (width, height) not in self._image:
            self._image[(width, height)] = image_token_count(
                self.processor, width, height, self.min_pixels, self.max_pixels)
        n_images = prompt.count(IMAGE_PLACEHOLDER)
        return self._prompt[prompt] + n_images * self._image[(width, height)] + len(self.segments.answer(segments)[0])


def image_pad_id(processor: Any) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))


class SequenceBuilder:
    """Prompt + image tokens + answer ids of one record, as the model is trained on them.

    The templated prompt is tokenised once per distinct prompt and its <|image_pad|> expanded to each
    image's token count; this equals the processor's own output record by record (tested), at a fraction
    of the cost.
    """

    def __init__(self, processor: Any, system: str | None = None):
        self.processor, self.system = processor, system  # the template's system text
        self.segments = SegmentTokenizer(processor.tokenizer)
        self.image_pad = image_pad_id(processor)
        self.merge = processor.image_processor.merge_size ** 2
        self._prompts: dict[str, tuple[int, ...]] = {}

    def image_inputs(self, images: list[Any]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel values and grids of `images` in one image-processor call; each image's token count."""
        if not images:
            return {}, []
        vision = self.processor.image_processor(images=images, return_tensors="pt")
        return {k: vision[k] for k in ("pixel_values", "image_grid_thw")}, self.image_tokens(vision["image_grid_thw"])

    def image_tokens(self, grids: torch.Tensor) -> list[int]:
        """Each image's token count from its patch grid."""
        return (grids.prod(-1) // self.merge).tolist()

    def prompt_ids(self, prompt: str, image_tokens: list[int]) -> list[int]:
        if prompt not in self._prompts:
            self._prompts[prompt] = self.segments.encode(prompt_text(self.processor, prompt, self.system))
        ids: list[int] = []
        counts = iter(image_tokens)
        for t in self._prompts[prompt]:
            ids.extend([t] * next(counts) if t == self.image_pad else (t,))
        return ids

    def build(self, prompt: str, segments: list[Segment],
              image_tokens: list[int]) -> tuple[list[int], list[int], list[str | None]]:
        """Prompt ids (image pads expanded), answer ids, and the attribute owning each answer id."""
        answer_ids, owners = self.segments.answer(segments)
        return self.prompt_ids(prompt, image_tokens), answer_ids, owners

    def teacher_forced(self, prompt: str, images: list[Any],
                       segments: list[Segment]) -> tuple[dict[str, torch.Tensor], int, list[str | None]]:
        """One record as a batch of one for a plain forward pass: the inputs, the prompt length, the owners."""
        vision, counts = self.image_inputs(images)
        prompt_ids, answer_ids, owners = self.build(prompt, segments, counts)
        ids = torch.tensor([prompt_ids + answer_ids], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 # marks image tokens for Qwen2-VL's multimodal rope (transformers 5)
                 "mm_token_type_ids": (ids == self.image_pad).long(), **vision}
        return batch, len(prompt_ids), owners


def count_tokens(processor: Any, taxonomy: Taxonomy, frame: pd.DataFrame,
                 records_meta: list[tuple[int, dict[str, str], Any]], sizes: dict[int, tuple[int, int]],
                 min_pixels: int, max_pixels: int) -> dict[int, int]:
    """prepare --model: each record's tokens, by row, as the collator will build it (image pads included)."""
    template = taxonomy.template
    counter = TokenCounter(processor, min_pixels, max_pixels, template.system)
    counts: dict[int, int] = {}
    for i, values, _ in records_meta:
        cat = taxonomy.categories[frame["Category"].iat[i]]
        counts[i] = counter.count(render_prompt(cat, template), answer_segments(cat, values, template), *sizes[i])
    return counts
