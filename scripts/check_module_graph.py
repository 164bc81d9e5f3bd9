#!/usr/bin/env python3
"""Checks that the crate's modules import each other without a circle.

Two levels are checked, each as a graph that must have no cycle:
  - the crate's top-level modules (src/<name>.rs or src/<name>/): an edge A -> B for every
    path `crate::B...` written in a file of A (a `use`, or a path in code);
  - the files of each folder module, among themselves: an edge a -> b for every path
    `super::b...` in file a, where b is a sibling file. The folder's own mod.rs is the
    parent that declares and re-exports its children, so it is left out of this level.

Comments are ignored (doc comments name modules they do not import). On a cycle it
prints the modules that close it, with the files and lines of their edges, and exits 1.

    scripts/check_module_graph.py [SRC]      (default: src)
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

COMMENT = re.compile(r"//[^\n]*")
# `crate::name` alone or `crate::{a, b::c, ...}`: the names right after the crate root.
CRATE_PATH = re.compile(r"\bcrate::(\{|\w+)")
SUPER_PATH = re.compile(r"\bsuper::(\{|\w+)")
ROOTS = {"lib", "main"}


def strip_comments(text: str) -> str:
    return COMMENT.sub("", text)


def group_heads(text: str, start: int) -> list[str]:
    """The first segment of every path in the brace group that opens at `start`."""
    depth, i, heads, expecting = 0, start, [], True
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
            expecting = depth == 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        elif ch == "," and depth == 1:
            expecting = True
        elif depth == 1 and expecting and (ch.isalpha() or ch == "_"):
            word = re.match(r"\w+", text[i:]).group(0)
            heads.append(word)
            expecting = False
            i += len(word)
            continue
        i += 1
    return heads


def heads(pattern: re.Pattern, text: str) -> list[tuple[str, int]]:
    """(first segment, line) of every path that `pattern` finds in `text`."""
    found = []
    for match in pattern.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group(1) == "{":
            found.extend((name, line) for name in group_heads(text, match.start(1)))
        else:
            found.append((match.group(1), line))
    return found


def top_module(src: Path, path: Path) -> str:
    return path.relative_to(src).parts[0].removesuffix(".rs")


def find_cycle(edges: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, first == last; None when acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def report(level: str, cycle: list[str], edges: dict[str, dict[str, list[str]]]) -> None:
    print(f"module circle among {level}: {' -> '.join(cycle)}")
    for a, b in zip(cycle, cycle[1:]):
        print(f"  {a} -> {b}: {', '.join(edges[a][b][:5])}")


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    files = sorted(src.rglob("*.rs"))
    top: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    folders: dict[Path, dict[str, dict[str, list[str]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in files:
        module = top_module(src, path)
        if module in ROOTS:
            continue
        text = strip_comments(path.read_text())
        where = path.relative_to(src.parent)
        for name, line in heads(CRATE_PATH, text):
            if name != module and ((src / f"{name}.rs").exists() or (src / name).is_dir()):
                top[module][name].append(f"{where}:{line}")
        if path.name == "mod.rs":
            continue
        siblings = {p.stem for p in path.parent.glob("*.rs") if p.name != "mod.rs"}
        siblings |= {p.name for p in path.parent.iterdir() if p.is_dir() and (p / "mod.rs").exists()}
        for name, line in heads(SUPER_PATH, text):
            if name in siblings and name != path.stem:
                folders[path.parent][path.stem][name].append(f"{where}:{line}")
    failed = False
    if cycle := find_cycle(top):
        report("the top-level modules", cycle, top)
        failed = True
    for folder, edges in sorted(folders.items()):
        if cycle := find_cycle(edges):
            report(f"the files of {folder.relative_to(src.parent)}", cycle, edges)
            failed = True
    if failed:
        return 1
    count = sum(len(targets) for targets in top.values())
    print(f"module graph: no circle ({len(top)} top-level modules, {count} edges; {len(folders)} folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
