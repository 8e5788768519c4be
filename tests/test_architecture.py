"""The architecture document is true: grpo_lib's modules import one way, in the order DESIGN.md lists them
(lazy imports inside functions included), and every module is listed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def documented_order() -> list[str]:
    text = (ROOT / "DESIGN.md").read_text()
    block = text.split("## Modules, in import order")[1].split("```")[1]
    return [line.split()[0] for line in block.strip().splitlines() if line.strip()]


def grpo_lib_imports(path: Path) -> set[str]:
    """The grpo_lib modules a file imports, anywhere in it (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("grpo_lib"):
                base = module.removeprefix("grpo_lib").lstrip(".")
                found |= {base.split(".")[0]} if base else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("grpo_lib.")}
    return found - {"__version__"}


def test_every_module_is_documented():
    modules = {p.stem for p in (ROOT / "grpo_lib").glob("*.py")} - {"__init__", "__main__"}
    assert set(documented_order()) == modules


def test_imports_run_one_way():
    order = documented_order()
    rank = {name: i for i, name in enumerate(order)}
    backwards = []
    for name in order:
        for imported in grpo_lib_imports(ROOT / "grpo_lib" / f"{name}.py") - {name}:
            if rank[imported] > rank[name]:
                backwards.append(f"{name} imports {imported}")
    assert not backwards, f"imports against DESIGN.md's order: {backwards}"


def test_the_clone_points_to_its_own_design_document():
    for path in ("grpo_lib/__init__.py", "notebooks/README.md", "README.md"):
        text = (ROOT / path).read_text()
        assert re.search(r"DESIGN\.md", text), path
    assert (ROOT / "DESIGN.md").is_file()


def test_the_command_line_needs_no_notebook_packages():
    """No module the command line reaches imports widgets, ipywidgets or IPython (anywhere in the file); the
    subprocess check that it trains with them unimportable is in tests/test_cli.py."""
    reached, todo = set(), ["cli"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += grpo_lib_imports(ROOT / "grpo_lib" / f"{name}.py")
    notebook = {"ipywidgets", "IPython"}
    offenders = sorted(name for name in reached if name == "widgets" or any(
        (isinstance(n, ast.Import) and {a.name.split(".")[0] for a in n.names} & notebook)
        or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in notebook)
        for n in ast.walk(ast.parse((ROOT / "grpo_lib" / f"{name}.py").read_text()))))
    assert "console" in reached and not offenders, offenders
