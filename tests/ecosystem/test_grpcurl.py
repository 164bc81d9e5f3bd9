"""README.md's grpcurl walk-through against each store: the block runs twice in a row, as
written except for the port, and every call answers what the README documents; each
Validate of the stand-in's session that misses asks the Appwrite stand-in once. (The
README runner, test_readme.py, runs the same block on the README's own port against the
server the README starts.)"""

from __future__ import annotations

import re
import subprocess

from readme_blocks import in_order, sh_blocks
from support import ROOT, SERVICE
from testkit.appwrite import ACCOUNT

README_TOKEN = "my-session-token"
CALLED = ["list", f"{SERVICE}/Get", f"{SERVICE}/Set", f"{SERVICE}/InvalidateToken",
          f"{SERVICE}/InvalidateUser", f"{SERVICE}/Validate", f"{SERVICE}/Health",
          "grpc.health.v1.Health/Check"]


def walk_through():
    """The README block marked to run twice: the walk-through."""
    found = [b for b in sh_blocks(ROOT / "README.md") if b.action == "twice"]
    assert len(found) == 1, "README.md has one walk-through block (<!-- ci: run twice -->)"
    return found[0]


def test_walk_through_calls_every_rpc():
    """The walk-through shows every call an operator needs."""
    text = walk_through().text
    assert [name for name in CALLED if name not in text] == []


def test_walk_through_against_each_store(server, appwrite):
    """Twice in a row against this store: exit 0 and the documented answers each time;
    Health names the store; one provider call per Validate of the stand-in's session (the
    password change before it hid the entry each time)."""
    block = walk_through()
    text = re.sub(r"\blocalhost:50051\b", f"127.0.0.1:{server.port}", block.text)
    asked = appwrite.validations(README_TOKEN)
    failures = []
    for run in (1, 2):
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", text], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT)
        print(f"-- run {run} --\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            failures.append(f"run {run}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
            continue
        missing = in_order(block.documented(), done.stdout)
        if missing:
            failures.append(f"run {run}: documented answers missing: {missing}")
        if f'"store": "{server.store}"' not in done.stdout:
            failures.append(f"run {run}: Health does not name the store {server.store}")
    calls = appwrite.validations(README_TOKEN) - asked
    if calls != 2:
        failures.append(f"two runs made {calls} calls to the identity provider (GET {ACCOUNT}), not 2")
    assert failures == [], f"the walk-through against {server.store}"
