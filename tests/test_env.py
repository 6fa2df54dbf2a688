"""Every DTRAIN_* environment variable is declared and read in one module (dtrain/env.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dtrain import env

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dtrain"


def _environ_reads(tree):
    """Names of the string keys read from os.environ / os.getenv in a module."""
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call):
            func = node.func
            is_get = (isinstance(func, ast.Attribute) and func.attr in ("get", "getenv", "pop")
                      and ("environ" in ast.unparse(func.value) or ast.unparse(func.value) == "os"))
            if is_get and node.args and isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
            if isinstance(node.slice, ast.Constant):
                key = node.slice.value
        elif isinstance(node, ast.Compare) and any("environ" in ast.unparse(c)
                                                   for c in node.comparators):
            if isinstance(node.left, ast.Constant):
                key = node.left.value
        if isinstance(key, str):
            yield key


def test_no_module_but_env_reads_a_dtrain_variable():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "env.py":
            continue
        for key in _environ_reads(ast.parse(path.read_text())):
            if key.startswith("DTRAIN_"):
                offenders.append(f"{path.relative_to(ROOT)} reads {key}")
    assert not offenders, "read DTRAIN_* through dtrain.env: " + "; ".join(offenders)


def test_every_variable_named_in_the_code_is_declared_and_documented():
    named = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        named |= set(re.findall(r"\bDTRAIN_[A-Z_]+[A-Z]\b", path.read_text()))
    assert named <= set(env.VARIABLES), f"undeclared: {sorted(named - set(env.VARIABLES))}"
    table = (ROOT / "docs" / "environment.md").read_text()
    missing = [name for name in env.VARIABLES if f"`{name}`" not in table]
    assert not missing, f"docs/environment.md lacks {missing}"


def test_get_and_flag(monkeypatch):
    monkeypatch.setenv("DTRAIN_TRACE", "")
    assert env.get("DTRAIN_TRACE") is None and not env.flag("DTRAIN_TRACE")
    monkeypatch.setenv("DTRAIN_TRACE", "t.json")
    assert env.get("DTRAIN_TRACE") == "t.json" and env.flag("DTRAIN_TRACE")
    with pytest.raises(KeyError, match="DTRAIN_TRACES"):
        env.get("DTRAIN_TRACES")


def test_the_check_sees_a_direct_read():
    tree = ast.parse('import os\nx = os.environ.get("DTRAIN_X")\ny = os.environ["DTRAIN_Y"]\n'
                     'z = "DTRAIN_Z" in os.environ\nw = os.getenv("DTRAIN_W")\n')
    assert sorted(_environ_reads(tree)) == ["DTRAIN_W", "DTRAIN_X", "DTRAIN_Y", "DTRAIN_Z"]
