"""Load a `vlmtax prepare` output folder through LLaMA-Factory's own dataset parser and converter.

LLaMA-Factory is not a vlmtax dependency (it pins its own transformers); install it beside vlmtax without its
dependencies and run this with it on the path:

    pip install --target /tmp/lf --no-deps llamafactory
    PYTHONPATH=/tmp/lf python bench/llamafactory_check.py DATA_DIR

It reads DATA_DIR/dataset_info.json with `get_dataset_list`, loads vlmtax_train and vlmtax_val with `datasets`,
converts the first record of each with LLaMA-Factory's converter for its formatting (sharegpt or alpaca), and
prints the prompt-free fields (_response, _system, _images). Audio/video packages its multimodal plugin imports
at module level are stubbed: images are all vlmtax uses.
"""
import importlib.abc
import importlib.machinery
import json
import sys
import types
from unittest import mock

MISSING = ("torchaudio", "av", "librosa", "soundfile", "decord", "cv2")


class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock()
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, Stub())

import datasets  # noqa: E402
from llamafactory.data.converter import get_dataset_converter  # noqa: E402
from llamafactory.data.parser import get_dataset_list  # noqa: E402

data_dir = sys.argv[1]
for attr in get_dataset_list(["vlmtax_train", "vlmtax_val"], data_dir):
    ds = datasets.load_dataset("json", data_files=f"{data_dir}/{attr.dataset_name}", split="train")
    args = types.SimpleNamespace(media_dir=data_dir, dataset_dir=data_dir)
    ex = get_dataset_converter(attr.formatting, attr, args)(ds[0])
    print(attr.formatting, attr.dataset_name, json.dumps({k: ex[k] for k in ("_response", "_system", "_images")}))
