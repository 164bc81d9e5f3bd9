"""The fenced `sh` blocks of a Markdown file, each with what CI does with it, and the
answers its comments document.

Every `sh` block of README.md and deploy/README.md is preceded by an HTML comment that a
reader does not see and CI obeys:

    <!-- ci: run -->                      run as written, in order, in one shell
    <!-- ci: run twice -->                the same, then once more (it must work pasted again)
    <!-- ci: background: KIND HOST:PORT --> start it and leave it running (a server, in the
                                          reader's other terminal); ready when HOST:PORT
                                          accepts a connection (KIND: grpc or http)
    <!-- ci: run by .ci/run -->           .ci/run runs these very lines as a step of its own
    <!-- ci: skip: WHY -->                not run, for the reason given (a Docker engine, a
                                          Kubernetes cluster, a real identity provider)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*ci:\s*(.*?)\s*-->\s*$")
# What a documented answer says, in a comment line after a command: the enums' values.
DOCUMENTED = re.compile(r'"(outcome|status)":\s*"([A-Z_]+)"')


@dataclass
class Block:
    """One fenced `sh` block: where it is, what CI does with it, and its text."""

    path: Path
    line: int
    marker: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def action(self) -> str:
        """run, twice, background, ci-run, skip, or none (no marker)."""
        if self.marker is None:
            return "none"
        if self.marker == "run":
            return "run"
        if self.marker == "run twice":
            return "twice"
        if self.marker == "run by .ci/run":
            return "ci-run"
        if self.marker.startswith("background:"):
            return "background"
        if self.marker.startswith("skip:") and self.marker[5:].strip():
            return "skip"
        return f"unknown marker {self.marker!r}"

    @property
    def ready_at(self) -> tuple[str, str, int]:
        """For a background block: (kind, host, port) it serves on once ready."""
        kind, address = self.marker.split(":", 1)[1].split()
        host, port = address.rsplit(":", 1)
        return kind, host, int(port)

    def documented(self) -> list[str]:
        """The outcomes and statuses the block's comments promise, in order."""
        found = []
        for line in self.text.splitlines():
            if line.lstrip().startswith("# {"):
                found += [value for _, value in DOCUMENTED.findall(line)]
        return found


def sh_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path` whose language is sh, bash or shell, with the `ci:`
    marker that precedes it (blank lines may stand between)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    marker, index = None, 0
    while index < len(lines):
        line = lines[index]
        found = MARKER.match(line)
        if found:
            marker = found.group(1)
            index += 1
            continue
        fence = FENCE.match(line)
        if fence:
            end = index + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if fence.group(1) in ("sh", "bash", "shell"):
                blocks.append(Block(path, index + 1, marker, "\n".join(lines[index + 1:end]) + "\n"))
            marker, index = None, end + 1
            continue
        if line.strip():
            marker = None
        index += 1
    return blocks


def in_order(wanted: list[str], output: str) -> list[str]:
    """The documented values that `output` does not show in the documented order."""
    missing, at = [], 0
    for value in wanted:
        found = re.search(rf'"(?:outcome|status)":\s*"{value}"', output[at:])
        if found:
            at += found.end()
        else:
            missing.append(value)
    return missing
