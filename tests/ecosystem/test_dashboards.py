"""The Grafana dashboard (deploy/grafana/) and the alert rules (deploy/prometheus/) read
only metrics that the real service exports: every metric name in every query and every
alert expression is in a live scrape of /metrics, from a server on the memory store or
one on Redis (a Redis-only family such as the pool's is absent on the memory store, so
the names are checked against the union). SPEC §10 also wants every family exported
from start-up; that is checked on a scrape taken before any call."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from support import ROOT, SERVICE, Redis, Server, free_port, python_client, run
from testkit.local import eventually

DASHBOARD = ROOT / "deploy" / "grafana" / "session-cache.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

# Families the service would register only when first recorded, against SPEC §10. None
# today: src/metrics.rs exports every family from start-up. A name listed here is reported
# as an expected failure instead of failing the start-up check.
NOT_YET_EXPORTED_AT_START_UP: set[str] = set()


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(board.get("panels", [])):
        queries += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            queries.append(query)
    return queries


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]
            if "alert" in rule}


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads, found conservatively: after string
    literals and $variables are dropped, identifiers followed by `{` or `[`, and any
    session_cache_* identifier (a bare selector such as `session_cache_store_up == 0`).
    Functions (followed by `(`), label names and keywords match neither."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\s*[{\[]", text))
    names |= set(re.findall(r"\b(session_cache_\w+)", text))
    return names


def parse_exposition(text: str) -> tuple[set[str], dict[str, str]]:
    """The sample names of a Prometheus text exposition and each family's # TYPE."""
    samples, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            types[family] = kind
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[a-zA-Z_:][\w:]*", line).group(0))
    return samples, types


def missing(names: set[str], samples: set[str], types: dict[str, str]) -> set[str]:
    """Names that no series of the scrape answers. A histogram is read through its
    _bucket, _sum and _count series, never by its family name; a _bucket must belong to
    a family typed histogram."""
    absent = set()
    for name in names:
        base, suffix = re.match(r"(.*?)(_bucket|_sum|_count)?$", name).groups()
        if name not in samples:
            absent.add(name)
        elif suffix == "_bucket" and types.get(base) != "histogram":
            absent.add(f"{name} (not a histogram's bucket: {base} is {types.get(base)})")
        elif suffix is None and types.get(name) in ("histogram", "summary"):
            absent.add(f"{name} (a {types[name]} has no series of that name)")
    return absent


def store_up(server: Server) -> bool:
    try:
        return bool(re.search(r"^session_cache_store_up 1$", server.scrape(), re.M))
    except OSError:
        return False


