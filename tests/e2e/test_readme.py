"""The README's "your own data" walk-through, run as written: the recipe its `$ cat` shows is
written to a fresh folder, its `$ peftpipe ...` command runs there as a console command, and
what the command prints (stdout and stderr together, as a terminal shows them) must be what the
README shows, line for line. Times, losses and ids differ from run to run, so those lines are
compared by form (numbers and ids replaced); the dataset summary is deterministic and compared
exactly. A new warning on the console, a changed summary or a missing line fails the test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass
class Transcript:
    files: dict[str, str]  # name -> text, from `$ cat NAME` and the lines it printed
    command: str  # the `$ peftpipe ...` line, without the prompt
    output: list[str]  # what the README says it prints


def transcripts(text: str) -> list[Transcript]:
    """Every fenced block of the README that shows `$ cat` of a recipe and then runs it."""
    found = []
    for lines in _fenced_blocks(text):
        if not lines or not lines[0].startswith("$ cat "):
            continue
        files: dict[str, str] = {}
        steps: list[tuple[str, list[str]]] = []
        for line in lines:
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        for cmd, out in steps[:-1]:
            assert cmd.startswith("cat "), f"README block runs {cmd!r} before its last command"
            files[cmd.removeprefix("cat ").strip()] = "\n".join(out) + "\n"
        cmd, out = steps[-1]
        assert cmd.startswith("peftpipe "), cmd
        found.append(Transcript(files, cmd, out))
    return found


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def shape(line: str) -> str:
    """A line's form: trial ids, content ids and numbers replaced, runs of spaces collapsed
    (table columns are as wide as their values)."""
    line = re.sub(r"\b[0-9a-f]{5}_\d{5}\b", "<trial>", line)
    line = re.sub(r"\b[0-9a-f]{16}\b", "<id>", line)
    line = re.sub(r"\d+(\.\d+)?", "<n>", line)
    return " ".join(line.split())


def _one_time(line: str) -> bool:
    return line.startswith("note: converting the built-in ")


def _note_head(line: str) -> str:
    return line.split(", into ")[0]


def _exact(line: str) -> bool:
    return line.startswith(("dataset ", "classes: "))


def _form(line: str, readme_line: str) -> str:
    """What of ``line`` must equal the README's line: the whole dataset summary, a one-time
    note up to its machine-specific path, the shape of everything else."""
    if _one_time(readme_line):
        return _note_head(line)
    return line if _exact(readme_line) else shape(line)


def test_readme_first_run_prints_what_the_readme_shows(tmp_path) -> None:
    blocks = transcripts(README.read_text())
    assert blocks, "README lost its `$ cat recipe.yaml` + `$ peftpipe run` walk-through"
    for t in blocks:
        for name, body in t.files.items():
            (tmp_path / name).write_text(body)
        argv = shlex.split(t.command)
        # the console script the README's `peftpipe` is, from this environment
        argv[0] = str(Path(sys.executable).with_name("peftpipe"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        out = subprocess.run(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=1100)
        seen = out.stdout.splitlines()
        assert out.returncode == 0, "\n".join(seen[-60:])
        want = [line.replace("$PWD", str(tmp_path)) for line in t.output]
        if any(line.strip() == "..." for line in want):
            pytest.fail(f"README block of {t.command!r} elides lines ('...'); show them all")
        got = seen
        # a one-time note (the first run on a machine converts the built-in model) is
        # shown in the README as a fresh machine prints it; a machine that converted it
        # before skips it. Its cache path is the machine's own.
        want = [w for w in want if not _one_time(w)
                or any(_one_time(g) and _note_head(g) == _note_head(w) for g in got)]
        assert len(got) == len(want), (
            f"{t.command}: printed {len(got)} lines, README shows {len(want)}\n--- printed\n"
            + "\n".join(got) + "\n--- README\n" + "\n".join(want))
        for g, w in zip(got, want):
            assert _form(g, w) == _form(w, w), f"{t.command}:\n  printed {g!r}\n  README  {w!r}"


def test_shape_keeps_words_and_drops_numbers() -> None:
    a = "[    27s] be4e7_00000 lora             step    0/6  eval_loss=3.4436"
    b = "[   131s] 0a1b2_00003 lora   step    0/6  eval_loss=2.9"
    assert shape(a) == shape(b)
    assert shape(a) != shape(b.replace("lora", "dora"))
    assert shape("dataset 1de305516286a132: 12 rows") == "dataset <id>: <n> rows"
