"""The package's import graph: no cycles between modules, `hub/` imports only its siblings, `ops/` knows nothing of
transformers models, and the methods do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.testing_utils import repo_root

PACKAGE = repo_root() / "hf_effitrain"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("hf_effitrain") and c in MODULES)
    found.discard(name)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle between modules (ignoring a package's own `__init__` re-exports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(GRAPH[node]):
            if node.startswith(child + "."):  # a module importing its own package's __init__ is not a cycle
                continue
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("hf_effitrain.hub.")))
def test_hub_files_import_only_their_siblings(module):
    # they ship inside checkpoints, where `hf_effitrain` is not installed: `from .x import y` only
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1) and not (node.module or "").startswith("hf_effitrain"), ast.unparse(node)
            assert node.level == 0 or node.module, ast.unparse(node)  # not `from . import x` (the package __init__)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("hf_effitrain") for alias in node.names), ast.unparse(node)


def _external_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_ops_know_nothing_of_models():
    # pure tensor code: transformers only for its logger; the model glue lives in `hf_effitrain.integrations`
    for module in (m for m in MODULES if m.startswith("hf_effitrain.ops")):
        transformers_imports = {n for n in _external_imports(MODULES[module]) if n.split(".")[0] == "transformers"}
        assert transformers_imports <= {"transformers.utils"}, (module, transformers_imports)
        assert all(m.startswith(("hf_effitrain.ops", "hf_effitrain._moved")) for m in GRAPH[module]), (
            module,
            GRAPH[module],
        )


# the pre-training job (in `patch`, whose trainer it runs) also starts ODE-shared models from a Llama
ALLOWED_ACROSS_METHODS = {("hf_effitrain.methods.patch.job", "hf_effitrain.methods.ode.conversion")}


def test_methods_do_not_import_each_other():
    for module, imported in GRAPH.items():
        if module.startswith("hf_effitrain.methods."):
            method = module.split(".")[2]
            others = {
                m
                for m in imported
                if m.startswith("hf_effitrain.methods.")
                and m.split(".")[2] != method
                and (module, m) not in ALLOWED_ACROSS_METHODS
            }
            assert not others, f"{module} imports {sorted(others)}"
