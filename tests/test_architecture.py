"""The house rules of docs/architecture.md, checked on the source: imports run one way between the rooms of
``merger_core``, no module imports ComfyUI, and no two modules import each other (directly or in a ring)."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "merger_core")

BOTTOM = {"errors", "units", "version", "data"}
# room -> the rooms it may import (besides itself). The package root (__init__, __main__) is a facade.
ALLOWED = {
    "errors": set(),
    "units": set(),
    "version": set(),
    "data": set(),
    "io": BOTTOM,
    "host": BOTTOM,
    "methods": BOTTOM,
    "arch": BOTTOM | {"io"},
    "report": BOTTOM | {"io", "arch"},
    "manifest": BOTTOM | {"io", "methods", "host"},
    "identity": BOTTOM | {"io", "arch", "manifest", "host"},
    "lora": BOTTOM | {"io", "arch", "methods"},
    "merge": BOTTOM | {"io", "host", "methods", "arch", "report", "manifest", "identity", "lora"},
    "cli": BOTTOM | {"io", "host", "methods", "arch", "report", "manifest", "identity", "merge", "lora"},
}
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution", "node_helpers"}


def _modules():
    """module name -> file path, for every module of merger_core."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, "").endswith("__init__.py")


def _imports(mod: str):
    """(line, imported module) for every import in ``mod``, at any depth, relative ones resolved."""
    tree = ast.parse(open(MODULES[mod], encoding="utf-8").read())
    pkg = mod if _is_package(mod) else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = base + ("." + node.module if node.module else "")
            else:
                target = node.module
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                yield node.lineno, sub if sub in MODULES else target


def _room(mod: str):
    parts = mod.split(".")
    if parts[0] != "merger_core":
        return None
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return "__root__"
    return parts[1]


def test_every_module_belongs_to_a_known_room():
    rooms = {_room(m) for m in MODULES} - {"__root__"}
    assert rooms <= set(ALLOWED), f"modules outside the documented rooms: {sorted(rooms - set(ALLOWED))}"


def test_imports_run_one_way_between_rooms():
    bad = []
    for mod in sorted(MODULES):
        src = _room(mod)
        if src == "__root__":
            continue
        for line, target in _imports(mod):
            dst = _room(target)
            if dst is None or dst == src:
                continue
            if dst == "__root__" or dst not in ALLOWED[src]:
                bad.append(f"{MODULES[mod]}:{line}: {mod} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the direction of docs/architecture.md:\n" + "\n".join(bad)


def test_no_module_imports_the_host():
    bad = [f"{MODULES[m]}:{line}: {t}" for m in MODULES for line, t in _imports(m) if t.split(".")[0] in HOST_MODULES]
    assert not bad, "merger_core imports ComfyUI:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for _, t in _imports(m) if t in MODULES and t != m}) for m in MODULES}
    # a package's __init__ importing its own submodules is how packages work; a submodule importing its package's
    # __init__ back is not allowed (the cycle test sees both edges)
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, "modules that import each other (directly or in a ring): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The walker is not blind: an upward import and a cycle planted in a copy of the rules are found."""
    monkeypatch.setitem(MODULES, "merger_core.io.zz_planted", str(tmp_path / "planted.py"))
    (tmp_path / "planted.py").write_text("from ..merge.plan import MergePlan\nfrom . import zz_planted\n")
    found = list(_imports("merger_core.io.zz_planted"))
    assert (1, "merger_core.merge.plan") in found
    assert _room("merger_core.merge.plan") not in ALLOWED["io"]
    with pytest.raises(AssertionError, match="io\\) imports merger_core.merge.plan"):
        test_imports_run_one_way_between_rooms()
