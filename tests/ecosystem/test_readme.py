"""README.md and deploy/README.md as a newcomer uses them: every `sh` block runs as
written, in order, in one shell from the repository's root, as if pasted into one
terminal (servers the README starts in another terminal run in the background), and each
answers what its comments document. The blocks CI cannot run (a Docker engine, a
Kubernetes cluster, a real identity provider) say why, and other tests check the files
they use; the block that .ci/run runs as a step of its own is held to .ci/run's lines.

The walk-through builds and starts the release binary with `cargo run --release`, on the
README's own ports (8080 and 50051), which must be free.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

from readme_blocks import Block, in_order, sh_blocks
from support import LOGS, ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
# The longest the whole README may take, the release build included.
BUDGET_S = 2400
# The longest a background block may take to listen, a first `cargo run --release` included.
READY_S = 1800


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in sh_blocks(path)]


def test_every_block_says_what_ci_does_with_it():
    """Each `sh` block has a known `ci:` marker, so that no new block goes unrun unseen."""
    blocks = all_blocks()
    assert blocks, "README.md has sh blocks"
    bad = [f"{b.where}: {b.action}" for b in blocks if b.action not in
           ("run", "twice", "background", "ci-run", "skip")]
    assert bad == [], "blocks without a known <!-- ci: ... --> marker"


def test_blocks_run_by_ci_run_are_its_lines():
    """A block marked `run by .ci/run` is made of lines .ci/run runs as they are."""
    ci_run = {line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    missing = [f"{b.where}: {line.strip()!r}" for b in all_blocks() if b.action == "ci-run"
               for line in b.text.splitlines() if line.strip() and line.strip() not in ci_run]
    assert missing == [], "lines that .ci/run does not run"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def script(blocks: list[Block], pids: str) -> str:
    """One bash script: each block in order between markers, background blocks in a
    session of their own (their process group ids go to `pids`), each waited for."""
    parts = [
        "set -eo pipefail",
        f"cd {ROOT}",
        # ready HOST PORT PID WHERE: a bounded wait for HOST:PORT to accept, while PID lives.
        "ready() {",
        f"  local end=$((SECONDS + {READY_S}))",
        '  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do',
        '    kill -0 "$3" 2>/dev/null || { echo "@@exited $4@@"; return 1; }',
        '    [ "$SECONDS" -lt "$end" ] || { echo "@@not listening $4@@"; return 1; }',
        "    sleep 0.5",
        "  done",
        "}",
    ]
    for index, block in enumerate(blocks):
        if block.action == "background":
            _, host, port = block.ready_at
            body = LOGS / f"readme-block-{index}.sh"
            body.write_text(block.text, encoding="utf-8")
            parts += [
                f"echo '@@start {index}@@'",
                f"setsid bash {body} >{LOGS / f'readme-block-{index}.log'} 2>&1 &",
                f"echo $! >>{pids}",
                f"ready {host} {port} $! {block.where}",
                f"echo '@@end {index}@@'",
            ]
        else:
            for run in range(2 if block.action == "twice" else 1):
                parts += [f"echo '@@start {index}.{run}@@'", block.text, f"echo '@@end {index}.{run}@@'"]
    return "\n".join(parts) + "\n"


def stop_groups(pids_file) -> None:
    """SIGTERM to each background block's process group, then SIGKILL to what is left."""
    if not pids_file.exists():
        return
    groups = [int(p) for p in pids_file.read_text().split()]
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for group in groups:
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


def test_readme_runs_as_written():
    """Every block marked to run does, as written and in order, with exit status 0, and
    answers what its comments document (the walk-through twice, the second time as the
    first)."""
    blocks = [b for b in all_blocks() if b.action in ("run", "twice", "background")]
    for block in blocks:
        if block.action == "background":
            _, host, port = block.ready_at
            if not port_free(host, port):
                pytest.fail(f"{block.where} serves on {host}:{port}, which something else holds")
    LOGS.mkdir(parents=True, exist_ok=True)
    pids = LOGS / "readme-background.pids"
    pids.unlink(missing_ok=True)
    path = LOGS / "readme.sh"
    path.write_text(script(blocks, str(pids)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    try:
        done = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=BUDGET_S,
                              stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    finally:
        stop_groups(pids)
    print(done.stdout[-20000:], done.stderr[-5000:])
    failures = []
    for index, block in enumerate(blocks):
        runs = [f"{index}"] if block.action == "background" else \
            [f"{index}.{run}" for run in range(2 if block.action == "twice" else 1)]
        for run in runs:
            start, end = f"@@start {run}@@", f"@@end {run}@@"
            if end not in done.stdout:
                failures.append(f"{block.where} (run {run}) did not finish: exit {done.returncode}; "
                                f"script {path}, logs in {LOGS}")
                break
            output = done.stdout.split(start, 1)[1].split(end, 1)[0]
            missing = in_order(block.documented(), output)
            if missing:
                failures.append(f"{block.where} (run {run}): the answers documented as {missing} did not come")
        else:
            continue
        break
    assert failures == [], "README blocks"