@pytest.fixture(scope="module")
def scrapes(start) -> dict[str, dict[str, str]]:
    """/metrics of a memory and a Redis server: at start-up (before any call or client
    connection: readiness is read from the metrics port) and live, after the example
    client's flow and one Get that met a frozen Redis (a store error)."""
    redis = start(Redis("metrics"))

    def http() -> list[str]:
        """The HTTP listener, whose families the alert on pushed revocations reads."""
        return ["--http-listen", f"127.0.0.1:{free_port()}"]

    found = {
        # A slow health ping, so that the Get below meets the frozen Redis before the
        # ping marks the store down (then it would answer UNAVAILABLE with no store error).
        "memory": start(Server("metrics-memory", "memory", http())),
        "redis": start(Server("metrics-redis", "redis", ["--redis-url", f"redis://{redis.address}",
                                                         "--health-interval-ms", "60000", *http()])),
    }
    result = {}
    for store, server in found.items():
        assert eventually(10, lambda server=server: store_up(server), 0.1), f"{store}: store never up"
        result[store] = {"start-up": server.scrape()}
    for server in found.values():
        assert run(python_client(server.address)).returncode == 0
    redis.freeze()
    try:
        get = subprocess.run(
            ["grpcurl", "-plaintext", "-max-time", "5", "-d", '{"token": "frozen-redis"}',
             found["redis"].address, f"{SERVICE}/Get"],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        print(get.stdout, get.stderr)
    finally:
        redis.thaw()
    for store, server in found.items():
        result[store]["live"] = server.scrape()
        server.stop()
    redis.stop()
    return result


def queried_names() -> dict[str, set[str]]:
    """Metric names by where they are read: the dashboard, and each alert."""
    by_source = {"dashboard": set().union(*map(metric_names, dashboard_queries()))}
    for alert, expr in alert_expressions().items():
        by_source[f"alert {alert}"] = metric_names(expr)
    return by_source


def test_metric_name_parsing():
    """The parser finds selectors, bare names and histogram series; not functions,
    labels, keywords, strings or variables."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(foo_seconds_bucket{rpc=~"Get|x{y}"}[5m]))) > 0.1'
        ' or session_cache_store_up == 0 and on(job) bar[$__rate_interval]'
    ) == {"foo_seconds_bucket", "session_cache_store_up", "bar"}
    samples, types = parse_exposition(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\n# TYPE c counter\nc_total 1\n")
    assert missing({"h_bucket", "h_count", "c_total"}, samples, types) == set()
    assert missing({"h", "c_bucket", "d"}, samples, types) == {"h", "c_bucket", "d"}


def test_queries_and_alerts_read_metrics(scrapes):
    """Every metric that the dashboard or an alert reads is in a live scrape of the memory
    server or the Redis one."""
    samples, types = set(), {}
    for scrape in scrapes.values():
        s, t = parse_exposition(scrape["live"])
        samples |= s
        types |= t
    by_source = queried_names()
    assert by_source["dashboard"], "the dashboard reads no metric"
    problems = {source: sorted(missing(names, samples, types))
                for source, names in by_source.items()}
    problems = {source: names for source, names in problems.items() if names}
    assert problems == {}, f"scraped: {sorted(samples)}"


def test_metrics_exported_from_start_up(scrapes):
    """SPEC §10: every family that a query or alert reads is exported from start-up (in
    the union of the two stores' scrapes), so that an alert never reads a series that is
    missing until the first failure. Known gaps are listed above; the test fails on any
    other, and reports the known ones as an expected failure."""
    samples, types = set(), {}
    for scrape in scrapes.values():
        s, t = parse_exposition(scrape["start-up"])
        samples |= s
        types |= t
    wanted = set().union(*queried_names().values())
    absent = missing(wanted, samples, types)
    unexpected = absent - NOT_YET_EXPORTED_AT_START_UP
    assert unexpected == set(), "missing at start-up, beyond the known gaps"
    fixed = (NOT_YET_EXPORTED_AT_START_UP & wanted) - absent
    assert fixed == set(), "now exported from start-up: remove from NOT_YET_EXPORTED_AT_START_UP"
    if absent:
        pytest.xfail(f"not exported until first recorded (SPEC §10 gap): {sorted(absent)}")


def test_dashboard_panels():
    """The dashboard is Grafana JSON: a uid and title, panels with unique ids and a grid
    position, every query panel on the ${datasource} variable, and the panels an
    operator looks for."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"]
    assert board["title"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("calls/s", "hit ratio", "latency", "store round trip", "health",
                  "connections", "shedding", "revocations"):
        assert topic in titles, topic


def test_every_alert_has_a_firing_and_a_quiet_test():
    """SPEC §10: every alert is named by a promtool unit test that fires it and by one
    that shows it quiet (promtool itself runs them: promtool test rules)."""
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(alert_expressions())
    assert alerts - fires == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts no test shows quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_alerts_carry_what_operators_need():
    """Each alert waits (`for:`), has a severity, a summary, a description and a runbook."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule.get("for"), rule["alert"]
            assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), rule["alert"]
            assert {"summary", "description", "runbook"} <= rule.get("annotations", {}).keys(), rule["alert"]
