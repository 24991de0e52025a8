"""Bad input to every verb, run through the CLI in-process: one `error:` line (no traceback) or a reported
reject, the documented exit code, and every input byte-identical where an output is aimed at it.

Each case builds its own inputs in `tmp_path` (small catalogues of 32 px images) or reads the session
fixtures (tiny model, prepared data, trained run) without changing them; `protect` names the inputs whose
bytes (files, and every file under a folder) must be unchanged afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TINY_RECIPE, cli_exit_code, tiny_overrides
from PIL import Image

# Bind transformers' log handler to the session's stderr now: bound inside one case's capsys, it would write
# to a closed stream in the next case and print a logging traceback.
transformers_logging = pytest.importorskip("transformers.utils.logging")
transformers_logging.get_logger("transformers")

ATTRS = {"categories": {"Tees": ["color", "neck"], "Jeans": ["fit", "wash"]}}
ROWS = [("1", "Tees", "red", "round"), ("2", "Tees", "blue", "v"), ("3", "Tees", "black", "round"),
        ("4", "Jeans", "slim", "dark"), ("5", "Jeans", "loose", "light"), ("6", "Jeans", "slim", "light")]


class Ctx:
    """What a case can use: its tmp folder, a fresh small catalogue, and the session fixtures on demand."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self._request = tmp, request
        self.cat: dict[str, Path] = {}

    def fixture(self, name: str) -> Path:
        return self._request.getfixturevalue(name)

    def catalogue(self, rows=ROWS, attrs: Any = ATTRS, sizes: dict[str, tuple[int, int]] | None = None,
                  attrs_name: str = "attrs.json") -> dict[str, Path]:
        images = self.tmp / "images"
        images.mkdir(exist_ok=True)
        for row in rows:
            size = (sizes or {}).get(row[0], (32, 32))
            Image.new("RGB", size, (30 * int(row[0]) % 255, 90, 20)).save(images / f"{int(row[0]):06d}.jpg")
        frame = pd.DataFrame([{"id": r[0], "Category": r[1], "len": 2, "attr_1": r[2], "attr_2": r[3]}
                              for r in rows])
        frame.to_csv(self.tmp / "train.csv", index=False)
        path = self.tmp / attrs_name
        if isinstance(attrs, bytes):
            path.write_bytes(attrs)
        elif attrs_name.endswith(".parquet"):
            pd.DataFrame(attrs).to_parquet(path)
        else:
            path.write_text(json.dumps(attrs))
        self.cat = {"csv": self.tmp / "train.csv", "images": images, "attributes": path}
        return self.cat

    def prepare_args(self, out: Path | str | None = None, *extra: str) -> list[str]:
        c = self.cat or self.catalogue()
        return ["prepare", "--csv", str(c["csv"]), "--images", str(c["images"]), "--attributes",
                str(c["attributes"]), "--out", str(out if out is not None else self.tmp / "out"),
                "--val-fraction", "0", "--workers", "1", *map(str, extra)]

    def sft_args(self, out: Path, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
        return ["sft", str(TINY_RECIPE), *tiny_overrides(model or self.fixture("tiny_model_dir"),
                                                         data or self.fixture("prepared_dir"), out), *extra]

    def test_csv(self) -> Path:
        """A copy of the synthetic test CSV (a copy, so that a failed guard cannot damage the session's)."""
        dst = self.tmp / "test.csv"
        if not dst.exists():
            shutil.copyfile(self.fixture("synth_dir") / "test.csv", dst)
        return dst

    def predict_args(self, out: Path | str, *extra: str, csv: Path | None = None,
                     images: Path | None = None) -> list[str]:
        return ["predict", "--model", str(self.fixture("trained_run_dir")), "--csv", str(csv or self.test_csv()),
                "--images", str(images or self.fixture("synth_dir") / "test_images"), "--out", str(out),
                *map(str, extra)]

    def score_files(self) -> tuple[Path, Path]:
        truth, pred = self.tmp / "truth.csv", self.tmp / "pred.csv"
        if not truth.exists():
            shutil.copyfile(self.fixture("synth_dir") / "test_labels.csv", truth)
            shutil.copyfile(truth, pred)
        return truth, pred

    def score_args(self, *extra: str) -> list[str]:
        truth, pred = self.score_files()
        return ["score", "--truth", str(truth), "--pred", str(pred), *map(str, extra)]

    def run_copy(self) -> Path:
        dst = self.tmp / "runcopy"
        shutil.copytree(self.fixture("trained_run_dir"), dst, ignore=shutil.ignore_patterns("checkpoint-*"))
        return dst

    def file(self, name: str, text: str = "mine\n") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


@dataclass
class Case:
    verb: str
    name: str
    args: Callable[[Ctx], list[str]]
    code: int = 2
    error: str | None = None  # regex the single `error:` line must match
    protect: Callable[[Ctx], list[Path]] = field(default=lambda c: [])
    check: Callable[[Ctx], None] | None = None  # extra assertions after the run (rejects reported, ...)
    patch: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None
    says: str | None = None  # regex a line of stderr must match (a warning, for a run that succeeds)


def _snapshot(paths: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"
        if root.is_dir():
            out[f"{root}/"] = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*")))
    return out


def _rejects(path: Path) -> dict[str, str]:
    frame = pd.read_csv(path, dtype=str)
    return dict(zip(frame["id"], frame["reason"]))


def _symlink_out(c: Ctx) -> list[str]:
    c.catalogue()
    secret = c.file("outside/secret.jpg", "")
    Image.new("RGB", (32, 32)).save(secret, format="JPEG")
    (c.cat["images"] / "000002.jpg").unlink()
    (c.cat["images"] / "000002.jpg").symlink_to(secret)
    return c.prepare_args()


def _attrs(c: Ctx, attrs: Any, name: str = "attrs.json") -> list[str]:
    c.catalogue(attrs=attrs, attrs_name=name)
    return c.prepare_args()


def _zero_width(c: Ctx) -> list[str]:
    rows = [("1", "Tees", "red", "round"), ("2", "Tees", "red\u200b", "round"), ("3", "Tees", "ｒｅｄ", "v"),
            ("4", "Jeans", "slim", "dark")]
    c.catalogue(rows=rows)
    return c.prepare_args()


def _tax_values(c: Ctx) -> None:
    tax = json.loads((c.tmp / "out" / "taxonomy.json").read_text())
    assert tax["categories"]["Tees"]["attributes"][0]["values"] == ["red"]


def _extra_field(c: Ctx) -> list[str]:
    c.catalogue()
    lines = c.cat["csv"].read_text().splitlines()
    lines[1] = lines[1] + ",cotton, blend"  # an unquoted comma inside a value
    c.cat["csv"].write_text("\n".join(lines) + "\n")
    return c.prepare_args()


def _prepared_then_user_file(c: Ctx) -> list[str]:
    assert cli_exit_code(c.prepare_args()) == 0
    c.file("out/notes.txt")
    return c.prepare_args()


def _enospc(c: Ctx, mp: pytest.MonkeyPatch) -> None:
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(("out", ".json")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    mp.setattr(os, "replace", full)


def _interrupt(c: Ctx, mp: pytest.MonkeyPatch) -> None:
    import vlmtax.data.synth

    def stop(*a, **k):
        raise KeyboardInterrupt

    mp.setattr(vlmtax.data.synth, "synth", stop)


def _no_tensorboard(c: Ctx, mp: pytest.MonkeyPatch) -> None:
    for name in ("tensorboard", "tensorboardX"):
        mp.setitem(sys.modules, name, None)  # find_spec then answers None, as when it is not installed


def _binary(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    return path


def _data_copy(c: Ctx) -> Path:
    dst = c.tmp / "data"
    shutil.copytree(c.fixture("prepared_dir"), dst)
    return dst


def _truncated_train_json(c: Ctx) -> list[str]:
    data = _data_copy(c)
    text = (data / "train.json").read_text()
    (data / "train.json").write_text(text[: len(text) // 2])
    return c.sft_args(c.tmp / "run", data=data)


def _moved_image(c: Ctx) -> list[str]:
    data = _data_copy(c)
    recs = json.loads((data / "train.json").read_text())
    recs[0]["images"] = [str(c.tmp / "moved" / "000000.jpg")]
    (data / "train.json").write_text(json.dumps(recs))
    return c.sft_args(c.tmp / "run", data=data)


def _lora_checkpoint(c: Ctx) -> list[str]:
    ckpt = c.tmp / "run" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text("{}")
    return c.sft_args(c.tmp / "run", "finetuning=full", "resume=true")


def _damaged_adapter(c: Ctx, size: int | None) -> list[str]:
    run = c.run_copy()
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:size] if size else b"")
    return ["merge", str(run), "--out", str(c.tmp / "merged")]


def _truncated_model(c: Ctx) -> list[str]:
    model = c.tmp / "model"
    shutil.copytree(c.fixture("tiny_model_dir"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["predict", "--model", str(model), "--csv", str(c.test_csv()), "--images",
            str(c.fixture("synth_dir") / "test_images"), "--out", str(c.tmp / "s.csv"), "--taxonomy",
            str(c.fixture("prepared_dir") / "taxonomy.json")]


def _bad_image_rows(c: Ctx, size: tuple[int, int]) -> list[str]:
    """Test CSV of 3 good rows plus one whose image the processor refuses."""
    images = c.tmp / "images"
    shutil.copytree(c.fixture("synth_dir") / "test_images", images)
    test = pd.read_csv(c.fixture("synth_dir") / "test.csv", dtype=str).iloc[:3]
    bad = pd.DataFrame([{"id": "900001", "Category": test["Category"].iat[0]}])
    Image.new("RGB", size).save(images / "900001.jpg")
    pd.concat([test, bad]).to_csv(c.tmp / "small.csv", index=False)
    return c.predict_args(c.tmp / "sub.csv", "--batch-size", "4", csv=c.tmp / "small.csv", images=images)


def _one_reject(reason: str) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        assert _rejects(c.tmp / "sub.rejects.csv") == {"900001": reason}
        assert len(pd.read_csv(c.tmp / "sub.csv")) == 4
    return check


def _prepare_rejects(expected: dict[str, str]) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        assert _rejects(c.tmp / "out" / "rejects.csv") == expected
    return check


def _all_rejected_written(path: str) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        assert (c.tmp / path).is_file()
    return check


CAT_INPUTS = lambda c: [c.cat["csv"], c.cat["images"], c.cat["attributes"]]  # noqa: E731
TINY = lambda c: [c.fixture("tiny_model_dir"), c.fixture("prepared_dir")]  # noqa: E731
RUN = lambda c: [c.fixture("trained_run_dir"), c.fixture("tiny_model_dir")]  # noqa: E731

def _probs_files(c: Ctx, n_models: int = 2, ids: tuple[str, ...] = ("1", "2", "3", "4"),
                 declared: tuple[str, ...] = ()) -> list[Path]:
    """Hand-made `predict --probs` files over a one-attribute taxonomy, plus the matching truth CSV;
    `declared`: values the attribute file allows that no training row holds (count 0)."""
    from vlmtax.data.taxonomy import SLOT_COLUMNS, build_taxonomy

    values = ["blue", "red", *declared]
    build_taxonomy(pd.DataFrame({"Category": ["Tees"] * 3, "attr_1": ["red", "red", "blue"]}), {"Tees": ["color"]},
                   remaps=[], declared={"Tees": {"color": values}} if declared else None).save(c.tmp / "taxonomy.json")
    pd.DataFrame({"id": list(ids), "Category": "Tees", "len": 1, "attr_1": ["red", "blue", "red", "red"][:len(ids)],
                  **{col: "dummy" for col in SLOT_COLUMNS[1:]}}).to_csv(c.tmp / "val.csv", index=False)
    paths = []
    for m in range(n_models):
        lines = [{"id": i, "Category": "Tees", "attributes": {"color": {
            "column": "attr_1", "value": "red",
            "probs": dict(zip(values, [0.3 + 0.1 * m, 0.7 - 0.1 * m, *[0.0] * len(declared)]))}}}
            for i in ids]
        path = c.tmp / f"p{m}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths.append(path)
    return paths


def _tune_args(c: Ctx, *extra: str, out: Path | None = None, declared: tuple[str, ...] = ()) -> list[str]:
    files = _probs_files(c, declared=declared)
    return ["tune", *map(str, files), "--truth", str(c.tmp / "val.csv"), "--taxonomy", str(c.tmp / "taxonomy.json"),
            "--out", str(out or c.tmp / "decision.json"), "--folds", "0", "--bootstrap", "10", *map(str, extra)]


def _ensemble_args(c: Ctx, *extra: str, out: Path | None = None, declared: tuple[str, ...] = ()) -> list[str]:
    files = _probs_files(c, declared=declared)
    return ["ensemble", *map(str, files), "--taxonomy", str(c.tmp / "taxonomy.json"),
            "--out", str(out or c.tmp / "sub.csv"), *map(str, extra)]


def _probs_inputs(c: Ctx) -> list[Path]:
    return [c.tmp / "p0.jsonl", c.tmp / "p1.jsonl", c.tmp / "val.csv", c.tmp / "taxonomy.json"]


def _other_ids(c: Ctx, build: Callable[[Ctx], list[str]]) -> list[str]:
    """The second model's file names row 9 where the first names row 4."""
    args = build(c)
    second = c.tmp / "p1.jsonl"
    second.write_text(second.read_text().replace('"id": "4"', '"id": "9"'))
    return args


def _first_row_comma(c: Ctx, *extra: str) -> list[str]:
    """Meesho-shaped rows (last cell empty); the FIRST row's label holds an unquoted comma."""
    c.catalogue()
    lines = c.cat["csv"].read_text().splitlines()
    lines[0] += ",attr_3"
    lines = [lines[0], *(line + "," for line in lines[1:])]  # an empty last cell on every row
    lines[1] = lines[1].replace(",red,", ",red, cotton,")
    c.cat["csv"].write_text("\n".join(lines) + "\n")
    return c.prepare_args(None, *extra)


def _no_row_category(c: Ctx) -> list[str]:
    """The attribute file lists Shirts, which no row of the CSV has."""
    c.catalogue(attrs={"categories": {**ATTRS["categories"], "Shirts": ["color"]}})
    return c.prepare_args()


def _untrained(c: Ctx) -> None:
    report = json.loads((c.tmp / "out" / "report.json").read_text())
    assert report["untrained_categories"] == ["Shirts"]


def _heads_sft(c: Ctx, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
    from conftest import RECIPES

    return ["sft", str(RECIPES / "tiny_heads_cpu.yaml"),
            *tiny_overrides(c.fixture("tiny_clip_dir"), data or c.fixture("prepared_dir"), out or c.tmp / "run"),
            "heads.mode=frozen", "train.max_steps=1", "train.batch_size=8", "train.eval=false",
            f"heads.cache_dir={c.tmp / 'cache'}", *extra]


def _knn_full_disk(c: Ctx, mp: pytest.MonkeyPatch, how: str) -> None:
    """A full disk once the run dir is written: safetensors' own error, or a write with no path named."""
    import safetensors.torch
    from safetensors import SafetensorError

    run = str(c.tmp / "run")
    if how == "safetensors":
        real = safetensors.torch.save_file

        def full(tensors, filename, *a, **k):
            if str(filename).startswith(run):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *a, **k)

        mp.setattr(safetensors.torch, "save_file", full)
    else:
        real_write = Path.write_text

        def full_text(self, *a, **k):
            if str(self) == f"{run}/recipe.yaml":  # a direct write: its error names no file, as write() gives
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, *a, **k)

        mp.setattr(Path, "write_text", full_text)


def _heads_run_copy(c: Ctx, drop: str | None = None, truncate: str | None = None) -> Path:
    run = c.tmp / "heads_run"
    shutil.copytree(c.fixture("heads_run_dir"), run, ignore=shutil.ignore_patterns("checkpoint-*"))
    if drop:
        (run / drop).unlink()
    if truncate:
        data = (run / truncate).read_bytes()
        (run / truncate).write_bytes(data[: len(data) // 2])
    return run


def _untrained_category_rows(c: Ctx) -> list[str]:
    """The run's taxonomy with one category emptied as prepare leaves a category no training row has; a test
    CSV of 2 rows of a trained category and one of the emptied one."""
    tax = json.loads((c.fixture("trained_run_dir") / "taxonomy.json").read_text())
    test = pd.read_csv(c.fixture("synth_dir") / "test.csv", dtype=str)
    trained, emptied = test["Category"].iat[0], next(x for x in test["Category"] if x != test["Category"].iat[0])
    for attr in tax["categories"][emptied]["attributes"]:
        attr.update(values=[tax["filler"]], counts={}, mode=tax["filler"])
    (c.tmp / "taxonomy.json").write_text(json.dumps(tax))
    rows = pd.concat([test[test["Category"] == trained].iloc[:2], test[test["Category"] == emptied].iloc[:1]])
    rows.to_csv(c.tmp / "small.csv", index=False)
    c.emptied = rows["id"].iat[2]  # type: ignore[attr-defined]
    return c.predict_args(c.tmp / "sub.csv", "--taxonomy", c.tmp / "taxonomy.json", csv=c.tmp / "small.csv")


def _untrained_rejected(c: Ctx) -> None:
    assert _rejects(c.tmp / "sub.rejects.csv") == {c.emptied: "untrained_category"}  # type: ignore[attr-defined]
    assert len(pd.read_csv(c.tmp / "sub.csv")) == 3


def _decision(c: Ctx, weights: list[float]) -> list[str]:
    """A decision.json from tune, then hand-edited weights."""
    assert cli_exit_code(_tune_args(c)) == 0
    path = c.tmp / "decision.json"
    decision = json.loads(path.read_text())
    decision["weights"] = weights
    path.write_text(json.dumps(decision))
    return _ensemble_args(c, "--decision", path)


def assert_never_green(sub: Path) -> None:
    """A value no training row holds (prior 0) must not win rows where every model gives it probability 0."""
    assert set(pd.read_csv(sub, dtype=str)["attr_1"]) <= {"red", "blue"}


def _declared_decision(c: Ctx) -> list[str]:
    """A decision with prior correction (tau set to 1) over an attribute with a declared value of count 0."""
    assert cli_exit_code(_tune_args(c, declared=("green",))) == 0
    decision = json.loads((c.tmp / "decision.json").read_text())
    for attr in decision["attributes"]:
        attr["tau"] = 1.0
    (c.tmp / "decision.json").write_text(json.dumps(decision))
    return _ensemble_args(c, "--decision", c.tmp / "decision.json", declared=("green",))


CASES = [
    # --- synth ---
    Case("synth", "out is a file", lambda c: ["synth", str(c.file("x.txt"))], error="exists and is not empty",
         protect=lambda c: [c.tmp / "x.txt"]),
    Case("synth", "out holds files", lambda c: ["synth", str(c.file("d/notes.txt").parent)],
         error="not empty", protect=lambda c: [c.tmp / "d"]),
    Case("synth", "out under a file", lambda c: ["synth", str(c.file("x.txt") / "sub")], error="is a file",
         protect=lambda c: [c.tmp / "x.txt"]),
    Case("synth", "zero rows", lambda c: ["synth", str(c.tmp / "s"), "--rows", "0"], error="rows must be"),
    Case("synth", "Ctrl-C", lambda c: ["synth", str(c.tmp / "s")], code=130, error=None, patch=_interrupt),
    # --- tiny-model ---
    Case("tiny-model", "out holds other files", lambda c: ["tiny-model", str(c.file("m/README.md").parent)],
         error="holds other files", protect=lambda c: [c.tmp / "m"]),
    Case("tiny-model", "out is a file", lambda c: ["tiny-model", str(c.file("m.bin"))], error=r"m\.bin",
         protect=lambda c: [c.tmp / "m.bin"]),
    Case("tiny-model", "out under a file", lambda c: ["tiny-model", str(c.file("m.bin") / "model")],
         error="is a file", protect=lambda c: [c.tmp / "m.bin"]),
    # --- prepare: outputs aimed at inputs or other people's files ---
    Case("prepare", "out is the CSV", lambda c: c.prepare_args(c.catalogue()["csv"]), error="is the input --csv",
         protect=CAT_INPUTS),
    Case("prepare", "out is the images folder", lambda c: c.prepare_args(c.catalogue()["images"]),
         error="is the input --images", protect=CAT_INPUTS),
    Case("prepare", "out contains the images", lambda c: c.prepare_args(c.catalogue() and c.tmp),
         error="contains the input", protect=CAT_INPUTS),
    Case("prepare", "out inside the images", lambda c: c.prepare_args(c.catalogue()["images"] / "data"),
         error="sits inside the input --images", protect=CAT_INPUTS),
    Case("prepare", "out is the attribute file", lambda c: c.prepare_args(c.catalogue()["attributes"]),
         error="is the input --attributes", protect=CAT_INPUTS),
    Case("prepare", "out holds the user's files", lambda c: c.prepare_args(c.file("mine/notes.txt").parent),
         error="files prepare did not write", protect=lambda c: [c.tmp / "mine", *CAT_INPUTS(c)]),
    Case("prepare", "rerun into a dataset the user added a file to", _prepared_then_user_file,
         error=r"did not write \(notes.txt\)", protect=lambda c: [c.tmp / "out"]),
    Case("prepare", "out under a file", lambda c: c.prepare_args(c.file("f.txt") / "out"),
         error="f.txt is a file", protect=lambda c: [c.tmp / "f.txt"]),
    Case("prepare", "out is a file", lambda c: c.prepare_args(c.file("f.txt")), error="is a file",
         protect=lambda c: [c.tmp / "f.txt"]),
    Case("prepare", "disk full while writing", lambda c: c.prepare_args(),
         error=r"cannot write .*out/\w+\.json: No space left on device", patch=_enospc,
         check=lambda c: _assert_absent(c.tmp / "out")),
    # --- prepare: inputs ---
    Case("prepare", "images folder missing", lambda c: c.prepare_args(c.catalogue() and None, "--images",
                                                                      str(c.tmp / "nope")), error="image folder"),
    Case("prepare", "row with an extra field", _extra_field, error="more fields than its header.*line 2",
         protect=CAT_INPUTS),
    Case("prepare", "first row: comma in a label, last cell empty", _first_row_comma,
         error="more fields than its header.*line 2", protect=CAT_INPUTS),
    Case("prepare", "first row: comma in a label, last cell empty, --strict",
         lambda c: _first_row_comma(c, "--strict"), error="more fields than its header.*line 2", protect=CAT_INPUTS),
    Case("prepare", "max pixels 0", lambda c: c.prepare_args(None, "--max-pixels", "0"), error="--max-pixels 0"),
    Case("prepare", "max pixels negative", lambda c: c.prepare_args(None, "--max-pixels", "-5"),
         error="--max-pixels -5"),
    Case("prepare", "a category with no training rows", _no_row_category, code=0, check=_untrained,
         says=r"^warning: 1 category .*\(Shirts\).*untrained_category"),
    Case("prepare", "val fraction out of range", lambda c: c.prepare_args(None, "--val-fraction", "1.5"),
         error="out of range"),
    Case("prepare", "filler is a real value", lambda c: c.prepare_args(None, "--filler", "Black"),
         error="'black' is a real value of Tees/color"),
    Case("prepare", "ids 1 and 01 share an image",
         lambda c: c.catalogue(rows=[*ROWS, ("01", "Tees", "red", "v")]) and c.prepare_args(), code=0,
         check=_prepare_rejects({"1": "ambiguous_image", "01": "ambiguous_image"})),
    Case("prepare", "aspect ratio above 200",
         lambda c: c.catalogue(sizes={"2": (3000, 14)}) and c.prepare_args(), code=0,
         check=_prepare_rejects({"2": "extreme_aspect_ratio"})),
    Case("prepare", "image side below the patch size",
         lambda c: c.catalogue(sizes={"3": (8, 40)}) and c.prepare_args(), code=0,
         check=_prepare_rejects({"3": "image_too_small"})),
    Case("prepare", "processor-refused image with --model",
         lambda c: c.catalogue(sizes={"3": (3000, 14)})
         and c.prepare_args(None, "--model", c.fixture("tiny_model_dir"), "--max-pixels", "12544"), code=0,
         check=_prepare_rejects({"3": "extreme_aspect_ratio"})),
    Case("prepare", "symlink out of the images folder", _symlink_out, code=0,
         check=_prepare_rejects({"2": "image_outside_folder"})),
    Case("prepare", "zero-width and full-width look-alikes", _zero_width, code=0, check=_tax_values),
    Case("prepare", "every row rejected (wrong images folder)",
         lambda c: c.catalogue() and c.prepare_args(None, "--images", str(c.file("empty/x.txt").parent)),
         error=r"every row was rejected \(missing_image 6\).*--image-pattern",
         check=_all_rejected_written("out/rejects.csv")),
    Case("prepare", "every row rejected (wrong attribute file)",
         lambda c: _attrs(c, {"categories": {"Shoes": ["size"]}}),
         error=r"every row was rejected \(unknown_category 6\).*shifted columns"),
    # --- prepare: the attribute file ---
    Case("prepare", "empty attribute name", lambda c: _attrs(c, {"categories": {"Tees": ["color", " "]}}),
         error="category 'Tees'.*empty"),
    Case("prepare", "duplicate attribute name", lambda c: _attrs(c, {"categories": {"Tees": ["color", "color"]}}),
         error="'Tees' repeats the attribute name 'color'"),
    Case("prepare", "duplicate category after whitespace collapse",
         lambda c: _attrs(c, [{"Category": "Tees", "Attribute_list": ["a"]},
                              {"Category": " Tees ", "Attribute_list": ["b"]}]), error="'Tees' is listed twice"),
    Case("prepare", "No_of_attribute disagrees",
         lambda c: _attrs(c, [{"Category": "Tees", "No_of_attribute": 3, "Attribute_list": ["color", "neck"]}]),
         error="'Tees' says No_of_attribute=3 but lists 2"),
    Case("prepare", "No_of_attribute NaN (parquet)",
         lambda c: _attrs(c, {"Category": ["Tees"], "No_of_attribute": [float("nan")],
                              "Attribute_list": [["color", "neck"]]}, "a.parquet"),
         error="'Tees': No_of_attribute nan"),
    Case("prepare", "No_of_attribute not an integer",
         lambda c: _attrs(c, [{"Category": "Tees", "No_of_attribute": 2.5, "Attribute_list": ["color", "neck"]}]),
         error="No_of_attribute 2.5 is not a whole number"),
    Case("prepare", "No_of_attribute null",
         lambda c: _attrs(c, [{"Category": "Tees", "No_of_attribute": None, "Attribute_list": ["color"]}]),
         error="No_of_attribute None"),
    Case("prepare", "Attribute_list null",
         lambda c: _attrs(c, [{"Category": "Tees", "No_of_attribute": 2, "Attribute_list": None}]),
         error="'Tees': the attribute list is None"),
    Case("prepare", "Attribute_list a number", lambda c: _attrs(c, {"categories": {"Tees": 7}}),
         error="'Tees': the attribute list is 7"),
    Case("prepare", "empty category name", lambda c: _attrs(c, [{"Category": "  ", "Attribute_list": ["a"]}]),
         error="a category has an empty name"),
    Case("prepare", "malformed remap entry",
         lambda c: _attrs(c, {"categories": ATTRS["categories"], "remaps": [{"category": "Tees", "a": 1}]}),
         error="bad remap entry"),
    Case("prepare", "remaps not a list",
         lambda c: _attrs(c, {"categories": ATTRS["categories"], "remaps": "Tees:attr_1<->attr_2"}),
         error="remaps must be a list"),
    Case("prepare", "bad --remap", lambda c: c.prepare_args(None, "--remap", "Tees attr_1 attr_2"),
         error="bad remap"),
    Case("prepare", "binary attribute file", lambda c: _attrs(c, b"\x00\xff\xfe garbage"),
         error="cannot read category-attribute file"),
    # --- sft ---
    Case("sft", "output_dir is the base model", lambda c: c.sft_args(c.fixture("tiny_model_dir")),
         error="output_dir .* is the input model", protect=TINY),
    Case("sft", "output_dir is the data folder", lambda c: c.sft_args(c.fixture("prepared_dir")),
         error="is the input data", protect=TINY),
    Case("sft", "output_dir inside the data folder", lambda c: c.sft_args(c.fixture("prepared_dir") / "run"),
         error="sits inside the input data", protect=TINY),
    Case("sft", "output_dir contains the model", lambda c: c.sft_args(c.fixture("tiny_model_dir").parent),
         error="contains the input model", protect=TINY),
    Case("sft", "output_dir holds the user's README", lambda c: c.sft_args(c.file("mine/README.md").parent),
         error="not a vlmtax run", protect=lambda c: [c.tmp / "mine", *TINY(c)]),
    Case("sft", "output_dir is a file", lambda c: c.sft_args(c.file("run.txt")), error="is a file",
         protect=lambda c: [c.tmp / "run.txt"]),
    Case("sft", "unclosed YAML override", lambda c: c.sft_args(c.tmp / "r", "lora.target=[q_proj"),
         error="lora.target=\\[q_proj.*not valid YAML"),
    Case("sft", "empty LoRA target list", lambda c: c.sft_args(c.tmp / "r", "finetuning=lora", "lora.target=[]"),
         error="lora.target is an empty list"),
    Case("sft", "LoRA target matching nothing",
         lambda c: c.sft_args(c.tmp / "r", "finetuning=lora", "lora.target=[qproj]"),
         error="matches no linear layer.*nearest: .*q_proj", check=lambda c: _assert_absent(c.tmp / "r")),
    Case("sft", "tensorboard not installed", lambda c: c.sft_args(c.tmp / "r", "log.tensorboard=true"),
         error="tensorboard is not installed", patch=_no_tensorboard),
    Case("sft", "resume a LoRA checkpoint as full", _lora_checkpoint, error="is from LoRA.*finetuning=full"),
    Case("sft", "binary recipe", lambda c: ["sft", str(_binary(c.tmp / "r.yaml"))], error="not UTF-8"),
    Case("sft", "unknown recipe key", lambda c: c.sft_args(c.tmp / "r", "train.epoch=1"),
         error="did you mean train.epochs"),
    Case("sft", "truncated train.json", _truncated_train_json, error="train.json is damaged"),
    Case("sft", "image moved after prepare", _moved_image, error="image\\(s\\) named in .* are gone"),
    Case("sft", "attribute weight for no attribute", lambda c: _heads_sft(c, "heads.attribute_weights={nope: 2.0}"),
         error="attribute_weights names 'nope'.*use attribute names \\(.*color",
         check=lambda c: _assert_absent(c.tmp / "run")),
    *[Case("sft", f"{what} attribute weight", lambda c, w=w: _heads_sft(c, f"heads.attribute_weights={{color: {w}}}"),
           error="heads.attribute_weights.*positive") for what, w in (("negative", -1), ("zero", 0), ("NaN", ".nan"))],
    Case("sft", "heads keys in a generate recipe", lambda c: c.sft_args(c.tmp / "r", "heads.kind=mlp"),
         error="heads.* configures the classify route.*task: classify"),
    *[Case("sft", f"{key} on a classify run", lambda c, o=override: _heads_sft(c, o),
           error=f"{key} is for the generate route")
      for key, override in (("train.packing", "train.packing=true"), ("train.cache_vision", "train.cache_vision=true"),
                            ("train.extra", "train.extra={dataloader_drop_last: true}"))],
    Case("sft", "train.extra value of the wrong type",
         lambda c: c.sft_args(c.tmp / "r", "train.extra={dataloader_drop_last: notabool}"),
         error="train.extra.dataloader_drop_last='notabool' is not a valid bool"),
    Case("sft", "report_to a logger not installed",
         lambda c: c.sft_args(c.tmp / "r", "train.extra={report_to: [wandb]}"),
         error="report_to names 'wandb', which is not installed"),
    Case("sft", "report_to a logger the Trainer does not know",
         lambda c: c.sft_args(c.tmp / "r", "train.extra={report_to: [tensorbord]}"),
         error="report_to names 'tensorbord', which the Trainer does not know"),
    Case("sft", "generate recipe on a CLIP encoder",
         lambda c: c.sft_args(c.tmp / "r", model=c.fixture("tiny_clip_dir")),
         error="is a vision encoder.*task: classify", check=lambda c: _assert_absent(c.tmp / "r")),
    Case("sft", "two processes, classify data folder missing",
         lambda c: [*_heads_sft(c, data=c.tmp / "nodata"), "--num-processes", "2"],
         error="data dir .*nodata not found"),
    Case("sft", "classify run onto a full disk (safetensors)", lambda c: _heads_sft(c, "heads.kind=knn"),
         error=r"cannot write .*run.*No space left on device.*left as it was",
         check=lambda c: _assert_absent(c.tmp / "run"),
         patch=lambda c, mp: _knn_full_disk(c, mp, "safetensors")),
    Case("sft", "classify run onto a full disk (no file named)", lambda c: _heads_sft(c, "heads.kind=knn"),
         error=r"cannot write .*run: No space left on device", check=lambda c: _assert_absent(c.tmp / "run"),
         patch=lambda c, mp: _knn_full_disk(c, mp, "write")),
    # --- merge ---
    Case("merge", "out is the run dir", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                                   str(c.fixture("trained_run_dir"))],
         error="is the input the run dir", protect=RUN),
    Case("merge", "out contains the run", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                                     str(c.fixture("trained_run_dir").parent)],
         error="contains the input the run dir", protect=RUN),
    Case("merge", "out is the base model", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                                      str(c.fixture("tiny_model_dir"))],
         error="is the input the base model", protect=RUN),
    Case("merge", "out inside the run's data", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                                          str(c.fixture("prepared_dir") / "merged")],
         error="sits inside the input the run's data", protect=lambda c: [c.fixture("prepared_dir")]),
    Case("merge", "out is a file", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                              str(c.file("m.txt"))], error="is a file",
         protect=lambda c: [c.tmp / "m.txt"]),
    Case("merge", "out under a file", lambda c: ["merge", str(c.fixture("trained_run_dir")), "--out",
                                                 str(c.file("m.txt") / "merged")], error="m.txt is a file",
         protect=lambda c: [c.tmp / "m.txt"]),
    Case("merge", "run dir missing", lambda c: ["merge", str(c.tmp / "nope"), "--out", str(c.tmp / "m")],
         error="model folder not found"),
    Case("merge", "0-byte adapter", lambda c: _damaged_adapter(c, None), error="adapter_model.safetensors",
         check=lambda c: _assert_absent(c.tmp / "merged")),
    Case("merge", "truncated adapter", lambda c: _damaged_adapter(c, 100), error="adapter_model.safetensors",
         check=lambda c: _assert_absent(c.tmp / "merged")),
    # --- predict ---
    Case("predict", "out is the test CSV", lambda c: c.predict_args(c.test_csv()), error="is the input --csv",
         protect=lambda c: [c.tmp / "test.csv"]),
    Case("predict", "probs is the test CSV", lambda c: c.predict_args(c.tmp / "s.csv", "--probs", c.test_csv()),
         error="--probs .* is the input --csv", protect=lambda c: [c.tmp / "test.csv"]),
    Case("predict", "out inside the images folder",
         lambda c: c.predict_args(c.fixture("synth_dir") / "test_images" / "sub.csv"),
         error="sits inside the input --images", protect=lambda c: [c.fixture("synth_dir") / "test_images"]),
    Case("predict", "out inside the model folder",
         lambda c: c.predict_args(c.fixture("trained_run_dir") / "sub.csv"),
         error="sits inside the input --model", protect=RUN),
    Case("predict", "out is the taxonomy",
         lambda c: c.predict_args(c.fixture("trained_run_dir") / "taxonomy.json"),
         error="is the input --model|sits inside the input --model", protect=RUN),
    Case("predict", "out and probs the same file", lambda c: c.predict_args(c.tmp / "s.csv", "--probs",
                                                                              c.tmp / "s.csv"),
         error="same file as --probs"),
    Case("predict", "out is a folder", lambda c: c.predict_args(c.file("d/x").parent), error="is a folder"),
    Case("predict", "out under a file", lambda c: c.predict_args(c.file("f.txt") / "s.csv"),
         error="f.txt is a file", protect=lambda c: [c.tmp / "f.txt"]),
    Case("predict", "every row rejected",
         lambda c: c.predict_args(c.tmp / "s.csv", images=c.file("empty/x").parent),
         error=r"every row was rejected \(missing_image 24\)",
         check=lambda c: (_all_rejected_written("s.rejects.csv")(c), _assert_absent(c.tmp / "s.csv"))),
    Case("predict", "image with aspect ratio above 200", lambda c: _bad_image_rows(c, (4000, 14)), code=0,
         check=_one_reject("extreme_aspect_ratio")),
    Case("predict", "image side below the patch size", lambda c: _bad_image_rows(c, (2, 60)), code=0,
         check=_one_reject("image_too_small")),
    Case("predict", "test CSV with an extra field",
         lambda c: c.file("t.csv", "id,Category\n1,Tees,extra\n2,Tees\n") and c.predict_args(
             c.tmp / "s.csv", csv=c.tmp / "t.csv"), error="more fields than its header"),
    Case("predict", "truncated model.safetensors", _truncated_model, error="weights of .* are damaged"),
    Case("predict", "truncated heads.safetensors",
         lambda c: ["predict", "--model", str(_heads_run_copy(c, truncate="heads.safetensors")),
                    *c.predict_args(c.tmp / "s.csv")[3:]],
         error="heads.safetensors of the classify run is damaged", check=lambda c: _assert_absent(c.tmp / "s.csv")),
    Case("predict", "classify run without classifier.json",
         lambda c: ["predict", "--model", str(_heads_run_copy(c, drop="classifier.json")),
                    *c.predict_args(c.tmp / "s.csv")[3:]], error="is a classify run .*classifier.json.* missing"),
    Case("predict", "--template on a classify run",
         lambda c: ["predict", "--model", str(c.fixture("heads_run_dir")), *c.predict_args(c.tmp / "s.csv")[3:],
                    "--template", str(c.file("t.yaml"))], error="classify run.*drop --template"),
    Case("predict", "rows of a category the model never saw", _untrained_category_rows, code=0,
         check=_untrained_rejected),
    # --- score ---
    Case("score", "json is the truth", lambda c: c.score_args("--json", c.score_files()[0]),
         error="--json .* is the input --truth", protect=lambda c: list(c.score_files())),
    Case("score", "json is the taxonomy",
         lambda c: c.score_args("--taxonomy", c.fixture("prepared_dir") / "taxonomy.json", "--json",
                                c.fixture("prepared_dir") / "taxonomy.json"),
         error="is the input --taxonomy", protect=lambda c: [c.fixture("prepared_dir")]),
    Case("score", "plot is the submission", lambda c: c.score_args("--plot", c.score_files()[1]),
         error="--plot .* is the input --pred", protect=lambda c: list(c.score_files())),
    Case("score", "json and plot the same file", lambda c: c.score_args("--json", c.tmp / "a", "--plot",
                                                                         c.tmp / "a"), error="same file"),
    Case("score", "json under a file", lambda c: c.score_args("--json", c.file("f.txt") / "m.json"),
         error="f.txt is a file", protect=lambda c: [c.tmp / "f.txt"]),
    Case("score", "json is a folder", lambda c: c.score_args("--json", c.file("d/x").parent), error="is a folder"),
    Case("score", "disk full writing json", lambda c: c.score_args("--json", c.tmp / "m.json"),
         error="cannot write .*m.json: No space left on device", patch=_enospc,
         check=lambda c: _assert_absent(c.tmp / "m.json")),
    Case("score", "truth missing", lambda c: c.score_args() and ["score", "--truth", str(c.tmp / "no.csv"),
                                                                 "--pred", str(c.tmp / "pred.csv")],
         error="truth CSV not found"),
    Case("score", "prediction with an extra field",
         lambda c: c.score_args() and c.file("pred.csv", "id,Category,len\n1,Tees,2,x\n2,Tees,2\n") and
         c.score_args(), error="prediction CSV .* more fields"),
    # --- tune ---
    Case("tune", "out is a probability file", lambda c: _tune_args(c, out=c.tmp / "p0.jsonl"),
         error="--out .*p0.jsonl is the input probs file", protect=_probs_inputs),
    Case("tune", "out is the truth CSV", lambda c: _tune_args(c, out=c.tmp / "val.csv"),
         error="--out .*val.csv is the input --truth", protect=_probs_inputs),
    Case("tune", "out under a file", lambda c: _tune_args(c, out=c.file("f.txt") / "d.json"),
         error="f.txt is a file", protect=lambda c: [c.tmp / "f.txt"]),
    Case("tune", "probability file missing", lambda c: [*_tune_args(c), str(c.tmp / "nope.jsonl")],
         error="nope.jsonl"),
    Case("tune", "files cover other ids", lambda c: _other_ids(c, _tune_args), error="row|id",
         check=lambda c: _assert_absent(c.tmp / "decision.json")),
    Case("tune", "a declared value no training row holds",
         lambda c: _tune_args(c, "--taus", "0,1", declared=("green",)),
         code=0, check=_all_rejected_written("decision.json")),
    # --- ensemble ---
    Case("ensemble", "decision with a negative weight", lambda c: _decision(c, [-1, 2]),
         error=r"decision file .*weights \[-1\.0, 2\.0\] must be non-negative",
         check=lambda c: _assert_absent(c.tmp / "sub.csv")),
    Case("ensemble", "decision with a NaN weight", lambda c: _decision(c, [float("nan"), 1]),
         error=r"decision file .*weights \[nan, 1\.0\] must be non-negative",
         check=lambda c: _assert_absent(c.tmp / "sub.csv")),
    Case("ensemble", "a declared value no training row holds", _declared_decision, code=0,
         check=lambda c: assert_never_green(c.tmp / "sub.csv")),
    Case("ensemble", "out is a probability file", lambda c: _ensemble_args(c, out=c.tmp / "p1.jsonl"),
         error="--out .*p1.jsonl is the input probs file", protect=_probs_inputs),
    Case("ensemble", "probs out is the taxonomy", lambda c: _ensemble_args(c, "--probs", c.tmp / "taxonomy.json"),
         error="--probs .*taxonomy.json is the input --taxonomy", protect=_probs_inputs),
    Case("ensemble", "probs out is the submission", lambda c: _ensemble_args(c, "--probs", c.tmp / "sub.csv"),
         error="same file as --out", protect=_probs_inputs),
    Case("ensemble", "weights do not match the files", lambda c: _ensemble_args(c, "--weights", "0.2,0.3,0.5"),
         error="3 weights.*2|2.*3 weights|weights", check=lambda c: _assert_absent(c.tmp / "sub.csv")),
    Case("ensemble", "decision and weights both", lambda c: _ensemble_args(c, "--weights", "0.5,0.5", "--decision",
                                                                           c.file("d.json", "{}")),
         error="--decision and --weights both given"),
    Case("ensemble", "files cover other ids", lambda c: _other_ids(c, _ensemble_args), error="row|id",
         check=lambda c: _assert_absent(c.tmp / "sub.csv")),
    # --- demo ---
    Case("demo", "workdir is a file", lambda c: ["demo", "--workdir", str(c.file("w.txt"))],
         error="--workdir .*w.txt is a file",
         protect=lambda c: [c.tmp / "w.txt"]),
    Case("demo", "workdir under a file", lambda c: ["demo", "--workdir", str(c.file("w.txt") / "demo")],
         error="w.txt is a file, not a folder", protect=lambda c: [c.tmp / "w.txt"]),
]


@pytest.fixture(scope="module")
def heads_run_dir(tiny_clip_dir, prepared_dir, tmp_path_factory) -> Path:
    """A classify run (frozen CLIP features, MLP heads, 2 steps) for predict's cases."""
    from conftest import RECIPES

    from vlmtax.sft import sft

    tmp = tmp_path_factory.mktemp("heads")
    return sft(RECIPES / "tiny_heads_cpu.yaml", tiny_overrides(
        tiny_clip_dir, prepared_dir, tmp / "run", "heads.mode=frozen", "train.max_steps=2", "train.batch_size=8",
        "train.eval=false", f"heads.cache_dir={tmp / 'cache'}"))


def _assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.verb}: {c.name}" for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch, capsys):
    ctx = Ctx(tmp_path, request)
    argv = case.args(ctx)
    protected = case.protect(ctx)
    before = _snapshot(protected)
    if case.patch is not None:
        case.patch(ctx, monkeypatch)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        code = cli_exit_code(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    # numpy's RuntimeWarnings (divide by zero, invalid value) raised in vlmtax's own arithmetic: none may leak
    leaked = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
              if issubclass(w.category, RuntimeWarning) and f"{os.sep}vlmtax{os.sep}" in w.filename]
    assert not leaked, leaked
    if case.says is not None:
        assert any(re.search(case.says, line) for line in err.splitlines()), err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    if case.error is not None:
        assert len(lines) == 1, err
        assert re.search(case.error, lines[0]), lines[0]
    elif case.code == 130:
        assert err.strip().splitlines()[-1] == "interrupted"
    else:
        assert not lines, err
    assert _snapshot(protected) == before, "an input changed"
    if case.check is not None:
        case.check(ctx)


def _module(path: Path):
    """A test module by its path (pytest has imported it already when it collected its folder)."""
    import importlib.util

    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_verb_has_cases():
    # report's cases live beside its other tests (tests/evaluate/test_report.py), run by this file's runner
    REPORT_CASES = _module(Path(__file__).parent / "evaluate" / "test_report.py").REPORT_CASES

    from vlmtax.cli import app

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    counts = {v: sum(c.verb == v for c in CASES + REPORT_CASES) for v in verbs}
    assert len(CASES) >= 60 and min(counts.values()) >= 2, counts
