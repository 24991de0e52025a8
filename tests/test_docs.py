"""docs: every command shown in README.md and docs/*.md runs, and the docs name every flag, field and reason.

What counts as a command
    A line starting with `$ ` inside a ```console fence, one command per line (no `\\` continuations).
    Lines in the fence that do not start with `$ ` are sample output and are not checked. Commands meant
    for reference only (they need several GPUs or the network) are written without `$ ` in ```text
    fences. A `$ ` line outside a console fence is an error, so nothing looks runnable without being run.

Order (one session-scoped sandbox folder, every command run with `bash -c` there)
    README.md first, then docs/quickstart.md, then the other docs/*.md sorted by name: the later docs say
    they continue in the quickstart's folder (catalogue/, tiny-model/, data/, runs/tiny, merged/,
    data-meesho/ ...). A command identical (same shell words) to one already run is not run again; its
    result is reused (the README's walk-through is the quickstart's first section). A test per command
    asserts that it exits 0, running the earlier commands first where needed (under `-m "not slow"`
    without the commands marked slow, see slow_commands), and that it had the effects
    it claims (effect_problems): the files its output options name (prepare's eight files, merge's
    config and taxonomy, predict's submission with one row per input row and its --probs lines, score's
    --json/--plot), the options prepare records (--format, --missing), and every `key=value` override of
    an sft line in the run's recipe.yaml (except those the test substitutes).

Links created in the sandbox (no rewriting of the commands)
    | link                                   | points to       | why                                        |
    |----------------------------------------|-----------------|--------------------------------------------|
    | recipes, data_templates                | <repo>/...      | the docs run commands from the repo root   |
    | meesho                                 | catalogue       | the synthetic catalogue has Meesho's file  |
    |                                        |                 | names (train.csv, train_images/, test.csv, |
    |                                        |                 | test_images/, category_attributes.parquet) |
    | models/<name>, for each `models/<name>`| tiny-model      | stands in for downloaded weights           |
    | that a command names                   |                 | (models/Qwen2-VL-2B-Instruct)              |
    Relative paths inside the recipes (data/, runs/qwen2vl_2b, ...) resolve in the sandbox.

Substitutions (arguments appended to the documented line; appended overrides win)
    | command                                      | appended                                               |
    |----------------------------------------------|--------------------------------------------------------|
    | vlmtax synth ...                             | --rows 60 --test-rows 16 --image-size 56               |
    |                                              | (each only where the line does not set it)             |
    | any line running `vlmtax sft` (also          | train.max_steps=2 train.eval=false                     |
    | `accelerate launch ... -m vlmtax sft`)       | train.batch_size=1 train.grad_accum=1                  |
    | ... with a recipe other than tiny_cpu.yaml   | train.liger=false quantization=null                    |
    | (the GPU recipes)                            | image.max_pixels=12544, and model=tiny-model where the |
    |                                              | line sets no model=                                    |

Skipped lines (reported as skipped): `pip install ...`, `python -m pip ...`, `make ...`, `git clone ...`,
`cd ...`, and `vlmtax demo ...` (ten minutes; the end-to-end test runs the demo).

How: a plain `vlmtax ...` line (no shell syntax: pipes, redirections, globs, variables, env prefixes) runs
in this process through `vlmtax.cli.main`, the function the `vlmtax` console script calls, with the sandbox
as the working directory: same arguments, same exit code and output, without a Python start and the
torch/transformers imports per command. Every other line runs with `bash -c` in the sandbox, as does
every line when VLMTAX_DOCS_SUBPROCESS=1.

Environment: PATH starts with this Python's bin folder (so `vlmtax` and `accelerate` are this venv's),
HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false, VLMTAX_PROGRESS=0.

The static tests below also check that docs/recipes.md names every recipe field, that the docs name
every CLI verb and option and every reject reason, that every file under recipes/ they mention exists,
and that the links between docs (and their #anchors) resolve.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"

SYNTH_DEFAULTS = {"--rows": "60", "--test-rows": "16", "--image-size": "56"}
SFT_ALWAYS = ["train.max_steps=2", "train.eval=false", "train.batch_size=1", "train.grad_accum=1"]
SFT_GPU_RECIPE = ["train.liger=false", "quantization=null", "image.max_pixels=12544"]
CPU_RECIPE = "tiny_cpu.yaml"
TINY_MODEL = "tiny-model"
SKIP = re.compile(r"^(pip install|python3? -m pip|make(\s|$)|git clone|cd(\s|$)|vlmtax demo)")
MODELS = re.compile(r"(?<![\w./-])models/([\w.-]+)")
COMMAND_TIMEOUT = 420

# Every reason string that prepare/predict write to a rejects CSV.
REJECT_REASONS = ["bad_id", "duplicate_id", "unknown_category", "len_mismatch", "image_outside_folder",
                  "missing_image", "unreadable_image", "missing_labels", "too_long", "value_not_in_schema",
                  "untrained_category"]


@dataclass(frozen=True)
class Command:
    source: Path
    line: int
    text: str  # as documented, without the `$ `

    @property
    def id(self) -> str:
        return f"{self.source.name}:{self.line}"


def doc_files() -> list[Path]:
    """README first, then the quickstart, then the other docs by name."""
    docs = sorted(DOCS.glob("*.md"), key=lambda p: (p.name != "quickstart.md", p.name))
    return ([README] if README.is_file() else []) + docs


def parse(path: Path) -> tuple[list[Command], list[str]]:
    """The `$ ` lines of console fences, and the format problems found."""
    commands, problems = [], []
    fence: str | None = None  # language of the open fence
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if not line.startswith("$ "):
            continue
        where = f"{path.name}:{n}"
        if fence != "console":
            problems.append(f"{where}: `$ ` line outside a ```console fence: {line}")
        elif line.endswith("\\"):
            problems.append(f"{where}: line continuation; write one command per line")
        else:
            commands.append(Command(path, n, line[2:].strip()))
    if fence is not None:
        problems.append(f"{path.name}: unclosed code fence")
    return commands, problems


def all_commands() -> list[Command]:
    return [c for p in doc_files() for c in parse(p)[0]]


def _has_flag(tokens: list[str], flag: str) -> bool:
    return any(t == flag or t.startswith(flag + "=") for t in tokens)


def runnable(text: str) -> str | None:
    """The command as the test runs it (substitutions above), or None if the line is skipped."""
    if SKIP.match(text):
        return None
    tokens = shlex.split(text)
    extra: list[str] = []
    pairs = list(zip(tokens, tokens[1:]))
    if ("vlmtax", "synth") in pairs:
        extra += [x for flag, value in SYNTH_DEFAULTS.items() if not _has_flag(tokens, flag) for x in (flag, value)]
    if ("vlmtax", "sft") in pairs:
        start = pairs.index(("vlmtax", "sft")) + 2
        recipe = next((t for t in tokens[start:] if not t.startswith("-") and "=" not in t), "")
        extra += SFT_ALWAYS
        if Path(recipe).name != CPU_RECIPE:
            extra += SFT_GPU_RECIPE
            if not any(t.startswith("model=") for t in tokens[start:]):
                extra.append(f"model={TINY_MODEL}")
    return " ".join([text, *map(shlex.quote, extra)])


@dataclass
class Result:
    command: str
    returncode: int
    output: str
    seconds: float


class Sandbox:
    """Runs the documented commands in order, each once, and remembers the results."""

    def __init__(self, root: Path, commands: list[Command], skip_slow: bool = False):
        self.root, self.commands, self.skip_slow = root, commands, skip_slow
        self.results: dict[Command, Result] = {}
        self.by_words: dict[tuple[str, ...], Result] = {}
        self.next = 0
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLMTAX_PROGRESS": "0"}
        models = sorted({m for c in commands for m in MODELS.findall(c.text)})
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
        (root / "data_templates").symlink_to(REPO / "data_templates", target_is_directory=True)
        (root / "meesho").symlink_to("catalogue", target_is_directory=True)
        for model in models:
            (root / "models" / model).symlink_to(Path("..") / TINY_MODEL, target_is_directory=True)

    def run_through(self, target: Command) -> Result | None:
        while self.next < len(self.commands) and target not in self.results:
            cmd = self.commands[self.next]
            self.next += 1
            if self.skip_slow and cmd in SLOW and cmd != target:
                continue  # deselected, and so is every command that reads its output
            self._run(cmd)
        return self.results.get(target)

    def _run(self, cmd: Command) -> None:
        text = runnable(cmd.text)
        if text is None:
            return
        words = tuple(shlex.split(text))
        if words in self.by_words:  # the same command, already run in this folder
            self.results[cmd] = self.by_words[words]
            return
        started = time.perf_counter()
        if in_process(text):
            code, output = self._in_process(list(words[1:]))
        else:
            proc = subprocess.run(["bash", "-c", text], cwd=self.root, env=self.env,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            code, output = proc.returncode, proc.stdout + proc.stderr
        self.results[cmd] = self.by_words[words] = Result(text, code, output,
                                                          time.perf_counter() - started)

    def _in_process(self, argv: list[str]) -> tuple[int, str]:
        """`vlmtax ARGV` through the console script's own function (vlmtax.cli.main), in the sandbox folder:
        the exit code it would give and what it printed (a traceback for an unexpected error, as a shell
        shows it). Saves a Python start with torch and transformers imports per command."""
        import contextlib
        import io
        import traceback

        from conftest import cli_exit_code

        out, here = io.StringIO(), os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = cli_exit_code(argv)
                except Exception:  # noqa: BLE001 - a bug in the command: exit 1 with its traceback, as a shell
                    traceback.print_exc()
                    code = 1
        finally:
            os.chdir(here)
        return code, out.getvalue()


SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?\[\]{}~]|^\w+=")


def in_process(text: str) -> bool:
    """A plain `vlmtax ...` line (no pipes, redirections, globs, variables or env prefixes) runs in-process
    (Sandbox._in_process); anything else, and every line when VLMTAX_DOCS_SUBPROCESS=1, runs with bash -c."""
    unquoted = re.sub(r"'[^']*'|\"[^\"$`\\]*\"", "''", text)  # quoted words hold no shell syntax
    return (os.environ.get("VLMTAX_DOCS_SUBPROCESS") != "1" and text.split(" ", 1)[0] == "vlmtax"
            and not SHELL_SYNTAX.search(unquoted))


COMMANDS = all_commands()


def _option(tokens: list[str], flag: str) -> str | None:
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def _writes(tokens: list[str]) -> str | None:
    return _option(tokens, "--out") or next((t.split("=", 1)[1] for t in tokens if t.startswith("output_dir=")), None)


def slow_commands(commands: list[Command]) -> set[Command]:
    """Commands marked slow: multi-process training, the real-model walk-throughs (a GPU recipe or
    models/<name>, which repeat the tiny model's path with a stand-in), and every command that reads
    what a slow one wrote. `-m "not slow"` leaves them all out, so no fast command depends on one."""
    slow: set[Command] = set()
    written: set[str] = set()
    for cmd in commands:
        tokens = shlex.split(cmd.text)
        values = [t.split("=", 1)[-1] for t in tokens]
        if ("--num-processes" in tokens or tokens[:2] == ["accelerate", "launch"] or MODELS.search(cmd.text)
                or any(re.fullmatch(r"recipes/qwen[\w.-]*\.yaml", v) for v in values)
                or any(v == w or v.startswith(w + "/") for v in values for w in written)):
            slow.add(cmd)
            if _writes(tokens):
                written.add(_writes(tokens))
    return slow


SLOW = slow_commands(COMMANDS)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, request) -> Sandbox:
    skip_slow = "not slow" in (request.config.getoption("markexpr") or "")
    return Sandbox(tmp_path_factory.mktemp("docs_sandbox"), COMMANDS, skip_slow)


PREPARE_FILES = ["train.json", "val.json", "dataset_info.json", "taxonomy.json", "val.csv", "rejects.csv",
                 "report.json", "prepare_meta.json"]
SUBMISSION_COLUMNS = ["id", "Category", "len", *(f"attr_{i}" for i in range(1, 11))]
# Overrides the docs test appends itself (see the module docstring): their documented value is not checked.
SUBSTITUTED = {a.split("=")[0] for a in SFT_ALWAYS + SFT_GPU_RECIPE} | {"model"}


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def effect_problems(text: str, root: Path) -> list[str]:
    """What a documented command says it writes or sets, checked after it ran (empty list: all there)."""
    import json

    import pandas as pd
    import yaml

    tokens = shlex.split(text)
    if "vlmtax" not in tokens or tokens.index("vlmtax") + 1 >= len(tokens):
        return []
    verb = tokens[tokens.index("vlmtax") + 1]
    args = tokens[tokens.index("vlmtax") + 2:]
    expect: list[Path] = []
    problems: list[str] = []
    out = _option(args, "--out")
    if verb in ("synth", "tiny-model"):
        folder = root / args[0]
        vision_only = _option(args, "--family") in ("clip", "siglip")  # an image encoder: no tokenizer
        expect += [folder / n for n in (("train.csv", "test.csv", "category_attributes.parquet") if verb == "synth"
                                        else ("config.json", "preprocessor_config.json") if vision_only
                                        else ("config.json", "tokenizer.json"))]
    elif verb == "prepare":
        expect += [root / out / n for n in PREPARE_FILES]
        meta_path = root / out / "prepare_meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            for flag in ("--format", "--missing"):
                value = _option(args, flag)
                if value is not None and meta.get(flag[2:]) != value:
                    problems.append(f"{flag} {value} but prepare_meta.json says {meta.get(flag[2:])!r}")
    elif verb == "merge":
        expect += [root / out / "config.json", root / out / "taxonomy.json"]
    elif verb == "predict":
        expect.append(root / out)
        if (root / out).is_file():
            sub = pd.read_csv(root / out, dtype=str)
            n_rows = len(pd.read_csv(root / _option(args, "--csv"), dtype=str))
            if list(sub.columns) != SUBMISSION_COLUMNS or len(sub) != n_rows:
                problems.append(f"{out}: columns {list(sub.columns)}, {len(sub)} rows for {n_rows} input rows")
            probs = _option(args, "--probs")
            if probs and (root / probs).is_file() and len((root / probs).read_text().splitlines()) != n_rows:
                problems.append(f"{probs} does not hold one line per input row")
    elif verb == "score":
        for flag in ("--json", "--plot"):
            if _option(args, flag):
                expect.append(root / _option(args, flag))
        report_path = root / (_option(args, "--json") or "-")
        baseline = _option(args, "--baseline")
        if baseline and report_path.is_file() and baseline not in json.loads(report_path.read_text())["baseline"][
                "source"]:
            problems.append(f"--baseline {baseline} is not the baseline's source in {report_path.name}")
    elif verb == "sft":
        overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
        run = root / overrides.get("output_dir", "")
        expect += [run / "recipe.yaml", run / "vlmtax_meta.json", run / "taxonomy.json"]
        if (run / "recipe.yaml").is_file():
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            for key, raw in overrides.items():
                if key in SUBSTITUTED or key in ("data", "output_dir"):
                    continue
                want, got = yaml.safe_load(raw), _dotted(recipe, key)
                if got != want and not (key == "resume" and want is True):
                    problems.append(f"{key}={raw} but the run's recipe.yaml has {got!r}")
    problems += [f"{p.relative_to(root)} was not written" for p in expect if not p.exists()]
    return problems


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in COMMANDS],
                         ids=[c.id for c in COMMANDS])
def test_documented_command_runs(cmd: Command, sandbox: Sandbox):
    if runnable(cmd.text) is None:
        pytest.skip(f"not run by the docs test (see the module docstring): {cmd.text}")
    result = sandbox.run_through(cmd)
    assert result is not None
    failed = [c.id for c, r in sandbox.results.items() if r.returncode and c != cmd]
    assert result.returncode == 0, (
        f"{cmd.id}: `{cmd.text}` exited {result.returncode}\nran as: {result.command}\n"
        + (f"(earlier failures: {', '.join(failed)})\n" if failed else "")
        + result.output[-4000:]
    )
    problems = effect_problems(cmd.text, sandbox.root)
    assert not problems, f"{cmd.id}: `{cmd.text}` ran but: {'; '.join(problems)}"


# --- static checks: the docs against the code ----------------------------------------------------------


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in doc_files())


def test_docs_exist_and_commands_are_well_formed():
    names = {p.name for p in DOCS.glob("*.md")}
    expected = {"quickstart.md", "data-formats.md", "recipes.md", "decoding.md", "metric.md", "distributed.md",
                "troubleshooting.md"}
    assert expected <= names, f"missing docs: {sorted(expected - names)}"
    problems = [msg for p in doc_files() for msg in parse(p)[1]]
    assert not problems, "\n".join(problems)
    assert any(runnable(c.text) for c in COMMANDS)


def test_substitutions_are_as_documented():
    assert runnable("vlmtax synth cat --rows 50") == "vlmtax synth cat --rows 50 --test-rows 16 --image-size 56"
    sft = "train.max_steps=2 train.eval=false train.batch_size=1 train.grad_accum=1"
    assert runnable("vlmtax sft recipes/tiny_cpu.yaml data=d") == f"vlmtax sft recipes/tiny_cpu.yaml data=d {sft}"
    assert runnable("accelerate launch --config_file c.yaml -m vlmtax sft recipes/qwen2vl_2b.yaml data=d") == (
        f"accelerate launch --config_file c.yaml -m vlmtax sft recipes/qwen2vl_2b.yaml data=d {sft} "
        "train.liger=false quantization=null image.max_pixels=12544 model=tiny-model")
    assert runnable("vlmtax sft recipes/qwen2vl_2b.yaml model=models/x").endswith("image.max_pixels=12544")
    for skipped in ("pip install -e .", "make demo", "git clone https://x/vlmtax", "cd vlmtax", "vlmtax demo"):
        assert runnable(skipped) is None
    assert runnable("vlmtax score --truth a.csv --pred b.csv") == "vlmtax score --truth a.csv --pred b.csv"


def _recipe_keys(model, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _recipe_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_recipes_doc_names_every_recipe_field():
    from vlmtax.train.schema import Recipe

    text = (DOCS / "recipes.md").read_text(encoding="utf-8")
    undocumented = [k for k in _recipe_keys(Recipe) if f"`{k}`" not in text]
    assert not undocumented, f"docs/recipes.md does not document: {undocumented}"


def test_docs_name_every_cli_verb_and_option():
    import click
    import typer

    from vlmtax.cli import app

    group = typer.main.get_command(app)
    text = _docs_text()
    missing = [opt for p in group.params for opt in p.opts if opt.startswith("--") and opt not in text]
    for name, command in group.commands.items():
        if f"vlmtax {name}" not in text:
            missing.append(f"vlmtax {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                missing += [f"{name} {o}" for o in param.opts if o.startswith("--") and o not in text]
    assert not missing, f"not in the docs: {missing}"


def test_every_reject_reason_is_documented_and_real():
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "vlmtax").rglob("*.py"))
    doc = (DOCS / "data-formats.md").read_text(encoding="utf-8")
    for reason in REJECT_REASONS:
        assert f'"{reason}"' in source, f"{reason} is not a reason the code emits"
        assert f"`{reason}`" in doc, f"docs/data-formats.md does not list {reason}"


def test_recipe_files_named_in_docs_exist():
    named = set(re.findall(r"recipes/[\w/.-]+\.yaml", _docs_text()))
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"docs name recipe files that do not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_docs_resolve():
    broken = []
    for path in doc_files():
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", path.read_text(encoding="utf-8")):
            dest = (path.parent / target) if target else path
            if not dest.is_file():
                broken.append(f"{path.name}: {target}")
                continue
            if anchor:
                slugs = {_slug(m) for m in re.findall(r"^#+\s+(.+)$", dest.read_text(encoding="utf-8"), re.M)}
                if anchor not in slugs:
                    broken.append(f"{path.name}: {target}#{anchor}")
    assert not broken, f"broken links: {broken}"


def test_effect_checks_catch_a_missing_file_and_a_lost_override(tmp_path):
    assert "data/train.json was not written" in effect_problems("vlmtax prepare --csv c.csv --out data", tmp_path)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("lora: {rank: 16}\n")
    problems = effect_problems("vlmtax sft recipes/tiny_cpu.yaml output_dir=runs/x lora.rank=8", tmp_path)
    assert any("lora.rank=8 but the run's recipe.yaml has 16" in p for p in problems)
    assert "runs/x/vlmtax_meta.json was not written" in problems


def test_slow_commands_take_their_readers_with_them():
    cmds = [Command(README, i, t) for i, t in enumerate([
        "vlmtax sft recipes/qwen2vl_2b.yaml data=data output_dir=runs/big",
        "vlmtax merge runs/big --out merged-big",
        "vlmtax predict --model merged-big --csv a.csv --images i --out p.csv",
        "vlmtax merge runs/tiny --out merged"])]
    assert slow_commands(cmds) == set(cmds[:3])
