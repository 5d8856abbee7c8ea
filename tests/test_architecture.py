"""Layering rules that linters express poorly: what the pure modules may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE_DISPATCHER = [
    "jobs",
    "core",
    "policy",
    "effects",
    "stats",
    "errors",
    "ledger",
    "exchange",
    "retention",
]
FORBIDDEN_EVERYWHERE_PURE = {
    "asyncio",
    "anyio",
    "time",
    "socket",
    "threading",
    "trio",
    "starlette",
    "uvicorn",
    "databases",
    "aiosqlite",
    "sqlite3",
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_is_pure(path: Path) -> None:
    """protocol/ uses the stdlib (no I/O, loop or clock), orjson, and cryptography for receipts."""
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_EVERYWHERE_PURE, f"{path.name} imports {name}"
        assert top not in {"storage", "dispatcher", "web"}, f"{path.name} imports {name}"
        if top == "orjson":
            assert path.name == "codec.py", "orjson belongs to protocol/codec.py only"
        if top == "cryptography":
            assert path.name == "receipts.py"


@pytest.mark.parametrize("module", PURE_DISPATCHER)
def test_pure_dispatcher_modules(module: str) -> None:
    """The scheduler core never touches the loop, the clock or storage."""
    for name in imports_of(ROOT / "dispatcher" / f"{module}.py"):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_EVERYWHERE_PURE, f"dispatcher/{module}.py imports {name}"
        assert top not in {"storage", "web"}, f"dispatcher/{module}.py imports {name}"


def test_third_party_ownership() -> None:
    """Database drivers only in their store: databases/aiosqlite in storage/sql.py, asyncpg
    (and databases) in storage/postgres.py; starlette/uvicorn only in web/."""
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] not in {"protocol", "storage", "dispatcher", "web"}:
            continue
        tops = {n.split(".")[0] for n in imports_of(path)}
        where = path.relative_to(ROOT).as_posix()
        if tops & {"aiosqlite", "sqlite3"}:
            assert where == "storage/sql.py", where
        if "asyncpg" in tops:
            assert where == "storage/postgres.py", where
        if "databases" in tops:
            assert where in ("storage/sql.py", "storage/postgres.py"), where
        if tops & {"starlette", "uvicorn"}:
            assert path.parts[-2] == "web", path


def test_import_linter_contracts() -> None:
    """The layers contract protocol <- storage <- dispatcher <- web holds (import-linter)."""
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("package", ["protocol", "storage", "dispatcher", "web"])
def test_all_is_complete(package: str) -> None:
    """Every name in a package's __all__ exists (httpx's exported-members test)."""
    mod = __import__(package)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{package}.{name} is in __all__ but missing"
