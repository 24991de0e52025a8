"""Data-parallel prediction: the shares of batches that `predict --num-processes N` hands to N processes,
and the partial files through which every share is resumable.

A share's partial file (`<out>.partial`, or `<out>.partial.I-of-N`) is JSONL: a fingerprint of the
arguments on the first line, then one decoded row a line. A rerun with the same arguments keeps those
rows; a torn last line (the process was killed mid-write) is decoded again.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_path


class Partial:
    """Rows done so far, one JSON object a line after a fingerprint line; a torn last line is dropped."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path, self.fingerprint = path, fingerprint

    def read(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]], bool]:
        """The file as it is, changing nothing: its header, its rows up to a torn line (a process killed
        mid-write: that row and any after it are decoded again), and whether any line follows the header."""
        if not self.path.is_file():
            return {}, {}, False
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        rows: dict[int, dict[str, Any]] = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[rec["row"]] = rec
        return header, rows, any(line.strip() for line in lines[1:])

    def load(self) -> dict[int, dict[str, Any]]:
        """The rows kept for a rerun with this fingerprint; the file is rewritten without a torn line."""
        header, rows, body = self.read()
        same = header.get("fingerprint") == self.fingerprint
        if not same and body:
            raise VlmtaxError(f"{self.path} holds an interrupted prediction made with other arguments",
                              "rerun with the same arguments to resume it, or delete it to start over")
        done = rows if same else {}
        with atomic_path(self.path) as tmp:  # rewrite clean, so appends never land on a torn line
            tmp.write_text("".join(json.dumps(x) + "\n" for x in [{"fingerprint": self.fingerprint},
                                                                   *done.values()]), encoding="utf-8")
        return done

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class Share:
    """The batches one process decodes: every `count`-th batch from `index` (one process: all of them).
    Each share has its own partial file, so any process can be killed and its share resumed."""

    index: int = 0
    count: int = 1

    def pick(self, batches: list[list[Any]]) -> list[tuple[int, list[Any]]]:
        return [(n, b) for n, b in enumerate(batches) if n % self.count == self.index]

    def partial(self, out: Path, fingerprint: dict[str, Any]) -> Partial:
        name = f"{out.name}.partial" if self.count == 1 else f"{out.name}.partial.{self.index}-of-{self.count}"
        return Partial(out.with_name(name), {**fingerprint, "share": [self.index, self.count]}
                       if self.count > 1 else fingerprint)


def launched_share() -> Share | None:
    """This process's share when `predict --num-processes N` launched it (RANK, WORLD_SIZE set by _launch)."""
    if "VLMTAX_LAUNCHED" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return Share(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return None


def _die_with_parent() -> None:
    """In a launched process (Linux): SIGTERM when process 0 dies, killed or not, so that a rerun never finds the
    previous run's processes still appending to the partial files (they keep the rows already written)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class Launched:
    """Processes 1..N-1 of `predict --num-processes N`: copies of `vlmtax predict` with RANK=LOCAL_RANK=i and
    WORLD_SIZE=N, started before this process (process 0) reads the CSV, checks the images and loads the
    model, so their start-up overlaps its own; it then decodes share 0 itself.

    The shares never communicate (each reads its batches and writes its own partial file), so no launcher
    or rendezvous is needed: plain processes start faster than `accelerate launch` / torchrun, which would
    add a process of its own and its imports. Without a GPU each process gets the CPU's cores divided
    among the processes as torch threads (OMP_NUM_THREADS, unless set). A failed process does not stop the
    others; its share stays resumable."""

    def __init__(self, num_processes: int, argv: list[str]):
        self.threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // num_processes))
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(1, num_processes):
                env = {**os.environ, "VLMTAX_LAUNCHED": "1", "RANK": str(i), "LOCAL_RANK": str(i),
                       "WORLD_SIZE": str(num_processes), "OMP_NUM_THREADS": str(self.threads)}
                self.procs.append(subprocess.Popen([sys.executable, "-m", "vlmtax", "predict", *argv], env=env,
                                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        except BaseException:
            self.stop()
            raise

    def wait(self) -> None:
        """Wait for every launched process; an error if any failed (its share stays resumable)."""
        failed = [c for c in (p.wait() for p in self.procs) if c != 0]
        if failed:
            raise VlmtaxError(f"a prediction process exited with code {failed[0]}; the finished shares are kept",
                              "rerun the same command to resume")

    def stop(self) -> None:
        """This process failed or was interrupted (Ctrl-C): no process is left decoding behind the user's back."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Process 0 decodes its share with the launched processes' thread count, then restores its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank_device(device: str | None) -> str | None:
    """Each launched process on its own GPU (cuda:LOCAL_RANK) unless --device names one."""
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def other_partials(out: Path, num_processes: int) -> None:
    mine = f"{out.name}.partial" if num_processes == 1 else f"{out.name}.partial.*-of-{num_processes}"
    others = [p for p in out.parent.glob(f"{out.name}.partial*") if not p.match(mine) and ".tmp" not in p.name]
    if others:
        count = others[0].name.rsplit("-of-", 1)[-1] if "-of-" in others[0].name else "1"
        raise VlmtaxError(f"{others[0]} holds an interrupted prediction made with --num-processes {count}",
                          f"rerun with --num-processes {count} to resume it, or delete it to start over")


def saved_rows(out: Path, num_processes: int) -> set[int]:
    """The rows already in the shares' partial files, read before any process is launched (the fingerprint is
    checked later, by each share's own process)."""
    return {row for i in range(num_processes) for row in Share(i, num_processes).partial(out, {}).read()[1]}


def _merged(shares: list[Share], out: Path, fingerprint: dict[str, Any]) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    for s in shares:
        done.update(s.partial(out, fingerprint).load())
    return done


def decode_launched(shares: list[Share], out: Path, fingerprint: dict[str, Any], batches: list[list[Any]],
                    launched: Launched, decode_own: Callable[[Share], Any],
                    saved: set[int]) -> tuple[dict[int, dict[str, Any]], int]:
    """Share 0 decoded here by `decode_own` while the launched processes decode the others; then every
    share's rows and how many were decoded by this command (`saved`: the rows there before it started)."""
    with torch_threads(launched.threads):
        decode_own(shares[0])
    launched.wait()
    done = _merged(shares, out, fingerprint)
    missing = [r.index for b in batches for r in b if r.index not in done]
    if missing:
        raise VlmtaxError(f"{len(missing)} row(s) were not decoded by any process (first: input row {missing[0]})",
                          "rerun the same command to resume")
    return done, sum(r.index not in saved for b in batches for r in b)
