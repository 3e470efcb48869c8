"""The house rules, checked from the code's own imports (read with ast, nothing imported):

* the core (`kubetune`) needs only pydantic and PyYAML: it imports neither kopf, kubernetes nor torch,
  and none of the other packages, except that the CLI imports each subcommand's package lazily;
* the operator, the trainer and the serving runtime each depend on the core and never on each other;
* no package has an import cycle between its modules (a function-level import that only hides a
  cycle from the interpreter counts too).
"""

import ast
import sys
from pathlib import Path

import pytest

from tests.examples import REPO

pytestmark = pytest.mark.unit

PACKAGES = {
    "kubetune": REPO / "core" / "kubetune",
    "kubetune_operator": REPO / "operator" / "kubetune_operator",
    "kubetune_trainer": REPO / "trainer_image" / "kubetune_trainer",
    "kubetune_serve": REPO / "trainer_image" / "kubetune_serve",
    "kubetune_kernels": REPO / "kernels" / "kubetune_kernels",
}
# Which of our packages each package may import.
ALLOWED = {
    "kubetune": set(),
    "kubetune_operator": {"kubetune"},
    "kubetune_trainer": {"kubetune", "kubetune_kernels"},
    "kubetune_serve": {"kubetune", "kubetune_kernels"},  # grouped LoRA for batched serving
    "kubetune_kernels": set(),
}
CLI = "kubetune.cli"
CLI_SUBCOMMAND_PACKAGES = {"kubetune_operator", "kubetune_trainer", "kubetune_serve"}
# The core's third-party imports at module level; backends that a function imports when it needs
# them (boto3 for s3://, ...) are optional and allowed, but never these:
CORE_THIRD_PARTY = {"pydantic", "pydantic_core", "yaml"}
NEVER_IN_CORE = {"kopf", "kubernetes", "torch"}


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    return ".".join((package, *parts)).removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(p, f): f for p, root in PACKAGES.items() for f in sorted(root.rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement, relative ones resolved.
    Module level: run when the module is imported, i.e. not inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []
    pending: list[tuple[ast.AST, bool]] = [(tree, True)]
    while pending:
        node, module_level = pending.pop()
        if isinstance(node, ast.Import):
            found += [(alias.name, module_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                found += [(f"{base}.{alias.name}", module_level) for alias in node.names]
            else:
                found.append((node.module or "", module_level))
        inner = module_level and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        pending += [(child, inner) for child in ast.iter_child_nodes(node)]
    return found


def package_of(module: str) -> str:
    return module.split(".")[0]


def edges() -> list[tuple[str, str, bool]]:
    return [(name, target, level) for name, path in modules().items() for target, level in imports(name, path)]


def test_the_packages_depend_only_on_the_core():
    wrong = []
    for source, target, module_level in edges():
        src, dst = package_of(source), package_of(target)
        if dst not in PACKAGES or dst == src or dst in ALLOWED[src]:
            continue
        if source == CLI and dst in CLI_SUBCOMMAND_PACKAGES and not module_level:
            continue  # `kubetune train` imports the trainer when it runs, and so on
        wrong.append(f"{source} imports {target}")
    assert wrong == []


def test_the_core_needs_only_pydantic_and_pyyaml():
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for source, target, module_level in edges():
        top = package_of(target)
        if package_of(source) != "kubetune" or top in PACKAGES:
            continue
        if top in NEVER_IN_CORE:
            wrong.append(f"{source} imports {target}")
        elif module_level and top not in stdlib and top not in CORE_THIRD_PARTY:
            wrong.append(f"{source} imports {target} when it is imported")
    assert wrong == []


def test_no_package_has_an_import_cycle():
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for source, target, _ in edges():
        if package_of(source) != package_of(target):
            continue
        while target and target not in known:  # `from .x import name` names a module or an attribute
            target = target.rpartition(".")[0]
        if target and target != source and not source.startswith(target + "."):  # a parent package is fine
            graph[source].add(target)
    assert find_cycles(graph) == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_checks_see_a_forbidden_edge_and_a_cycle():
    """The rules above can fail: a cycle is found, and a trainer→operator import would be."""
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert "kubetune_operator" not in ALLOWED["kubetune_trainer"]
    assert ("kubetune.cli", "kubetune_trainer.launch", False) in edges()
