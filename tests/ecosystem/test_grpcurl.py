"""The commands of README.md's "Calling it with grpcurl" run as written there (except
for the port, and the Set's fence, which the Get before it handed out), against each
store, and each answers what it must. The servers ask the Appwrite stand-in on a
Validate miss (conftest.py); it knows my-session-token as user-42's."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from support import ROOT, SERVICE
from testkit.appwrite import ACCOUNT

TAKES_VALUE = {"-d", "-H", "-rpc-header", "-reflect-header", "-proto", "-import-path",
               "-protoset", "-max-time", "-connect-timeout", "-authority", "-format"}
EXPECTED_CALLS = ["list", "describe", f"{SERVICE}/Get", f"{SERVICE}/Set",
                  f"{SERVICE}/InvalidateUser", f"{SERVICE}/InvalidateToken",
                  f"{SERVICE}/Health", "grpc.health.v1.Health/Check", f"{SERVICE}/Validate"]
README_TOKEN = "my-session-token"
# The user of the README's Set, and the one the Appwrite stand-in describes for the token.
README_USER = {"id": "user-42", "email": "ada@example.com", "name": "Ada", "emailVerified": True,
               "tier": "pro", "createdAt": "2024-01-15T10:30:00Z", "updatedAt": "2024-01-15T10:30:00Z"}


def readme_commands() -> tuple[list[list[str]], dict[int, str]]:
    """The block's commands split as a shell would (backslash-newline continues a line,
    an open quote too), and the '# {...}' comments that document a command's answer."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Calling it with grpcurl\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Calling it with grpcurl' section"
    block = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the grpcurl section has no sh code block"
    commands, buffer, documented = [], "", {}
    for line in block.group(1).splitlines():
        if not buffer:
            if not line.strip():
                continue
            if line.lstrip().startswith("#"):
                if commands and line.lstrip().startswith("# {"):
                    documented.setdefault(len(commands) - 1, line.lstrip()[2:])
                continue
        if line.endswith("\\"):
            buffer += line[:-1]
            continue
        buffer += line
        try:
            argv = shlex.split(buffer)
        except ValueError:  # an open quote: the command goes on
            buffer += "\n"
            continue
        commands.append(argv)
        buffer = ""
    assert not buffer, f"unterminated command in the README block: {buffer!r}"
    return commands, documented


def method_of(argv: list[str]) -> str:
    """grpcurl [flags] ADDRESS [list|describe [SYMBOL]|METHOD]: what follows the address."""
    positional, args = [], iter(argv[1:])
    for arg in args:
        if arg.startswith("-"):
            if arg in TAKES_VALUE:
                next(args, None)
            continue
        positional.append(arg)
    return " ".join(positional[1:])


def check_answer(what: str, out: str, answer, store: str, first_get: bool, logged_out: bool, need) -> None:
    """What each README command must answer."""
    if what == "list":
        for name in (SERVICE, "grpc.health.v1.Health"):
            need(name in out.split(), f"lists no {name}")
    elif what.startswith("describe"):
        need(f"{SERVICE} is a service" in out, "does not describe the service")
        for rpc in ("Get", "Set", "InvalidateToken", "InvalidateUser", "Health", "Validate"):
            need(f"rpc {rpc} (" in out, f"describes no rpc {rpc}")
    elif what.endswith("/Get") and first_get:
        need(answer and answer.get("outcome") == "GET_OUTCOME_MISS" and answer.get("fence"),
             "the first Get must miss with a fence")
    elif what.endswith("/Set"):
        need(answer and answer.get("outcome") == "SET_OUTCOME_STORED", "must be SET_OUTCOME_STORED")
        need(answer and answer.get("ttlSeconds") == 300, "must apply the default TTL, 300 s")
    elif what.endswith("/Get"):
        need(answer and answer.get("outcome") == "GET_OUTCOME_HIT", "must be GET_OUTCOME_HIT after the Set")
        user = (answer or {}).get("user", {})
        need(user.get("id") == "user-42" and user.get("email") == "ada@example.com"
             and user.get("createdAt") == "2024-01-15T10:30:00Z", "must carry the user that was Set")
        need((answer or {}).get("sessionExpire") == "2030-01-01T00:00:00Z", "must carry session_expire")
    elif what.endswith("/InvalidateUser"):
        need(answer and re.match(r"\d{4}-\d\d-\d\dT", answer.get("invalidatedAt", "")),
             "must give invalidatedAt")
    elif what.endswith("/InvalidateToken"):
        need(answer == {"deleted": True}, "must delete the cached entry")
    elif what.endswith("/Validate") and logged_out:
        need(answer == {"outcome": "VALIDATE_OUTCOME_INVALID"}, "must be INVALID after the logout, with no user")
    elif what.endswith("/Validate"):
        need(answer and answer.get("outcome") == "VALIDATE_OUTCOME_VALID", "must be VALIDATE_OUTCOME_VALID")
        need((answer or {}).get("user") == README_USER, "must carry user-42 as the identity provider describes it")
        need((answer or {}).get("sessionExpire") == "2030-01-01T00:00:00Z", "must carry the session's expire")
    elif what.endswith("SessionCache/Health"):
        need(answer and answer.get("serving") is True and answer.get("store") == store
             and answer.get("enabled") is True, f"must be serving from {store}")
    elif what.endswith("grpc.health.v1.Health/Check"):
        need(answer == {"status": "SERVING"}, "must be SERVING")


