"""Every ```python block of README.md and docs/*.md runs as-is in a fresh interpreter.

One test per block, named ``file:line``. Each block runs standalone (no state
shared with other blocks) in an empty working directory, with a timeout.
Blocks that are not meant to run must be marked ```text or ```bash.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # generous for a loaded 2-core CI machine; blocks should take < 20 s
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced block whose info string starts with ``python``."""
    blocks: list[tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        lang = m.group("info").strip().split(" ")[0].lower() if m.group("info").strip() else ""
        start, body = i + 2, []  # 1-based number of the first code line
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence))
            and lines[i].strip().strip(fence[0]) == ""
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            i += 1
        i += 1  # closing fence
        if lang in ("python", "py", "python3"):
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.exists()]


def _params() -> list[Any]:
    params = []
    for path in _doc_files():
        for line, code in python_blocks(path):
            rel = path.relative_to(ROOT).as_posix()
            params.append(pytest.param(code, id=f"{rel}:{line}"))
    return params


def test_block_parser_finds_only_python_blocks(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "# t\n\n```python\na = 1\n```\n\n```bash\nexit 1\n```\n\n```text\nnot code\n```\n\n"
        "- item\n\n  ```python\n  b = 2\n  ```\n\n````python\nc = '```'\n````\n",
        encoding="utf-8",
    )
    assert python_blocks(md) == [(4, "a = 1\n"), (18, "b = 2\n"), (22, "c = '```'\n")]


def test_docs_have_python_blocks() -> None:
    # README and the docs pages carry runnable examples; losing them all would be a regression.
    assert len(_params()) >= 3


# Optional extras a block may need; without them the block is skipped (with
# the reason), as the extra's own tests are. `.ci/run` installs them all.
OPTIONAL = ("jax", "lightning", "torchjd", "transformers")
IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.M)


@pytest.mark.parametrize("code", _params())
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    for module in sorted(set(IMPORT.findall(code)) & set(OPTIONAL)):
        pytest.importorskip(module, reason=f"the block needs the optional {module!r} extra")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


# ----------------------------------------------------------------- install commands
EXTRAS = re.compile(r'"?\.\[(?P<extras>[a-z,_-]+)\]"?')
# Extras a CPU cannot run (CuPy needs CUDA) or that only serve the static checks.
NOT_IN_TEST_COMMAND = {"cupy", "docs", "dev"}


def _pyproject_extras() -> set[str]:
    """Names of ``[project.optional-dependencies]`` (read as text: no TOML parser on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    names = set(re.findall(r"^([A-Za-z][\w-]*)\s*=", section, re.M))
    assert {"torch", "test"} <= names, names
    return names


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^## (.+)$", text, re.M)
    assert first and first.group(1) == "The two commands", "README must lead with its two commands"
    block = re.search(r"```bash\n(.*?)```", text[first.end() :], re.S)
    assert block
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_leads_with_the_main_job_and_the_test_command() -> None:
    run, test = _readme_commands()
    assert run.startswith('pip install "torch==2.13.0" && ') and run.endswith("bogc bench")
    assert test.startswith('pip install "torch==2.13.0" && ') and test.endswith("&& pytest")


def test_readme_test_command_installs_every_extra_a_cpu_runs() -> None:
    _, test = _readme_commands()
    found = EXTRAS.search(test)
    assert found, test
    extras = set(found.group("extras").split(","))
    assert extras == _pyproject_extras() - NOT_IN_TEST_COMMAND


def test_ci_installs_the_readme_extras_plus_docs_and_dev() -> None:
    _, test = _readme_commands()
    readme = EXTRAS.search(test)
    ci = [EXTRAS.search(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("pip install") and ".[" in line]
    assert readme and len(ci) == 1 and ci[0]
    assert set(ci[0].group("extras").split(",")) == (
        set(readme.group("extras").split(",")) | {"docs", "dev"})
