"""The package's layering (docs/architecture.md), read from its import statements, function-local ones included."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "stpg_jax"


def import_graph() -> dict:
    """{module: the package's modules it imports}, e.g. 'stpg_jax.train' → {'stpg_jax.build', ...}."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts).removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stpg_jax":
                for alias in node.names:  # `from stpg_jax import losses` imports the module stpg_jax.losses
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "stpg_jax")
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "stpg_jax.build" in graph["stpg_jax.train"]  # the graph is read at all
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_step_and_the_evaluation_know_no_dataset_and_the_libraries_nothing_else():
    graph = import_graph()

    def reaches(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    for module in ("stpg_jax.train_step", "stpg_jax.inference", "stpg_jax.build"):
        assert not any(m.startswith("stpg_jax.data") for m in reaches(module)), module
    for library in ("stpg_jax.losses", "stpg_jax.models"):
        members = [m for m in graph if m == library or m.startswith(library + ".")]
        outside = {d for m in members for d in graph[m] if not d.startswith(library)}
        assert not outside, (library, outside)
