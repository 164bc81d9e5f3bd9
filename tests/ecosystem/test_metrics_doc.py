"""docs/METRICS.md names every metric family the service exports, and exports every one it
names: the table against a live scrape of the service on the memory store and on Redis."""

from __future__ import annotations

import re

from support import ROOT


def documented() -> set[str]:
    text = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(session_cache_[a-z_]+)` \|", text, re.M))


def scraped(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (session_cache_[a-z_]+) ", text, re.M))


def test_metrics_document_matches_a_scrape(servers):
    """Every family of either store's /metrics is in docs/METRICS.md's table, and every
    family of the table is in one of them."""
    names = documented()
    assert names, "docs/METRICS.md has a table of session_cache_* families"
    exported = set().union(*(scraped(server.scrape()) for server in servers.values()))
    assert sorted(exported - names) == [], "exported but not in docs/METRICS.md"
    assert sorted(names - exported) == [], "in docs/METRICS.md but not exported by either store"
