"""Every shell command shown in README.md and docs/*.md runs as shown (on CPU, with small step counts), so the
docs cannot rot. Commands are parsed from the markdown at test time: a new page or command is covered without
editing this file.

What counts as a command:

- in a ```bash / ```sh / ```shell block, every line that is not a comment (``\\`` continues a line; a trailing
  ``# comment`` is dropped);
- in a ```console block or a block without a language, every line starting with ``$ ``; the lines after it, up to
  the next ``$ ``, are its shown output.

The commands of one page run in order in one fresh working directory, as a reader following the page would
(``tune-moe cp tiny/full my.yaml`` then ``tune run ... --config my.yaml``). Paths under ``/tmp/`` are moved into
the test's temporary directory.

How a command runs:

- ``tune run`` gets fast overrides appended (:data:`FAST_OVERRIDES`: 2 steps of a small dataset, short samples);
- when the shown output starts with an error line of the program (``moe_full_finetune: ...``,
  ``moe_lora_finetune: ...``, ``tune-moe cp: ...``, e.g. ``moe_full_finetune: bad config: ...``),
  the command must fail and print that line (up to a trailing ``...``); otherwise it must exit 0;
- install steps in a ``&&`` chain (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install``) are dropped and
  the rest of the chain runs (the test runs inside an installed environment already).

Skipped, by :func:`skip_reason` (the rule names what is skipped and why):

- installing (``pip install``) and running the test suite itself (``pytest``);
- more processes than a CPU test machine has: ``--nproc_per_node`` above 2, ``--nnodes``;
- placeholders and paths to downloaded checkpoints: ``<...>``, ``NAME_OR_FILE``, ``[...]``, ``$VAR``,
  ``/path/to``, ``/data/``, ``/shared/``;
- GPUs: ``device=cuda``, ``benchmarks/`` scripts, serving engines (``vllm``, ``sglang``);
- the network: ``huggingface-cli download``, ``hf download``, ``tune download``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Appended to every ``tune run`` command: 2 optimizer steps of small batches, short sample answers.
FAST_OVERRIDES = ["max_steps_per_epoch=2", "batch_size=8", "dataset.num_samples=64", "samples.max_new_tokens=2"]

_FENCE_RE = re.compile(r"^( *)```([\w-]*)[^\n]*\n(.*?)^\1```", re.S | re.M)
_SHELL_LANGS = {"bash", "sh", "shell"}
_INSTALL_RE = re.compile(r"^(python3? -m venv\b|\. \S*/bin/activate$|source \S*/bin/activate$|pip install\b)")


@dataclass
class DocCommand:
    page: str
    line: int
    command: str
    output: list[str] = field(default_factory=list)  # the shown output ($-prompt blocks)


def _strip_comment(line: str) -> str:
    """``cmd  # comment`` -> ``cmd`` (a ``#`` starting a word)."""
    m = re.search(r"(^|\s)#", line)
    return line[: m.start()].strip() if m else line.strip()


def doc_commands(path: Path) -> list[DocCommand]:
    """The shell commands of one markdown page, in order."""
    text = path.read_text()
    page = str(path.relative_to(ROOT))
    out: list[DocCommand] = []
    for m in _FENCE_RE.finditer(text):
        lang, body = m.group(2), m.group(3)
        first_line = text.count("\n", 0, m.start(3)) + 1
        lines = body.splitlines()
        if lang in _SHELL_LANGS:
            current, start = "", 0
            for i, line in enumerate(lines):
                if not current:
                    start = i
                current = f"{current} {line.strip()}" if current else line.strip()
                if current.endswith("\\"):
                    current = current[:-1].rstrip()
                    continue
                command = _strip_comment(current)
                if command:
                    out.append(DocCommand(page, first_line + start, command))
                current = ""
        elif lang in ("", "console"):
            for i, line in enumerate(lines):
                if line.startswith("$ "):
                    out.append(DocCommand(page, first_line + i, _strip_comment(line[2:])))
                elif out and out[-1].page == page and out[-1].line >= first_line and line.strip():
                    out[-1].output.append(line)
    return out


