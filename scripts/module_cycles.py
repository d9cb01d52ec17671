#!/usr/bin/env python3
"""Lists cycles among a crate's modules: file A naming `crate::b::...` (or `super::b`) and file B
naming A, directly or through others. Usage: module_cycles.py [crates/airllm/src]. Exits 1 when
there is one. A module's mod.rs counts as the module; re-exports count as uses."""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "crates/airllm/src"
mods = {}  # module path (tuple) -> file
for d, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
        if rel[-1] in ("mod", "lib", "main"):
            rel = rel[:-1]
        mods[tuple(rel)] = os.path.join(d, f)


def strip(src):
    src = re.sub(r"//[^\n]*", "", src)
    # Tests inside a file may use anything.
    i = src.find("#[cfg(test)]")
    return src if i < 0 else src[:i]


def target(path):
    """The longest module prefix of `path` that is a file of the crate."""
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return None


edges = {m: set() for m in mods}
for m, f in mods.items():
    src = strip(open(f).read())
    paths = []
    for p in re.findall(r"crate::((?:\w+::)*\w+)", src):
        paths.append(p.split("::"))
    # `use crate::a::{b, c::d}` groups.
    for base, group in re.findall(r"crate::((?:\w+::)*)\{([^}]*)\}", src):
        for g in group.split(","):
            g = g.strip().split(" as ")[0]
            if g:
                paths.append((base + g).split("::"))
    # `super` is the enclosing module, for a mod.rs as for any other file.
    parent = m[:-1]
    for p in re.findall(r"super::((?:\w+::)*\w+)", src):
        paths.append(list(parent) + p.split("::"))
    for base, group in re.findall(r"super::((?:\w+::)*)\{([^}]*)\}", src):
        for g in group.split(","):
            g = g.strip().split(" as ")[0]
            if g:
                paths.append(list(parent) + (base + g).split("::"))
    for p in paths:
        t = target(p)
        # A module naming its own submodules (mod.rs declaring them) is not a use.
        if t and t != m and t[: len(m)] != m and m != ():
            edges[m].add(t)

# Strongly connected components (Tarjan).
index, low, stack, on, sccs = {}, {}, [], set(), []
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in edges[v]:
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
            sccs.append(comp)


for v in mods:
    if v not in index:
        visit(v)
name = lambda m: "::".join(m) or "crate"
for c in sccs:
    print("cycle: " + ", ".join(sorted(name(m) for m in c)))
    for a in c:
        for b in sorted(edges[a] & set(c)):
            print(f"  {name(a)} -> {name(b)}")
sys.exit(1 if sccs else 0)
