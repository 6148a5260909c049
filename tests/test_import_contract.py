"""The trust boundary in imports: what runs in the enclave imports nothing from outside it.

Rules (every `import`, including imports inside functions, read from the source with `ast`):
- `enclave_bridge.measured` (the enclave's code) imports only itself, `enclave_bridge.shared`,
  the standard library and third-party libraries;
- `enclave_bridge.shared` imports only itself and third-party libraries;
- `enclave_bridge.gpu` (the untrusted worker) imports only itself and `enclave_bridge.shared`;
- the simulated measurement covers exactly the files of `measured` and `shared`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from enclave_bridge.shared.measurement import PACKAGE_ROOT, enclave_files

REPO = PACKAGE_ROOT.parent
PROJECT_PACKAGES = ("enclave_bridge", "pipeline", "stages", "config", "training", "tests", "benchmarks")
ALLOWED = {
    "enclave_bridge.measured": ("enclave_bridge.measured", "enclave_bridge.shared"),
    "enclave_bridge.shared": ("enclave_bridge.shared",),
    "enclave_bridge.gpu": ("enclave_bridge.gpu", "enclave_bridge.shared"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import sub` may name a submodule: check pkg.sub when it is a project module
            out.append((node.lineno, base))
            out.extend(
                (node.lineno, f"{base}.{a.name}") for a in node.names if _is_module(f"{base}.{a.name}")
            )
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((node.lineno, arg.value))
    return out


def _is_module(name: str) -> bool:
    p = REPO.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(package: str, allowed: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted(REPO.joinpath(*package.split(".")).rglob("*.py")):
        for line, name in imports_of(path):
            if name.split(".")[0] not in PROJECT_PACKAGES:
                continue  # standard library or third party
            if not any(_inside(name, a) for a in allowed):
                out.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_stay_inside_its_side_of_the_boundary(package: str) -> None:
    assert violations(package, ALLOWED[package]) == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a lazy import of host code inside a function is caught."""
    bad = REPO / "enclave_bridge" / "measured" / "_contract_probe.py"
    bad.write_text("def f():\n    from enclave_bridge.host import client\n    return client\n")
    try:
        found = violations("enclave_bridge.measured", ALLOWED["enclave_bridge.measured"])
    finally:
        bad.unlink()
    assert found == [
        "enclave_bridge/measured/_contract_probe.py:2 imports enclave_bridge.host",
        "enclave_bridge/measured/_contract_probe.py:2 imports enclave_bridge.host.client",
    ]


def test_measurement_covers_exactly_the_measured_packages() -> None:
    measured = {rel for rel, _ in enclave_files()}
    expected = {"__init__.py"} | {
        p.relative_to(PACKAGE_ROOT).as_posix()
        for d in ("measured", "shared")
        for p in (PACKAGE_ROOT / d).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert measured == expected
    assert not any(r.startswith(("host/", "gpu/")) for r in measured)
