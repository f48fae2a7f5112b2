"""The package's imports run one way: no cycle between modules, none between folders (deferred imports count too)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "cognica_poe")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports anywhere in its text} for every .py file of the package."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        here = name if is_package else name.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from .x import y` may name a module y of package x, or an attribute of module x
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def folder_of(module: str) -> str:
    """The folder a module lives in (a package's __init__ belongs to its own folder)."""
    path = os.path.join(os.path.dirname(PACKAGE), *module.split("."))
    return module if os.path.isdir(path) else module.rsplit(".", 1)[0]


def test_no_module_cycles():
    assert cycles(import_graph()) == []


def test_no_folder_cycles():
    """Between subfolders (train/, eval/, ...): the top folder holds both the core and the command line, so its
    modules are checked one by one above."""
    folders: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        a = folder_of(module)
        if a == "cognica_poe":
            continue
        folders.setdefault(a, set()).update(
            folder_of(t) for t in targets if folder_of(t) not in (a, "cognica_poe"))
    assert cycles(folders) == []
