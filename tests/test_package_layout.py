"""The project's top-level packages: their names and the direction of their imports.

transformers >= 5.25 depends on Hugging Face's `kernels` distribution, whose import name
is `kernels`. A project package of that name shadowed it (or was shadowed by it), and
transformers' processor imports failed with `cannot import name 'CUDAProperties' from
'kernels'`. The Triton kernels therefore live in `mmkernels/`. These tests pin that no
project package shares a name with an installed distribution's package, and the import
rules of DESIGN.md ("Layout").
"""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmengine", "processors", "encoders", "mmkernels")


def _declared_packages() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.rstrip("*") for p in include)


def test_pyproject_installs_exactly_the_layout_packages() -> None:
    assert _declared_packages() == sorted(PACKAGES)
    for name in PACKAGES:
        assert (ROOT / name / "__init__.py").is_file(), name


def test_no_project_package_shares_a_name_with_an_installed_distribution() -> None:
    owners = importlib.metadata.packages_distributions()
    for name in PACKAGES:
        others = {d for d in owners.get(name, []) if d.lower() != "mmengine"}
        assert not others, f"top-level package {name!r} is also shipped by {others}"


def test_transformers_imports_its_hub_kernels_integration() -> None:
    # The failure that renamed `kernels/`: transformers' processors import this module.
    import transformers.integrations.hub_kernels  # noqa: F401
    from transformers import AutoProcessor  # noqa: F401


def _imported_roots(package: str) -> dict[str, set[str]]:
    """file -> top-level module names it imports (absolute imports only)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        roots: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = roots
    return out


def test_imports_flow_one_way_between_the_packages() -> None:
    # DESIGN.md: mmengine uses the other three; encoders may use mmkernels and processors;
    # mmkernels imports no project package; nothing imports mmengine from the other three.
    forbidden = {
        "mmkernels": {"mmengine", "processors", "encoders"},
        "encoders": {"mmengine"},
        "processors": {"mmengine", "encoders", "mmkernels"},
    }
    bad = [
        f"{file} imports {sorted(roots & banned)}"
        for package, banned in forbidden.items()
        for file, roots in _imported_roots(package).items()
        if roots & banned
    ]
    assert not bad, bad


def test_no_file_imports_the_old_kernels_package_name() -> None:
    stale = [
        file
        for package in (*PACKAGES, "tests", "benchmarks", "examples", "training")
        if (ROOT / package).is_dir()
        for file, roots in _imported_roots(package).items()
        if "kernels" in roots
    ]
    assert not stale, stale