def skip_reason(command: str) -> str | None:
    """Why a documented command is not run on a CPU test machine, or None (see the module docstring)."""
    if re.search(r"(^|&&\s*)pip install\b", command) and not _runnable_part(command):
        return "installs packages"
    if re.search(r"\bpytest\b", command):
        return "runs the test suite"
    m = re.search(r"--nproc_per_node[ =](\S+)", command)
    if m and not (m.group(1).isdigit() and int(m.group(1)) <= 2):
        return f"needs {m.group(1)} processes"
    if "--nnodes" in command:
        return "needs several machines"
    if re.search(r"<[^>]+>|NAME_OR_FILE|\[\.\.\.\]|\$\w+|/path/to|/data/|/shared/", command):
        return "a placeholder or a downloaded checkpoint"
    if re.search(r"device=cuda|\bbenchmarks/|\bvllm\b|\bsglang\b", command):
        return "needs a GPU"
    if re.search(r"huggingface-cli download|\bhf download|tune download", command):
        return "needs the network"
    return None


def _runnable_part(command: str) -> str:
    """The command without the install steps of an ``&&`` chain."""
    parts = [p.strip() for p in command.split("&&")]
    return " && ".join(p for p in parts if not _INSTALL_RE.match(p))


def _expected_error(output: list[str]) -> str | None:
    """The error line a command's shown output starts with (``program: message``), without a trailing ``...``."""
    if not output:
        return None
    first = output[0].strip()
    if not re.match(r"^(moe_full_finetune|moe_lora_finetune|tune-moe( \w+)?|tune|error): ", first):
        return None
    return first[:-3].rstrip() if first.endswith("...") else first


def _prepare(command: str, tmp: Path) -> str:
    command = _runnable_part(command).replace("/tmp/", f"{tmp}/tmp/")
    if "tune run" in command:
        command += " " + " ".join(FAST_OVERRIDES)
    return command


def _pages() -> list[Path]:
    """The pages with at least one command to run."""
    return [p for p in DOC_FILES if any(skip_reason(c.command) is None for c in doc_commands(p))]


def test_commands_are_found():
    """The parser sees the commands the pages show (a broken parser would make the test below vacuous)."""
    commands = {(c.page, c.command) for p in DOC_FILES for c in doc_commands(p)}
    assert ("docs/quickstart.md", "tune run moe_full_finetune --config tiny/full") in commands
    assert ("docs/cli.md", "tune-moe plot /tmp/tiny") in commands
    assert ("README.md", "tune-moe cp qwen3_moe/30b_a3b_full my.yaml") in commands
    readme = [c for c in doc_commands(ROOT / "README.md") if "python3 -m venv" in c.command][0]
    assert _runnable_part(readme.command) == "tune run moe_full_finetune --config tiny/full"
    errors = [c for c in doc_commands(ROOT / "docs/quickstart.md") if _expected_error(c.output)]
    assert errors and "batch_sise" in errors[0].command
    assert skip_reason("tune run --nproc_per_node 8 moe_full_finetune --config x") == "needs 8 processes"
    assert skip_reason("tune run --nproc_per_node 2 moe_full_finetune --config tiny/full") is None
    assert skip_reason("pip install torch==2.13.0") == "installs packages"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(page, tmp_path):
    """Runs the page's CPU-runnable commands in order in one working directory; lists every failure."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    failures, ran = [], 0
    for doc in doc_commands(page):
        if skip_reason(doc.command):
            continue
        command = _prepare(doc.command, tmp_path)
        res = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        ran += 1
        where = f"{doc.page}:{doc.line}: {doc.command}"
        expected = _expected_error(doc.output)
        if expected is not None:
            if res.returncode == 0 or expected not in res.stdout + res.stderr:
                failures.append(f"{where}\n  expected to fail with: {expected}\n  got exit {res.returncode}: "
                                f"{(res.stderr or res.stdout)[-800:]}")
        elif res.returncode != 0:
            failures.append(f"{where}\n  exit {res.returncode}: {(res.stderr or res.stdout)[-1500:]}")
    assert ran, f"{page}: every command was skipped"
    assert not failures, "\n\n".join(failures)
