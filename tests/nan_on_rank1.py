"""`vlmtax ...` as a launched rank, whose loss is NaN on rank 1 only (tests/test_sft.py launches it)."""

import os
import sys

import torch

if os.environ.get("RANK") == "1":
    _cross_entropy = torch.nn.functional.cross_entropy
    torch.nn.functional.cross_entropy = lambda *a, **k: _cross_entropy(*a, **k) * float("nan")

from vlmtax.cli import main  # noqa: E402

sys.argv = ["vlmtax", *sys.argv[1:]]
main()