def test_readme_block_calls_every_rpc():
    """The README's block shows every call an operator needs, each a grpcurl command."""
    commands, _ = readme_commands()
    assert all(argv[0] == "grpcurl" for argv in commands), commands
    shown = [method_of(argv).split()[0] for argv in commands]
    assert [name for name in EXPECTED_CALLS if name not in shown] == []


def test_readme_grpcurl_commands(server, appwrite):
    """Each README command, run against this store, exits 0 and answers as documented.
    Each of its Validates asks the identity provider once: the first meets the entry the
    password change hid, the second the logout."""
    commands, documented = readme_commands()
    failures, fence, called, logged_out = [], None, [], False
    asked = appwrite.validations(README_TOKEN)
    for index, argv in enumerate(commands):
        if argv[0] != "grpcurl":
            failures.append(f"not a grpcurl command: {shlex.join(argv)}")
            continue
        # The README's address (localhost:50051) becomes the test server's port.
        argv = [re.sub(r"^(localhost|127\.0\.0\.1|\[::1\]):50051$", rf"\g<1>:{server.port}", a)
                for a in argv]
        what = method_of(argv)
        if what.endswith("/Set"):
            if fence is None:
                failures.append("the Set comes before any Get handed out a fence")
            argv = [re.sub(r'("fence":\s*")[^"]*(")', rf"\g<1>{fence}\g<2>", a) for a in argv]
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            failures.append(f"{what}: no answer in 20s")
            continue
        out = run.stdout
        print(f"$ {shlex.join(argv)}\n{out.strip()}{run.stderr.strip()}")
        if run.returncode != 0:
            failures.append(f"{what}: exit {run.returncode}: {run.stderr.strip()}")
            continue
        called.append(what.split()[0])
        answer = json.loads(out) if out.lstrip().startswith("{") else None

        def need(condition, message, what=what, out=out):
            if not condition:
                failures.append(f"{what}: {message}; got {out.strip()!r}")

        # What the README documents after the command must hold too (the outcome names).
        for key, value in re.findall(r'"(outcome|status)":\s*"([A-Z_]+)"', documented.get(index, "")):
            need(answer is not None and answer.get(key) == value, f"README documents {key} {value}")
        first_get = what.endswith("/Get") and fence is None
        check_answer(what, out, answer, server.store, first_get, logged_out, need)
        if first_get:
            fence = (answer or {}).get("fence", "")
        logged_out = logged_out or what.endswith("/InvalidateToken")
    failures += [f"the README's commands never call {name} successfully"
                 for name in EXPECTED_CALLS if name not in called]
    validates = called.count(f"{SERVICE}/Validate")
    provider_calls = appwrite.validations(README_TOKEN) - asked
    if provider_calls != validates:
        failures.append(f"{validates} Validates made {provider_calls} calls to the identity provider "
                        f"(GET {ACCOUNT}), not one each")
    assert failures == [], f"{len(commands)} README commands run against {server.store}"

