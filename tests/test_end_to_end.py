"""The end-to-end bar: the demo pipeline's model beats the constant baseline on what the images show.

The demo (synth -> tiny-model -> prepare -> sft -> merge -> predict -> score) runs as a user runs it.
On the attributes the synthetic images really draw (colour, pattern, sleeve length, garment length),
the fine-tuned model must beat the constant baseline (each attribute's most common training value) by
a clear margin. The threshold is checked for honesty: the same pipeline trained and evaluated on the
same catalogue with every image replaced by a blank one must fall short of it.

Status: NOT MET. With the tiny random Qwen2-VL on the CPU the model learns the label priors reliably
but learns to read colour off the images only partly and only for some seeds (the demo's run: final
0.448 vs baseline 0.416, visible-attribute gain +0.036, all of it colour; seed 1: +0.004), and never
pattern, sleeve length or garment length. So this module runs only when asked
(`VLMTAX_E2E=1 pytest tests/test_end_to_end.py`, about 4 minutes) and is kept out of CI until the
demo model learns to see reliably; it fails today.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmtax.demo import demo

pytestmark = pytest.mark.skipif(os.environ.get("VLMTAX_E2E") != "1",
                                reason="end-to-end bar not met yet (see module docstring); VLMTAX_E2E=1 runs it")

VISIBLE = ("color", "pattern", "sleeve_length", "length")
MARGIN = 0.03  # mean gain over the baseline on the visible attributes, in metric points
COLOUR_MARGIN = 0.08  # mean gain on colour alone: the attribute the tiny model does learn to see


def visible_gain(report: dict, attributes: tuple[str, ...] = VISIBLE) -> tuple[float, dict[str, float]]:
    """Mean of (model - baseline) over every (category, attribute) pair scored."""
    gains = {}
    for cat, c in report["categories"].items():
        for name, a in c["attributes"].items():
            if name in attributes and a["score"] is not None:
                gains[f"{cat}/{name}"] = a["score"] - a["baseline"]
    return sum(gains.values()) / len(gains), gains


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("e2e") / "demo"
    return demo(work), work


def test_demo_model_beats_the_constant_baseline_on_visible_attributes(demo_report):
    report, work = demo_report
    gain, gains = visible_gain(report)
    print(f"visible-attribute gain over baseline: {gain:.3f}", {k: round(v, 3) for k, v in gains.items()})
    assert gain >= MARGIN, gains
    assert visible_gain(report, ("color",))[0] >= COLOUR_MARGIN, gains
    assert min(gains.values()) > -0.05, gains  # nothing visible got clearly worse than the baseline
    assert report["final"] > report["baseline"]["final"]
    for artefact in ("submission.csv", "probs.jsonl", "score.json", "score.png", "run/model.safetensors"):
        assert (work / artefact).exists(), artefact


def test_the_threshold_fails_a_model_that_cannot_see(demo_report, tmp_path):
    """Same catalogue, labels and training, every image blank: the bar must not be met."""
    _, work = demo_report
    blind = tmp_path / "blind"
    shutil.copytree(work / "catalogue", blind / "catalogue")
    for folder in ("train_images", "test_images"):
        for path in (blind / "catalogue" / folder).iterdir():
            with Image.open(path) as img:
                size = img.size
            Image.new("RGB", size, (200, 200, 200)).save(path)
    report = demo(blind)
    gain, gains = visible_gain(report)
    print(f"blank-image gain over baseline: {gain:.3f}", {k: round(v, 3) for k, v in gains.items()})
    assert gain < MARGIN
    assert visible_gain(report, ("color",))[0] < COLOUR_MARGIN
