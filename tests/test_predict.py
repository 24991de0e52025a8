"""predict: submission layout, remaps inverted, rejects, probabilities, resume after interruption, errors, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA_TEMPLATES, TINY_RECIPE, tiny_overrides

from vlmtax.data.taxonomy import SLOT_COLUMNS, Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.predict import predict

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def case(synth_dir, tmp_path_factory):
    """The synthetic test CSV plus an unknown category, a missing image and an unreadable image."""
    root = tmp_path_factory.mktemp("predict_case")
    images = root / "images"
    shutil.copytree(synth_dir / "test_images", images)
    test = pd.read_csv(synth_dir / "test.csv", dtype=str)
    first = test.iloc[0]
    extra = pd.DataFrame([{"id": "900001", "Category": "Socks"},  # unknown category
                          {"id": "900002", "Category": first["Category"]},  # no image
                          {"id": "900003", "Category": first["Category"]}])  # not an image
    (images / "900003.jpg").write_bytes(b"not a jpeg")
    frame = pd.concat([test.iloc[:5], extra, test.iloc[5:]], ignore_index=True)
    frame.to_csv(root / "test.csv", index=False)
    return root / "test.csv", images


def _run(model, case, out, **kw):
    csv, images = case
    return predict(model=model, csv=csv, images=images, out=out, **kw)


def test_submission_is_complete_allowed_and_in_input_order(trained_run_dir, case, tmp_path):
    out, probs = tmp_path / "sub.csv", tmp_path / "probs.jsonl"
    report = _run(trained_run_dir, case, out, batch_size=4, probs=probs)
    taxonomy = Taxonomy.load(trained_run_dir / "taxonomy.json")
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    given = pd.read_csv(case[0], dtype=str)
    assert list(sub.columns) == ["id", "Category", "len", *SLOT_COLUMNS]
    assert sub["id"].tolist() == given["id"].tolist()
    assert (sub != "").all().all()
    for _, row in sub.iterrows():
        cat = taxonomy.categories.get(row["Category"])
        if cat is None:
            assert row["len"] == "0" and all(row[c] == taxonomy.filler for c in SLOT_COLUMNS)
            continue
        assert int(row["len"]) == cat.len
        used = {a.column for a in cat.attributes}
        for attr in cat.attributes:
            assert row[attr.column] in attr.values
        assert all(row[c] == taxonomy.filler for c in SLOT_COLUMNS if c not in used)
    # The Sarees remap is inverted: colour goes back to attr_4.
    sarees = taxonomy.categories["Sarees"]
    assert next(a for a in sarees.attributes if a.name == "color").column == "attr_4"
    saree_rows = sub[sub["Category"] == "Sarees"]
    assert len(saree_rows) and saree_rows["attr_4"].isin(sarees.attributes[0].values).all()

    rejects = pd.read_csv(report["rejects"], dtype=str).set_index("id")
    assert rejects["reason"].to_dict() == {"900001": "unknown_category", "900002": "missing_image",
                                           "900003": "unreadable_image"}
    cat = taxonomy.categories[given.iloc[0]["Category"]]
    for rid in ("900002", "900003"):
        row = sub[sub["id"] == rid].iloc[0]
        assert all(row[a.column] == a.mode for a in cat.attributes)
    assert report["predicted"] == len(given) - 3 and report["rejected"] == 3

    lines = [json.loads(x) for x in probs.read_text().splitlines()]
    assert [x["id"] for x in lines] == given["id"].tolist()
    for line, (_, row) in zip(lines, sub.iterrows()):
        if line.get("reject"):
            assert line["attributes"] == {}
            continue
        for entry in line["attributes"].values():
            assert sum(entry["probs"].values()) == pytest.approx(1.0, abs=1e-9)
            assert entry["value"] == max(entry["probs"], key=entry["probs"].get) == row[entry["column"]]
    assert not out.with_name(out.name + ".partial").exists()


class Stop(Exception):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(trained_run_dir, case, tmp_path):
    straight = tmp_path / "straight.csv"
    _run(trained_run_dir, case, straight, batch_size=3, probs=tmp_path / "straight.jsonl")

    out, probs = tmp_path / "resumed.csv", tmp_path / "resumed.jsonl"

    def stop_after_three(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        _run(trained_run_dir, case, out, batch_size=3, probs=probs, on_batch=stop_after_three)
    partial = out.with_name(out.name + ".partial")
    assert partial.is_file() and not out.exists()
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 9  # fingerprint + three batches of three rows
    # Killed mid-write: the last row is torn.
    partial.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])

    seen = []
    _run(trained_run_dir, case, out, batch_size=3, probs=probs, on_batch=seen.append)
    assert seen and 0 not in seen and 1 not in seen  # finished batches are not decoded again
    assert out.read_bytes() == straight.read_bytes()
    assert probs.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not partial.exists()

    # A partial file from other arguments is not silently mixed in.
    with pytest.raises(Stop):
        _run(trained_run_dir, case, out, batch_size=3, on_batch=stop_after_three)
    with pytest.raises(VlmtaxError, match="other arguments"):
        _run(trained_run_dir, case, out, batch_size=4)


def test_base_model_with_taxonomy_and_free_mode(tiny_model_dir, trained_run_dir, case, tmp_path):
    with pytest.raises(VlmtaxError, match="--taxonomy"):
        _run(tiny_model_dir, case, tmp_path / "x.csv")
    out = tmp_path / "free.csv"
    report = _run(tiny_model_dir, case, out, taxonomy=trained_run_dir / "taxonomy.json", mode="free", batch_size=8)
    assert report["snapped"] > 0 and report["slots"] >= report["snapped"]
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    taxonomy = Taxonomy.load(trained_run_dir / "taxonomy.json")
    for _, row in sub.iterrows():
        cat = taxonomy.categories.get(row["Category"])
        assert cat is None or all(row[a.column] in a.values for a in cat.attributes)


def test_bad_inputs_are_one_line_errors(trained_run_dir, case, tmp_path):
    csv, images = case
    with pytest.raises(VlmtaxError, match="model folder not found"):
        predict(model=tmp_path / "nope", csv=csv, images=images, out=tmp_path / "o.csv")
    no_cat = tmp_path / "nocat.csv"
    pd.DataFrame({"id": ["1"]}).to_csv(no_cat, index=False)
    with pytest.raises(VlmtaxError, match="Category"):
        predict(model=trained_run_dir, csv=no_cat, images=images, out=tmp_path / "o.csv")
    with pytest.raises(VlmtaxError, match="image folder"):
        predict(model=trained_run_dir, csv=csv, images=tmp_path / "none", out=tmp_path / "o.csv")
    with pytest.raises(VlmtaxError, match="--probs needs"):
        predict(model=trained_run_dir, csv=csv, images=images, out=tmp_path / "o.csv", probs=tmp_path / "p.jsonl",
                mode="free")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtax", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_smoke(trained_run_dir, case, tmp_path):
    csv, images = case
    out = tmp_path / "cli.csv"
    proc = _cli("--model", trained_run_dir, "--csv", csv, "--images", images, "--out", out, "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and len(pd.read_csv(out)) == len(pd.read_csv(csv))
    proc = _cli("--model", tmp_path / "missing", "--csv", csv, "--images", images, "--out", out)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "model folder not found" in errors[0]


def test_several_processes_stop_together_on_bad_input(trained_run_dir, case, tmp_path):
    """Process 1 is launched before process 0 reads the CSV; when that read fails, process 1 is stopped: one error
    line, exit 2, and no partial file or output left behind."""
    _, images = case
    bad = tmp_path / "bad.csv"
    bad.write_text("id,Categoryy\n1,Kurtis\n")
    out = tmp_path / "out.csv"
    proc = _cli("--model", trained_run_dir, "--csv", bad, "--images", images, "--out", out, "--num-processes", "2")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Category" in errors[0], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]
    # However fast process 1 gets there, it leaves the error to process 0 (which checks the same inputs).
    alone = subprocess.run([sys.executable, "-m", "vlmtax", "predict", "--model", str(trained_run_dir), "--csv",
                            str(bad), "--images", str(images), "--out", str(out)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "VLMTAX_LAUNCHED": "1",
                                             "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert alone.returncode == 2 and "error:" not in alone.stderr, alone.stderr[-2000:]


def _processes_writing(out: Path) -> list[int]:
    """PIDs whose command line names `out` (the launched copies of `vlmtax predict` carry --out=OUT)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--out={out}".encode() in cmdline.read_bytes().split(b"\0"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the launched processes' parent-death signal is Linux's")
