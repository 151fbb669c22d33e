#!/usr/bin/env python3
"""Checks the layering of the product crate (docs/architecture.md, "The layers").

src/lib.rs declares the top-level modules bottom layer first. A module may use
(`crate::m`, `crate::{m, ...}`) only modules declared before it, so every
dependency points down and no cycle between modules can form. Prints each
upward or sideways use with its file and line, and exits 1 if there is any.

Usage: scripts/layers.py [SRC_DIR]   (default: src)
"""
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "src"
lib = open(os.path.join(src, "lib.rs"), encoding="utf-8").read()
order = re.findall(r"^\s*pub\s+mod\s+([a-z_][a-z0-9_]*)\s*;", lib, re.M)
rank = {m: i for i, m in enumerate(order)}
if not order:
    sys.exit(f"{src}/lib.rs declares no modules")

def uses(text):
    """(line, module) for every crate-relative path in code (not comments)."""
    for n, line in enumerate(text.splitlines(), 1):
        code = re.sub(r"//.*", "", line)
        for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", code):
            yield n, m.group(1)
    # `use crate::{a, b::c}` groups may span lines.
    code = re.sub(r"//[^\n]*", "", text)
    for g in re.finditer(r"\bcrate::\{([^}]*)\}", code):
        line = code[: g.start()].count("\n") + 1
        for name in re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", g.group(1)):
            yield line, name

bad = []
files = 0
for root, dirs, names in os.walk(src):
    dirs.sort()
    rel_root = os.path.relpath(root, src)
    for f in sorted(names):
        if not f.endswith(".rs"):
            continue
        rel = os.path.normpath(os.path.join(rel_root, f))
        top = rel.split(os.sep)[0].removesuffix(".rs")
        if top in ("lib", "main"):
            continue  # the crate's face and the binary may use everything
        files += 1
        if top not in rank:
            bad.append(f"{src}/{rel}: module `{top}` is not declared in {src}/lib.rs")
            continue
        text = open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
        for line, used in sorted(set(uses(text))):
            if used in rank and used != top and rank[used] > rank[top]:
                bad.append(f"{src}/{rel}:{line}: `{top}` uses `{used}`, a layer above it")

for b in bad:
    print(b)
print(f"layers: {len(order)} modules ({' < '.join(order)}), {files} files, {len(bad)} violations")
sys.exit(1 if bad else 0)
