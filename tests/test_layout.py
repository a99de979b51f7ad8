"""How the code is laid out, checked from its source with `ast`: the package's imports form no circle
(function-level and TYPE_CHECKING imports included), nothing below the endpoint's entry point reads
an ENDPOINT_* variable, the product does not import the test kit, and no comment points at a tracker
or at notes that are not in this repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "finetune_phi"
PRODUCT = [PACKAGE, REPO / "finetuning_dir", REPO / "chat_flow", REPO / "maf_flows", REPO / "eval_flow"]
TOP_SCRIPTS = ["config.py", "setup_ml.py", "deploy_model.py", "download_dataset.py", "integrate_with_promptflow.py"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body, resolved to the most specific known name."""
    here = module_name(path)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        # `from finetune_phi import x` names the package itself too: that edge is only the package's
        # __init__ being run, which imports nothing of its own.
        if name and name != here:
            found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_a_circle_and_passes_a_tree() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_package_imports_form_no_circle() -> None:
    modules = package_modules()
    known = set(modules)
    graph = {name: imported(path, known) for name, path in modules.items()}
    assert "finetune_phi.endpoint.engine" in graph["finetune_phi.endpoint.batcher"]  # the walk sees real edges
    assert cycles(graph) == []


def endpoint_env_reads(path: Path) -> list[str]:
    """ENDPOINT_* names a module reads from the environment: os.environ[...], os.environ.get(...), os.getenv(...)."""
    reads = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        key = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv", "os.environ.setdefault"):
            key = node.args[0] if node.args else None
        if key is not None:
            text = ast.unparse(key)
            if "ENDPOINT_" in text:
                reads.append(f"{path.name}:{node.lineno} {text}")
    return reads


def test_the_env_read_finder_sees_each_spelling(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os\na = os.environ['ENDPOINT_X']\nb = os.environ.get('ENDPOINT_Y')\nc = os.getenv('ENDPOINT_Z')\nd = os.getenv('HOME')\n")
    assert endpoint_env_reads(sample) == ["m.py:2 'ENDPOINT_X'", "m.py:3 'ENDPOINT_Y'", "m.py:4 'ENDPOINT_Z'"]


def test_nothing_below_the_endpoints_entry_point_reads_an_endpoint_variable() -> None:
    below = [p for p in sorted((PACKAGE / "endpoint").glob("*.py")) if p.name != "__main__.py"]
    assert len(below) > 5
    assert [read for p in below for read in endpoint_env_reads(p)] == []


def product_files() -> list[Path]:
    files = [REPO / name for name in TOP_SCRIPTS]
    for folder in PRODUCT:
        files += sorted(folder.rglob("*.py"))
    return files


def test_the_product_never_imports_the_test_kit() -> None:
    offenders = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("testkit", "tests") for a in node.names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("testkit", "tests"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("pattern", [r"issue #\d", r"known-traps"])
def test_no_python_file_points_at_the_tracker_or_at_notes_outside_the_repository(pattern: str) -> None:
    files = product_files() + sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    files += sorted((REPO / "testkit").glob("*.py"))
    this = Path(__file__).resolve()
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files if p.resolve() != this
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]  # fmt: skip
    assert hits == []
