"""No module under ``integrations/`` reaches into another module's private members.

A module may use its own private names and ``self._x`` / ``cls._x``; anything
else named ``_x`` (``cal._sample``, ``from .calibrator import _check``) couples
two modules through what one of them is free to change. The scan reads the
source (no import), so it also covers modules whose dependencies are missing.
Third-party private members the integrations must read are listed with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "integrations"

# attribute -> why an integration reads it (all third-party: torch keeps no public spelling)
ALLOWED_ATTRIBUTES = {
    "_version": "torch.Tensor's in-place version counter: tells a recorded layer output that "
                "was modified after the forward pass",
    "_input_metadata": "an autograd node's input shapes: tells a batch-1 position Embedding "
                       "broadcast over the batch by an add (shortcut.broadcast_parent)",
    "_C": "torch's C extension, for _current_graph_task_id below",
    "_current_graph_task_id": "whether autograd is running a backward pass (a non-reentrant "
                              "checkpoint recomputing its forward), so hooks record nothing then",
    "_save_checkpoint": "transformers.Trainer's checkpoint writer: BOGCTrainer extends it to put "
                        "the calibrator's state into each checkpoint folder",
    "_load_from_checkpoint": "transformers.Trainer's checkpoint reader: BOGCTrainer extends it to "
                             "restore the calibrator's state on resume_from_checkpoint",
}
# (module, name) -> why
ALLOWED_IMPORTS = {
    ("torch.distributed._composable_state", "_module_state_mapping"):
        "FSDP2's module-to-state map, the only way to find a fully_shard'ed module's state",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def violations(path: Path) -> list[str]:
    """``line: text`` of every access to another module's private member in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name) and (node.module, alias.name) not in ALLOWED_IMPORTS:
                    out.append((node.lineno, f"from {'.' * node.level}{node.module or ''} "
                                             f"import {alias.name}"))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr not in ALLOWED_ATTRIBUTES:
                out.append((node.lineno, ast.unparse(node)))
    return [f"{line}: {text}" for line, text in sorted(out)]


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_module_uses_another_modules_private_members(path):
    assert violations(path) == []


def test_the_scan_finds_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from .calibrator import _check_losses\n"
        "def step(cal):\n"
        "    cal._problem(1)\n"
        "    return cal._agreement\n"
    )
    assert violations(bad) == ["1: from .calibrator import _check_losses", "3: cal._problem",
                               "4: cal._agreement"]
    good = tmp_path / "good.py"
    good.write_text(
        "def _helper():\n    return 1\n"
        "class A:\n"
        "    def f(self):\n        return self._x + _helper()\n"
        "    @classmethod\n    def g(cls):\n        return cls._y\n"
    )
    assert violations(good) == []
