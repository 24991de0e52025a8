"""`vlmtax ...` as a launched rank, whose loss is NaN on rank 1 only (tests/generate/test_sft.py and test_classify.py
launch it): the generate route's cross-entropy and the classify route's per-category loss are patched."""

import os
import sys

import torch

if os.environ.get("RANK") == "1":
    _cross_entropy = torch.nn.functional.cross_entropy
    torch.nn.functional.cross_entropy = lambda *a, **k: _cross_entropy(*a, **k) * float("nan")
    import vlmtax.heads.losses  # before vlmtax.heads.trainer imports the name

    _category_loss = vlmtax.heads.losses.category_loss

    def _nan_category_loss(*args, **kwargs):
        total, count = _category_loss(*args, **kwargs)
        return total * float("nan"), count

    vlmtax.heads.losses.category_loss = _nan_category_loss

from vlmtax.cli import main  # noqa: E402

sys.argv = ["vlmtax", *sys.argv[1:]]
main()
