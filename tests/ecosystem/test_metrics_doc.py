"""docs/METRICS.md names every metric family the service exports, and exports every one it
names: the table against a live scrape of the service on the memory store, on Redis, and
with the HTTP listener and the pushed revocations configured (their families are
exported only then)."""

from __future__ import annotations

import re

from support import ROOT


def documented() -> set[str]:
    text = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(session_cache_[a-z_]+)` \|", text, re.M))


def scraped(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (session_cache_[a-z_]+) ", text, re.M))


def test_metrics_document_matches_a_scrape(servers, pushed):
    """Every family of the servers' /metrics is in docs/METRICS.md's table, and every
    family of the table is in one of them."""
    names = documented()
    assert names, "docs/METRICS.md has a table of session_cache_* families"
    every = [*servers.values(), pushed["server"]]
    exported = set().union(*(scraped(server.scrape()) for server in every))
    assert sorted(exported - names) == [], "exported but not in docs/METRICS.md"
    assert sorted(names - exported) == [], "in docs/METRICS.md but not exported by either store"
