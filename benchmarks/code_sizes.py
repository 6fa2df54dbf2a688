"""The largest functions and classes, and the modules over 400 lines, of a package.

    python benchmarks/code_sizes.py dtrain
"""

from __future__ import annotations

import ast
import pathlib
import sys


def sizes(root):
    """(items, modules): (lines, "path:line name") of every def/class, (lines, path) of big
    modules."""
    items, modules = [], []
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        source = path.read_text()
        lines = source.count("\n")
        if lines > 400:
            modules.append((lines, str(path)))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                items.append((node.end_lineno - node.lineno + 1,
                              f"{path}:{node.lineno} {node.name}"))
    return sorted(items, reverse=True), sorted(modules, reverse=True)


def main():
    items, modules = sizes(sys.argv[1] if len(sys.argv) > 1 else "dtrain")
    print("10 largest functions/classes:")
    for lines, where in items[:10]:
        print(f"  {lines:5d} {where}")
    print("modules over 400 lines:")
    for lines, where in modules:
        print(f"  {lines:5d} {where}")


if __name__ == "__main__":
    main()
