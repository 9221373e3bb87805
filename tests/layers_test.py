"""The package's folders are layers: no module imports from a layer above its own.

The layers are docs/architecture.md's table, bottom up. Modules directly in
`bsf_jax/` are the entry points (the top layer). Imports inside functions
count too: a lazy import is still a dependency.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bsf_jax")
LAYERS = {"models": 0, "reference": 0, "data": 0, "step": 1, "infer": 1, "run": 2,
          "weights": 3, "trainers": 4, "bench": 5}
# Modules of `bsf_jax/` that are not entry points: `tool_flags` (how every tool,
# `data.prepare` and `data.check` among them, reads its flags) imports nothing
# of the package, so any layer may use it.
LEAVES = {"tool_flags": 0}
ENTRY_POINTS = 5


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:
    return ENTRY_POINTS
  return LAYERS.get(parts[1], LEAVES.get(parts[1], ENTRY_POINTS))


def _modules():
  for folder, _, files in os.walk(ROOT):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
        yield path, relative.replace(os.sep, ".").removesuffix(".__init__")


def _imports(path: str):
  """Every bsf_jax module `path` imports (for `from bsf_jax import x`: bsf_jax.x)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("bsf_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bsf_jax"):
      if node.module == "bsf_jax":
        yield from (f"bsf_jax.{a.name}" for a in node.names)
      else:
        yield node.module


def test_the_layer_table_names_every_folder():
  folders = {d for d in os.listdir(ROOT)
             if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
  assert folders == set(LAYERS), "update LAYERS and docs/architecture.md together"


def test_no_module_imports_from_a_layer_above():
  upward, modules = [], 0
  for path, module in _modules():
    modules += 1
    own = module.split(".")[:2]
    upward += [f"{module} (layer {_layer(module)}) imports {name} (layer {_layer(name)})"
               for name in _imports(path)
               if name.split(".")[:2] != own and _layer(name) > _layer(module)]
  assert modules > 50  # The walk found the package.
  assert not upward, "\n".join(upward)
