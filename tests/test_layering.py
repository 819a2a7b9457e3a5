"""The import-linter contracts in pyproject.toml hold (layering from the developers' brief)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert f"{len(declared['contracts'])} kept, 0 broken" in result.stdout


def test_privacy_package_source_never_mentions_torch_or_flwr_imports() -> None:
    # Belt and braces: catches lazy imports inside functions that grimp also sees, and
    # importlib-style strings it would not.
    for path in (ROOT / "privacy").rglob("*.py"):
        text = path.read_text()
        for banned in ("import torch", "from torch", "import flwr", "from flwr", "opacus"):
            assert banned not in text, f"{path} mentions {banned!r}"


def test_no_module_of_fedcrm_is_part_of_an_import_cycle() -> None:
    import grimp

    graph = grimp.build_graph("fedcrm")
    modules = sorted(graph.modules)
    # Tarjan-free check: a module is in a cycle iff it can reach itself through its imports.
    in_cycle = [
        m for m in modules
        if any(graph.chain_exists(imported=m, importer=dep)
               for dep in graph.find_modules_directly_imported_by(m))
    ]
    assert in_cycle == [], f"modules in an import cycle: {in_cycle}"


def test_the_wheel_installs_only_the_fedcrm_package(tmp_path: Path) -> None:
    import shutil
    import zipfile

    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                      "__pycache__", "results", ".*_cache"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedcrm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fedcrm"}, top
    # the role folders are in the package as real files, not links
    for module in ("privacy/ledger.py", "audit/verify.py", "coordinator/events.py",
                   "clients/client_app.py", "server/strategies.py", "flower/records.py",
                   "simulations/run.py"):
        assert f"fedcrm/{module}" in names, module