def test_killing_the_command_stops_the_processes_it_launched(trained_run_dir, case, tmp_path):
    """SIGKILL of `predict --num-processes 2` (process 0) takes the process it launched down with it, so a rerun
    never races a leftover process on the same partial file."""
    import time

    csv, images = case
    out = tmp_path / "k.csv"
    proc = subprocess.Popen([sys.executable, "-m", "vlmtax", "predict", "--model", str(trained_run_dir), "--csv",
                             str(csv), "--images", str(images), "--out", str(out), "--num-processes", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _processes_writing(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_writing(out), "process 1 was never launched"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _processes_writing(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_writing(out)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_a_killed_process(tiny_model_dir, prepared_dir, case, tmp_path):
    """Batch n goes to process n mod 2; process 1 is killed after its first batch; the rerun decodes only what
    is missing and writes files byte-identical to a one-process run."""
    root = Path(__file__).resolve().parents[1]
    csv, images = case
    common = dict(taxonomy=prepared_dir / "taxonomy.json", batch_size=4)
    one = tmp_path / "one.csv"
    report = predict(model=tiny_model_dir, csv=csv, images=images, out=one, probs=tmp_path / "one.jsonl", **common)
    args = ["--model", tiny_model_dir, "--csv", csv, "--images", images, "--out", tmp_path / "two.csv",
            "--taxonomy", common["taxonomy"], "--batch-size", "4", "--probs", tmp_path / "two.jsonl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    # The two processes as `--num-processes 2` starts them (predict_shares._launch), process 1 killed.
    ranks = [subprocess.Popen([sys.executable, str(root / "tests" / "kill_rank1.py"), "predict", *map(str, args)],
                              env={**env, "VLMTAX_LAUNCHED": "1", "RANK": str(i), "LOCAL_RANK": str(i),
                                   "WORLD_SIZE": "2"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [r.communicate(timeout=300)[0] for r in ranks]
    assert ranks[0].returncode == 0 and ranks[1].returncode == -9 and not (tmp_path / "two.csv").exists()
    share1 = tmp_path / "two.csv.partial.1-of-2"
    assert len(share1.read_text().splitlines()) == 1 + 4, outputs[1][-3000:]  # fingerprint + one batch

    proc = subprocess.run([sys.executable, "-m", "vlmtax", "predict", *map(str, args), "--num-processes", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decoded = int(re.search(r"decoded (\d+) rows", proc.stdout).group(1))
    assert 0 < decoded <= report["predicted"] - 4
    assert (tmp_path / "two.csv").read_bytes() == one.read_bytes()
    assert (tmp_path / "two.rejects.csv").read_bytes() == (tmp_path / "one.rejects.csv").read_bytes()
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("two.csv.partial*"))



def _template_run(template: str, request, synth_dir, tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """(run dir, its prepared data): the shared runs for lines and json, a 2-step one for json_with_values."""
    if template == "lines":
        return request.getfixturevalue("trained_run_dir"), request.getfixturevalue("prepared_dir")
    if template == "json":
        run = request.getfixturevalue("json_run_dir")
        return run, run.parent / "data"
    from vlmtax.data.prepare import prepare
    from vlmtax.sft import sft

    prepare(csv=synth_dir / "train.csv", images=synth_dir / "train_images", out=tmp_path / "data", workers=1,
            attributes=synth_dir / "category_attributes.parquet", template=DATA_TEMPLATES / f"{template}.yaml")
    run = sft(TINY_RECIPE, overrides=tiny_overrides(tiny_model_dir, tmp_path / "data", tmp_path / "run",
                                                    "train.max_steps=2", "train.batch_size=4"))
    return run, tmp_path / "data"


@pytest.mark.parametrize("template", ["lines", "json", "json_with_values"])
def test_each_shipped_template_goes_prepare_sft_predict_score(template, request, synth_dir, tiny_model_dir, tmp_path):
    from vlmtax.evaluate.score import score

    run, data = _template_run(template, request, synth_dir, tiny_model_dir, tmp_path)
    tax = Taxonomy.load(run / "taxonomy.json")
    assert tax.template.name == template  # the run dir carries the template it was trained with
    sub = tmp_path / "sub.csv"
    predict(model=run, csv=data / "val.csv", images=synth_dir / "train_images", out=sub, batch_size=8)
    table = pd.read_csv(sub, dtype=str, keep_default_na=False)
    for _, row in table.iterrows():
        assert all(row[a.column] in a.values for a in tax.categories[row["Category"]].attributes)
    assert 0 <= score(truth=data / "val.csv", pred=sub)["final"] <= 1


def test_a_model_trained_elsewhere_decodes_with_taxonomy_and_template(json_run_dir, prepared_dir, synth_dir,
                                                                      tmp_path):
    """A plain model folder (no vlmtax files) that answers in JSON, decoded with --taxonomy and --template,
    gives the same submission as the vlmtax run it was copied from."""
    plain = tmp_path / "elsewhere"
    shutil.copytree(json_run_dir, plain, ignore=shutil.ignore_patterns(
        "taxonomy.json", "vlmtax_meta.json", "recipe.yaml", "checkpoint-*", "training_args.bin"))
    csv, images = json_run_dir.parent / "data" / "val.csv", synth_dir / "train_images"
    predict(model=json_run_dir, csv=csv, images=images, out=tmp_path / "run.csv")
    with pytest.raises(VlmtaxError, match="--taxonomy"):
        predict(model=plain, csv=csv, images=images, out=tmp_path / "x.csv")
    taxonomy = tmp_path / "taxonomy.json"  # the json run's vocabulary with the default (lines) template
    tax = Taxonomy.load(json_run_dir / "taxonomy.json")
    Taxonomy(filler=tax.filler, remaps=tax.remaps, categories=tax.categories).save(taxonomy)
    proc = _cli("--model", plain, "--taxonomy", taxonomy, "--template", DATA_TEMPLATES / "json.yaml", "--csv", csv,
                "--images", images, "--out", tmp_path / "plain.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "run.csv").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("answer: {field: '{value}', separator: ' '}\n")
    with pytest.raises(VlmtaxError, match="only whitespace separates"):
        predict(model=plain, taxonomy=taxonomy, template=bad, csv=csv, images=images, out=tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()
