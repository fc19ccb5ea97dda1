"""The import rules of docs/ARCHITECTURE.md, checked on the source with ``ast`` (nothing is imported or run).

``python tests/architecture.py [SRC]`` prints the report (lines per package, the largest files, import circles,
private names imported across modules, imports inside functions, upward imports between floors);
``tests/test_architecture.py`` asserts the rules on ``src/tar_lightning``. ``SRC`` defaults to that folder;
give another checkout's ``src/tar_lightning`` to measure it (the "before" of a refactor).

Rules:

- **No circles**: the graph of our imports (anywhere in a file, function bodies included; ``TYPE_CHECKING``
  blocks excluded) has no cycle. ``from a.b import c`` where ``a.b.c`` is a module is an edge to ``a.b.c``;
  otherwise to ``a.b`` (its ``__init__`` for a package). A module's own parent packages are not edges (Python
  has started them already).
- **No private names across modules**: ``from x import _y`` only inside the module that defines it.
- **No own code imported inside a function.** A third-party import inside a function must be an optional
  dependency, said so by a comment containing ``optional dependency`` on its line or the line above.
- **Floors**: a module imports only from its own floor or lower ones (``FLOORS``).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "tar_lightning"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# longest prefix wins; docs/ARCHITECTURE.md section 1 describes each floor
FLOORS = {
    "tar_lightning.errors": 0,
    "tar_lightning.common": 0,
    "tar_lightning.schema": 0,
    "tar_lightning.resources": 0,
    "tar_lightning.checkpoint": 0,
    "tar_lightning.models": 1,
    "tar_lightning.data": 1,
    "tar_lightning.losses": 1,
    "tar_lightning.adversaries": 2,
    "tar_lightning.snapshot": 2,
    "tar_lightning.persistent": 2,
    "tar_lightning.tar_config": 3,
    "tar_lightning.tar_module": 3,
    "tar_lightning.base_module": 3,
    "tar_lightning.safeguards": 3,
    "tar_lightning.strategy": 3,
    "tar_lightning.sharding": 3,
    "tar_lightning.grad_sync": 3,
    "tar_lightning.guards": 3,
    "tar_lightning.evaluation": 4,
    "tar_lightning.callbacks": 4,
    "tar_lightning.evaluation.evaluate_cli": 5,
    "tar_lightning.evaluation.redteam_cli": 5,
    "tar_lightning.cli": 5,
    "tar_lightning.command": 5,
    "tar_lightning.demo": 5,
    "tar_lightning.export": 5,
    "tar_lightning.report_cli": 5,
    "tar_lightning": 5,  # the facade (__init__)
}


def floor_of(module: str) -> int | None:
    best = None
    for prefix, level in FLOORS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, level)
    return None if best is None else best[1]


@dataclass
class Import:
    module: str  # importing module
    path: Path
    line: int
    target: str  # imported module (ours or third-party top-level name)
    names: tuple[str, ...]
    in_function: bool
    type_checking: bool
    comment: str  # this line and the one above

    @property
    def ours(self) -> bool:
        return self.target == PACKAGE or self.target.startswith(PACKAGE + ".")

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent)}:{self.line}"


@dataclass
class Report:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    # ------------------------------------------------------------------ findings
    def edges(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = defaultdict(set)
        for imp in self.imports:
            if imp.ours and not imp.type_checking and imp.target != imp.module and imp.target in self.modules:
                if imp.module.startswith(imp.target + "."):
                    continue  # a parent package: already being imported
                graph[imp.module].add(imp.target)
        return graph

    def circles(self) -> list[list[str]]:
        graph = self.edges()
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        out: list[list[str]] = []
        counter = [0]

        def visit(v: str) -> None:
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in sorted(graph.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        for v in sorted(self.modules):
            if v not in index:
                visit(v)
        return sorted(out)

    def private_imports(self) -> list[Import]:
        return [i for i in self.imports if i.ours and i.target != i.module
                and any(n.startswith("_") and not n.startswith("__") for n in i.names)]

    def hidden_own_imports(self) -> list[Import]:
        """Own code imported inside a function (outside ``TYPE_CHECKING``)."""
        return [i for i in self.imports if i.ours and i.in_function and not i.type_checking]

    def third_party_in_functions(self) -> list[Import]:
        return [i for i in self.imports if not i.ours and i.in_function and not i.type_checking]

    def unmarked_third_party_in_functions(self) -> list[Import]:
        return [i for i in self.third_party_in_functions() if "optional dependency" not in i.comment]

    def upward_imports(self) -> list[Import]:
        out = []
        for i in self.imports:
            if not i.ours or i.type_checking or i.target not in self.modules:
                continue
            src, dst = floor_of(i.module), floor_of(i.target)
            if src is not None and dst is not None and dst > src:
                out.append(i)
        return out

    def package_lines(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for mod, n in self.lines.items():
            parts = mod.split(".")
            is_pkg = self.modules[mod].name == "__init__.py"
            key = ".".join(parts if is_pkg else parts[:-1]) if len(parts) > 1 else mod
            out[key] += n
        return dict(sorted(out.items()))


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def analyse(root: Path = SRC) -> Report:
    """Reads every module under ``root`` (a package folder) and records its imports."""
    root = Path(root).resolve()
    report = Report(root)
    for path in sorted(root.rglob("*.py")):
        report.modules[_module_name(root, path)] = path
    for module, path in report.modules.items():
        _scan(report, module, path)
    return report


def _scan(report: Report, module: str, path: Path) -> None:
    text = path.read_text()
    source_lines = text.splitlines()
    report.lines[module] = len(source_lines)
    tree = ast.parse(text, filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def add(line: int, target: str, names: tuple[str, ...], in_function: bool, type_checking: bool) -> None:
        comment = "\n".join(source_lines[max(line - 2, 0):line])  # the import's line and the one above
        report.imports.append(Import(module, path, line, target, names, in_function, type_checking, comment))

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package[: len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def walk(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name if alias.name.startswith(PACKAGE) else alias.name.split(".")[0]
                    add(child.lineno, target, (), in_function, type_checking)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child)
                if base == "__future__":
                    continue
                names = tuple(a.name for a in child.names)
                if base == PACKAGE or base.startswith(PACKAGE + "."):
                    # an imported name that is a module is an edge to that module; the rest, one to ``base``
                    rest = tuple(n for n in names if f"{base}.{n}" not in report.modules)
                    for n in names:
                        if f"{base}.{n}" in report.modules:
                            add(child.lineno, f"{base}.{n}", (n,), in_function, type_checking)
                    if rest:
                        add(child.lineno, base, rest, in_function, type_checking)
                else:
                    add(child.lineno, base.split(".")[0], names, in_function, type_checking)
            walk(child, fn, tc)

    walk(tree, False, False)


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else SRC
    r = analyse(root)
    total = sum(r.lines.values())
    print(f"{root}: {len(r.modules)} modules, {total} lines")
    print("\nlines per package:")
    for pkg, n in r.package_lines().items():
        print(f"  {pkg:45s} {n:6d}")
    print("\nlargest files:")
    for mod, n in sorted(r.lines.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {r.modules[mod].relative_to(root.parent)!s:55s} {n:6d}")
    sections = [
        ("import circles", [" <-> ".join(c) for c in r.circles()]),
        ("private names imported across modules",
         [f"{i.where(root)}  {', '.join(i.names)} from {i.target}" for i in r.private_imports()]),
        ("own code imported inside a function",
         [f"{i.where(root)}  {i.target}" for i in r.hidden_own_imports()]),
        ("third-party imports inside a function without an 'optional dependency' comment",
         [f"{i.where(root)}  {i.target}" for i in r.unmarked_third_party_in_functions()]),
        ("upward imports (floor of target > floor of importer)",
         [f"{i.where(root)}  {i.module} ({floor_of(i.module)}) -> {i.target} ({floor_of(i.target)})"
          for i in r.upward_imports()]),
    ]
    for title, rows in sections:
        print(f"\n{title}: {len(rows)}")
        for row in rows:
            print(f"  {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
