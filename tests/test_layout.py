"""The package's layout rules, checked on its import graph (built with `ast`, nothing imported).

1. No import cycle among adaptor modules. Counted: imports at module level, the ones
   Python runs while importing a module, where a cycle makes the result depend on
   which module is imported first (a half-initialised module, an ImportError).
   Not counted: imports inside functions (deferred on purpose, for optional
   dependencies such as Beam or Qdrant and for heavy ones such as JAX in worker
   processes; they run after every module is loaded) and imports under
   `if __name__ == "__main__":` (they run only when the file is the entry script,
   e.g. `python -m adaptor.beam`, never when it is imported).
   `import adaptor` (the package, whose __init__ imports the library) from a module
   that __init__ imports is a cycle; `__version__` comes from adaptor/_version.py.
2. `import argparse` only in adaptor/cli/: argument parsing is the CLI's business.
3. No module (nor any experiment script) uses another module's private names: neither
   `from adaptor.x import _y` nor `x._y` on an imported adaptor module. Helpers
   shared across modules are public in the module that owns them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "adaptor"


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_main_guard(node) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _walk(node, in_function=False):
  """Yields (node, in_function) below `node`, skipping `if __name__ == "__main__":` blocks."""
  for child in ast.iter_child_nodes(node):
    if _is_main_guard(child):
      continue
    yield child, in_function
    yield from _walk(child, in_function or isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _scan(name: str, path: Path):
  """(module-level import targets, [problem, ...]) of one module."""
  targets, problems = set(), []
  aliases = {}  # local name -> adaptor module it is bound to
  tree = ast.parse(path.read_text(), str(path))
  for node in tree.body:  # `x = importlib.import_module("adaptor.x")` binds a module too.
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "attr", None) == "import_module" and node.value.args
        and isinstance(node.value.args[0], ast.Constant)):
      for t in node.targets:
        if isinstance(t, ast.Name):
          aliases[t.id] = node.value.args[0].value
  for node, in_function in _walk(tree):
    found = []
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name == "argparse" and not name.startswith("adaptor.cli"):
          problems.append(f"{path}:{node.lineno}: import argparse outside adaptor/cli/")
        if a.name.split(".")[0] == "adaptor":
          found.append(a.name)
          aliases[a.asname or "adaptor"] = a.name if a.asname else "adaptor"
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "argparse" and not name.startswith("adaptor.cli"):
        problems.append(f"{path}:{node.lineno}: from argparse import outside adaptor/cli/")
      if node.module.split(".")[0] != "adaptor":
        continue
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in MODULES:
          found.append(full)
          aliases[a.asname or a.name] = full
        else:
          found.append(node.module)
          if _private(a.name):
            problems.append(f"{path}:{node.lineno}: from {node.module} import {a.name}")
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and str(node.args[0].value) in MODULES):
      found.append(node.args[0].value)
    elif isinstance(node, ast.Attribute) and _private(node.attr):
      owner = _owner(node.value, aliases)
      if owner is not None and owner != name:
        problems.append(f"{path}:{node.lineno}: {owner}.{node.attr}")
    if not in_function:
      targets.update(found)
  return targets, problems


def _owner(value, aliases):
  """The adaptor module an expression like `search_lib` or `quant.search_lib` stands for."""
  if isinstance(value, ast.Name):
    return aliases.get(value.id)
  if isinstance(value, ast.Attribute):
    base = _owner(value.value, aliases)
    if base is not None and f"{base}.{value.attr}" in MODULES:
      return f"{base}.{value.attr}"
  return None


def _graph():
  edges, problems = {}, []
  for name, path in MODULES.items():
    edges[name], found = _scan(name, path)
    problems += found
  return edges, problems


def _cycles(edges) -> list[list[str]]:
  """Strongly connected components of more than one module (or a self-import)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges.get(v, ()):
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_the_package():
  edges, _ = _graph()
  assert {"adaptor", "adaptor.cli", "adaptor.index", "adaptor._version"} <= set(edges)
  assert "adaptor.api" in edges["adaptor"]  # __init__ re-exports the API


def test_no_import_cycles():
  edges, _ = _graph()
  assert _cycles(edges) == []


def test_argparse_only_in_the_cli_and_no_private_imports_across_modules():
  _, problems = _graph()
  assert problems == [], "\n".join(problems)


def test_the_checker_catches_what_it_should(tmp_path):
  # Each rule on a made-up module: the test must not pass by seeing nothing.
  bad = tmp_path / "bad.py"
  bad.write_text("import argparse\nimport adaptor\nfrom adaptor.data import _load\n"
                 "from adaptor import search as s\nx = s._GROUP\n")
  _, problems = _scan("adaptor.bad", bad)
  assert len(problems) == 3, problems
  assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_experiments_use_only_public_names():
  # Experiments are the library's first users: rule 3 holds for them too (argparse is theirs).
  problems = []
  for path in sorted((ROOT.parent / "experiments").glob("*.py")):
    _, found = _scan(f"experiments.{path.stem}", path)
    problems += [p for p in found if "argparse" not in p]
  assert problems == [], "\n".join(problems)
