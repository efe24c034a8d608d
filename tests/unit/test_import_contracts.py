"""The layering contracts in pyproject.toml hold, and each one fails when broken.

``make lint`` runs ``lint-imports``; this test runs it too, on the tree as it is and on a
copy with one violation per contract, so a contract that silently stopped checking
(a renamed module, a typo in a module list) fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"

# (file, line added, contract that must then break)
VIOLATIONS = [
    ("ciliary/output.py", "import nats", "NATS only through the bus"),
    ("services/node/agent.py", "import pyroute2",
     "the kernel (bcc, pyroute2) only through the node executor's kernel modules"),
    ("services/servicelb/maglev.py", "import asyncio",
     "pure cores import neither the bus, asyncio nor the kernel"),
    ("ciliary/output.py", "import ciliary.cli", "no import cycle between the shared library's modules"),
    ("services/policy/rules.py", "import services.identity.labels", "services never import each other"),
    ("ciliary/hubble.py", "import services.flows", "the shared library never imports a service"),
    ("services/flows/store.py", "import ciliary.cli", "services never import the CLI"),
]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})


def copy_tree(dest: Path) -> Path:
    for name in ("ciliary", "services"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_contracts_hold_on_the_tree() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_contract_breaks_on_a_violation(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    for path, line, _ in VIOLATIONS:
        target = tree / path
        target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint(tree)
    assert result.returncode != 0
    for _, _, contract in VIOLATIONS:
        assert f"{contract} BROKEN" in result.stdout, result.stdout
