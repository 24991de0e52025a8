"""`vlmtax report`: its figures (equal to `score --json`, hand-checked confusion, per-value and calibration
figures), its folder (offline, thumbnails once, one gallery script per attribute), its bad input, and the
page itself in headless Chromium (the DevTools protocol, over websocket-client).

The report is built once per module from the session's synthetic catalogue (24 test rows, 112 px images)
and a submission that is the truth with every third labelled cell rotated to the next allowed value.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_exit_code
from test_bad_inputs import Case, Ctx
from test_bad_inputs import test_bad_input as _run_bad_input

from vlmtax.evaluate.metric import infer_taxonomy
from vlmtax.evaluate.report import calibration, confusion, per_value
from vlmtax.evaluate.report_html import SHEET, THUMB_PX


def _submission(truth: pd.DataFrame, every: int, conf: float) -> tuple[pd.DataFrame, list[dict]]:
    """The truth with every `every`-th labelled cell rotated to the next allowed value; its probabilities
    give the predicted value `conf` and spread the rest evenly."""
    tax = infer_taxonomy(truth)
    pred = truth.copy()
    lines = [{"id": i, "Category": c, "attributes": {}} for i, c in zip(truth["id"], truth["Category"])]
    n = 0
    for r, row in truth.iterrows():
        for attr in tax.categories[row["Category"]].attributes:
            value = row[attr.column]
            if isinstance(value, str) and value in attr.values:
                n += 1
                if n % every == 0:
                    value = attr.values[(attr.values.index(value) + 1) % len(attr.values)]
                    pred.loc[r, attr.column] = value
            else:
                value = attr.mode
                pred.loc[r, attr.column] = value
            rest = (1 - conf) / max(len(attr.values) - 1, 1)
            lines[r]["attributes"][attr.name] = {"column": attr.column, "value": value,
                                                 "probs": {v: conf if v == value else rest for v in attr.values}}
    return pred, lines


@pytest.fixture(scope="module")
def built(tmp_path_factory, synth_dir) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("report")
    truth = pd.read_csv(synth_dir / "test_labels.csv", dtype=str)
    paths = {"truth": work / "truth.csv", "pred": work / "pred.csv", "other": work / "other.csv",
             "probs": work / "probs.jsonl", "out": work / "report", "images": synth_dir / "test_images"}
    truth.to_csv(paths["truth"], index=False)
    pred, lines = _submission(truth, every=3, conf=0.7)
    pred.to_csv(paths["pred"], index=False)
    paths["probs"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    _submission(truth, every=2, conf=0.6)[0].to_csv(paths["other"], index=False)
    argv = ["report", "--truth", paths["truth"], "--pred", paths["pred"], "--probs", paths["probs"],
            "--images", paths["images"], "--compare", paths["other"], "--out", paths["out"]]
    assert cli_exit_code([str(a) for a in argv]) == 0
    return paths


def _figures(built: dict[str, Path]) -> dict:
    return json.loads((built["out"] / "figures.json").read_text())


def test_numbers_equal_score_json(built, tmp_path):
    figures = _figures(built)
    for run, pred in zip(figures["runs"], (built["pred"], built["other"])):
        out = tmp_path / f"{pred.stem}.json"
        assert cli_exit_code(["score", "--truth", str(built["truth"]), "--pred", str(pred), "--json", str(out)]) == 0
        assert run == json.loads(out.read_text())
    assert figures["labels"] == ["pred", "other"]


def test_overview_sorted_by_points_lost_which_add_up_to_the_final(built):
    figures = _figures(built)
    lost = [row["runs"][0]["points_lost"] for row in figures["overview"]]
    assert lost == sorted(lost, reverse=True)
    # Each attribute's points lost is its share of the gap to a perfect score: together, all of it.
    assert sum(lost) == pytest.approx(100 * (1 - figures["runs"][0]["final"]))
    for row in figures["overview"]:
        scores = [r["score"] for r in row["runs"]]
        assert [r["winner"] for r in row["runs"]] == [s == max(scores) for s in scores]
        assert row["runs"][0]["gain"] == pytest.approx(scores[0] - row["baseline"])


def test_attribute_figures_agree_with_the_metric(built):
    figures = _figures(built)
    for a in figures["attributes"]:
        matrix = np.array(a["confusion"])
        assert matrix.sum() == a["support"]
        assert a["n_mistakes"] == matrix.sum() - np.trace(matrix)
        # Mean per-label F1 over the union of labels is the metric's macro-F1, its accuracy the micro-F1.
        assert np.mean([v["f1"] for v in a["per_value"]]) == pytest.approx(a["macro"])
        assert np.trace(matrix) / matrix.sum() == pytest.approx(a["micro"])
        assert a["missing_truth"] == a["rows"] - a["support"]
        assert a["calibration"]["rows"] == a["support"]
        gallery = (built["out"] / "gallery" / f"{figures['attributes'].index(a)}.js").read_text()
        rows = json.loads(re.fullmatch(r"vlmtaxGallery\(\d+,(.*)\);\n", gallery, re.S).group(1))
        assert len(rows) == a["n_mistakes"]
        for m in rows:
            assert m["t"] != m["p"] and matrix[m["t"], m["p"]] > 0
            assert m["conf"] == pytest.approx(0.7) and m["top"][0] == [a["labels"][m["p"]], pytest.approx(0.7)]


def test_confusion_and_per_value_by_hand():
    labels, matrix = confusion(np.array(["a", "a", "b", "b"], object), np.array(["a", "b", "b", "x"], object),
                               ["b", "a", "c"])
    assert labels == ["b", "a", "x"]  # vocabulary order, unseen "c" left out, the outsider last
    assert matrix.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    rows = {v["value"]: v for v in per_value(labels, matrix, {"a", "b", "c"})}
    assert (rows["b"]["precision"], rows["b"]["recall"], rows["b"]["f1"]) == (0.5, 0.5, 0.5)
    assert (rows["a"]["precision"], rows["a"]["recall"]) == (1.0, 0.5)
    assert rows["x"]["never_true"] and rows["x"]["recall"] is None and not rows["x"]["in_vocabulary"]
    assert not rows["a"]["never_predicted"] and rows["x"]["predicted"] == 1


def test_calibration_by_hand():
    cal = calibration(np.array([0.95, 0.95, 0.15, np.nan]), np.array([True, False, False, True]))
    assert cal["rows"] == 3
    # Bin 9: confidence 0.95, accuracy 0.5; bin 1: 0.15 vs 0. ECE = 2/3 * 0.45 + 1/3 * 0.15.
    assert cal["ece"] == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.15)
    assert cal["bins"][9]["count"] == 2 and cal["bins"][9]["accuracy"] == 0.5 and cal["bins"][5]["count"] == 0


def test_folder_is_offline_with_thumbnails_written_once(built):
    from PIL import Image

    out = built["out"]
    html = (out / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page fetches something from the web"
    figures = _figures(built)
    cells: dict[str, list] = {}
    for k in range(len(figures["attributes"])):
        text = (out / "gallery" / f"{k}.js").read_text()
        for m in json.loads(text[text.index(",") + 1: -3]):
            assert m["img"] is not None
            assert cells.setdefault(m["id"], m["img"]) == m["img"], "a row's thumbnail differs between attributes"
    sheets = sorted((out / "thumbs").iterdir())
    assert len(cells) <= len(sheets) * SHEET * SHEET < len(cells) + SHEET * SHEET  # each mistaken row once
    with Image.open(sheets[0]) as im:
        assert im.size == (SHEET * THUMB_PX, SHEET * THUMB_PX)


def test_without_probs_or_images(built, tmp_path):
    out = tmp_path / "plain"
    argv = ["report", "--truth", built["truth"], "--pred", built["pred"], "--out", out]
    assert cli_exit_code([str(a) for a in argv]) == 0
    figures = json.loads((out / "figures.json").read_text())
    assert figures["runs"][0] == _figures(built)["runs"][0] and len(figures["runs"]) == 1
    assert all(a["calibration"] is None for a in figures["attributes"])
    text = (out / "gallery" / "0.js").read_text()
    assert all(m["img"] is None and m["conf"] is None for m in json.loads(text[text.index(",") + 1: -3]))
    assert not (out / "thumbs").exists() and "most confident first" not in (out / "index.html").read_text()


# --- bad input: the same rules (and the same runner) as tests/test_bad_inputs.py ---------------------------

def _files(c: Ctx) -> tuple[Path, Path]:
    truth, pred = c.score_files()
    return truth, pred


def _args(c: Ctx, *extra: object, pred: Path | None = None) -> list[str]:
    truth, default = _files(c)
    return ["report", "--truth", str(truth), "--pred", str(pred or default), "--out", str(c.tmp / "rep"),
            *map(str, extra)]


def _edited(c: Ctx, edit) -> Path:
    frame = pd.read_csv(_files(c)[1], dtype=str)
    path = c.tmp / "edited.csv"
    edit(frame).to_csv(path, index=False)
    return path


def _absent(c: Ctx) -> None:
    assert not (c.tmp / "rep").exists() and not list(c.tmp.glob(".rep.*")), "a report folder was left behind"


REPORT_CASES = [
    Case("report", "prediction lacks an attribute column",
         lambda c: _args(c, pred=_edited(c, lambda f: f.drop(columns=["attr_3"]))),
         error=r"prediction lacks column\(s\) attr_3", check=_absent),
    Case("report", "prediction lacks the id column",
         lambda c: _args(c, pred=_edited(c, lambda f: f.drop(columns=["id"]))),
         error=r"lacks required column\(s\) id", check=_absent),
    Case("report", "ids do not match the truth",
         lambda c: _args(c, pred=_edited(c, lambda f: f.assign(id="x" + f["id"]))),
         error=r"no id of prediction CSV .* is in the truth CSV", check=_absent),
    Case("report", "compared submission with other ids",
         lambda c: _args(c, "--compare", _edited(c, lambda f: f.assign(id="x" + f["id"]))),
         error=r"no id of prediction CSV .*edited.csv is in the truth", check=_absent),
    Case("report", "probabilities not JSON", lambda c: _args(c, "--probs", c.file("p.jsonl", "{nope\n")),
         error=r"probabilities file .*p.jsonl line 1: not JSON", check=_absent),
    Case("report", "probabilities of other rows",
         lambda c: _args(c, "--probs", c.file("p.jsonl", json.dumps(
             {"id": "zz", "Category": "Sarees", "attributes": {"a": {"column": "attr_1", "probs": {"x": 1}}}}) + "\n")),
         error=r"no id of probabilities file", check=_absent),
    Case("report", "images not a folder", lambda c: _args(c, "--images", c.file("img.txt")),
         error=r"--images .* is not a folder", check=_absent),
    Case("report", "out is the truth", lambda c: _args(c)[:-2] + ["--out", str(_files(c)[0])],
         error=r"--out .* is the input --truth", protect=lambda c: list(_files(c))),
    Case("report", "out is a file", lambda c: _args(c)[:-2] + ["--out", str(c.file("rep.txt"))],
         error=r"is a file, but a folder is written there"),
]


@pytest.mark.parametrize("case", REPORT_CASES, ids=[c.name for c in REPORT_CASES])
def test_report_bad_input(case: Case, tmp_path: Path, request, monkeypatch, capsys):
    _run_bad_input(case, tmp_path, request, monkeypatch, capsys)


# --- the page in a real browser -----------------------------------------------------------------------------

class Browser:
    """Headless Chromium driven over the DevTools protocol: one page, its console errors collected."""

    def __init__(self, exe: str, profile: Path):
        websocket = pytest.importorskip("websocket", reason="browser tests need websocket-client (pip install "
                                        "websocket-client)")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = None
        for line in self.proc.stderr:  # Chromium prints the port it chose
            if line.startswith("DevTools listening on "):
                url = line.split(" on ", 1)[1].strip()
                break
        assert url, "chromium did not start its DevTools server"
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.n, self.events = 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", page=True)
        self.send("Emulation.setDeviceMetricsOverride", page=True, width=1400, height=1600, deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, page: bool = False, **params) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": self.session} if page else {})}
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.n:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", page=True, expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def open(self, path: Path) -> None:
        self.send("Page.navigate", page=True, url=path.resolve().as_uri())
        self.wait("document.readyState === 'complete'")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (not a synthetic element.click())."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                      "{block: 'center'}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, "
                      "r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", page=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("exception", {}).get("description", str(p)))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str([a.get("value", a.get("description")) for a in p.get("args", [])]))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['source']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(built, tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium")
    browser = Browser(exe, tmp_path_factory.mktemp("chromium-profile"))
    browser.open(built["out"] / "index.html")
    yield browser
    browser.close()


def test_page_overview_equals_score(page, built):
    figures = _figures(built)
    finals = page.js("[...document.querySelectorAll('#finals td.final')].map(td => td.textContent)")
    assert finals == [f"{r['final']:.4f}" for r in figures["runs"]]
    cells = page.js("[...document.querySelectorAll('#overview td[data-field]')].map(td => [td.closest('tr')"
                    ".dataset.category, td.closest('tr').dataset.attribute, Number(td.dataset.run), td.dataset.field,"
                    " td.textContent.replace('\u2605', '').trim()])")
    assert len(cells) == 3 * 2 * sum(a["score"] is not None for c in figures["runs"][0]["categories"].values()
                                     for a in c["attributes"].values())
    for cat, attr, run, field, text in cells:
        assert text == f"{figures['runs'][run]['categories'][cat]['attributes'][attr][field]:.4f}", (cat, attr, field)
    assert page.errors() == []


def test_page_confusion_click_filters_gallery(page, built):
    figures = _figures(built)
    k = next(i for i, a in enumerate(figures["attributes"]) if a["n_mistakes"] >= 2)
    attr = figures["attributes"][k]
    matrix = np.array(attr["confusion"])
    np.fill_diagonal(matrix, 0)
    t, p = np.unravel_index(matrix.argmax(), matrix.shape)
    page.click(f'table.cm[data-k="{k}"] td[data-t="{t}"][data-p="{p}"]')
    gallery = f'details.gallery[data-k="{k}"]'
    page.wait(f"document.querySelector('{gallery}').dataset.ready === '1'")
    shown = page.js(f"(() => {{ const g = document.querySelector('{gallery}'); return {{open: g.open, "
                    "count: g.querySelector('.count').textContent, filter: g.querySelector('.filter').textContent, "
                    "cards: [...g.querySelectorAll('.card')].map(c => [Number(c.dataset.t), Number(c.dataset.p)])}; "
                    "})()")
    assert shown["open"]
    n = int(matrix[t, p])
    assert shown["count"] == f"{n} mistake{'s' if n != 1 else ''}"
    assert shown["filter"] == f"true {attr['labels'][t]}, predicted {attr['labels'][p]}"
    assert shown["cards"] == [[t, p]] * n
    # Every thumbnail in the open gallery loads (they are cells of a sheet image, drawn from the folder).
    page.wait(f"[...document.querySelectorAll('{gallery} img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.js(f"document.querySelectorAll('{gallery} img').length") == n
    page.click(f"{gallery} .clear")
    page.wait(f"document.querySelector('{gallery} .count').dataset.n === '{attr['n_mistakes']}'")
    assert page.errors() == []


def test_page_screenshot_not_blank(page):
    from PIL import Image

    shot = page.send("Page.captureScreenshot", page=True, format="png")["data"]
    with Image.open(io.BytesIO(base64.b64decode(shot))) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20
    assert page.errors() == []
