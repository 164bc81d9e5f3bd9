"""deploy/: the Compose files and the Kubernetes manifests carry the fields that make
them work (kubernetes-validate --strict checks the schema; this checks the meaning)."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import yaml

from readme_blocks import sh_blocks
from support import ROOT

DEPLOY = ROOT / "deploy"


def load(name: str) -> list[dict]:
    with (DEPLOY / name).open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


class Checks:
    """Collects every failed check of a test, so that one run names them all."""

    def __init__(self):
        self.failures = []

    def need(self, condition, message: str) -> None:
        print(("ok   " if condition else "FAIL ") + message)
        if not condition:
            self.failures.append(message)

    def done(self) -> None:
        assert self.failures == []


@pytest.fixture
def checks() -> Checks:
    return Checks()


def option(command, flag: str):
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def test_compose(checks):
    """docker-compose.yml: built from the Dockerfile, Redis 7 that never evicts, the port
    on loopback only."""
    services = load("docker-compose.yml")[0].get("services", {})
    app, redis = services.get("session-cache", {}), services.get("redis", {})
    build = app.get("build", {})
    dockerfile = None
    if isinstance(build, dict):
        dockerfile = DEPLOY / build.get("context", "") / build.get("dockerfile", "Dockerfile")
    checks.need(dockerfile is not None and dockerfile.is_file(),
                "compose: session-cache is built from the repository's Dockerfile")
    env = app.get("environment", {})
    checks.need(str(env.get("SESSION_CACHE_REDIS_URL", "")).startswith("redis://redis:"),
                "compose: SESSION_CACHE_REDIS_URL points at the redis service")
    checks.need(str(env.get("SESSION_CACHE_ALLOW_UNAUTHENTICATED")).lower() == "true",
                "compose: SESSION_CACHE_ALLOW_UNAUTHENTICATED=true")
    checks.need(str(redis.get("image", "")).startswith("redis:7"), "compose: redis:7")
    checks.need(option(redis.get("command", []), "--maxmemory-policy") == "noeviction",
                "compose: redis runs with --maxmemory-policy noeviction")
    checks.need(all(str(p).startswith("127.0.0.1:") for p in app.get("ports", [])),
                "compose: the gRPC port is published on loopback only")
    checks.done()



def test_sentinel_compose(checks):
    """docker-compose.sentinel.yml: the service names the Sentinels and the master they
    monitor, and every data node refuses to evict."""
    services = load("docker-compose.sentinel.yml")[0].get("services", {})
    env = services.get("session-cache", {}).get("environment", {})
    named = [s.split(":")[0] for s in str(env.get("SESSION_CACHE_REDIS_SENTINELS", "")).split(",") if s]
    checks.need(len(named) == 3 and all(n in services for n in named),
                "sentinel compose: the service names three Sentinel services")
    master = env.get("SESSION_CACHE_REDIS_SENTINEL_MASTER")
    scripts = ["\n".join(map(str, services[n].get("entrypoint", []))) for n in named if n in services]
    checks.need(bool(scripts) and all(f"sentinel monitor {master} redis-primary 6379 2" in s for s in scripts),
                "sentinel compose: every Sentinel monitors the master the service asks for")
    for node in ("redis-primary", "redis-replica"):
        checks.need(option(services.get(node, {}).get("command", []), "--maxmemory-policy") == "noeviction",
                    f"sentinel compose: {node} runs with noeviction")
    checks.need("--replicaof" in [str(c) for c in services.get("redis-replica", {}).get("command", [])],
                "sentinel compose: redis-replica replicates the primary")
    checks.need(all(str(p).startswith("127.0.0.1:") for p in services.get("session-cache", {}).get("ports", [])),
                "sentinel compose: the gRPC port is published on loopback only")
    checks.done()



@pytest.fixture(scope="module")
def kube() -> dict[str, list[dict]]:
    """deploy/kubernetes/*.yaml by kind."""
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").iterdir()):
        if path.suffix in (".yaml", ".yml"):
            for doc in load(f"kubernetes/{path.name}"):
                docs.setdefault(doc.get("kind"), []).append(doc | {"_file": path.name})
    return docs


def test_kubernetes_documents_named(kube, checks):
    """Every document has an apiVersion and a name."""
    for kind, docs in kube.items():
        for doc in docs:
            checks.need(bool(doc.get("apiVersion")) and bool(doc.get("metadata", {}).get("name")),
                        f"k8s {doc['_file']}: {kind} has apiVersion and a name")
    checks.done()



def pod_labels(kube) -> dict:
    deployment = (kube.get("Deployment") or [{}])[0]
    return deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})


def test_deployment(kube, checks):
    """Two replicas, gRPC probes (liveness "" and readiness the store), limits, non-root
    with a read-only root, the Redis URL and the callers' keys from Secrets."""
    deployment = (kube.get("Deployment") or [{}])[0]
    checks.need(deployment.get("apiVersion") == "apps/v1", "Deployment: apps/v1")
    spec = deployment.get("spec", {})
    checks.need(spec.get("replicas") == 2, "Deployment: 2 replicas")
    pod = spec.get("template", {}).get("spec", {})
    labels = pod_labels(kube)
    selector = spec.get("selector", {}).get("matchLabels", {})
    checks.need(bool(selector) and all(labels.get(k) == v for k, v in selector.items()),
                "Deployment: the selector matches the pod labels")
    grace = int(os.environ.get("SESSION_CACHE_SHUTDOWN_GRACE_SECONDS", "10"))
    container = (pod.get("containers") or [{}])[0]
    c_env = {e.get("name"): e for e in container.get("env", [])}
    if "SESSION_CACHE_SHUTDOWN_GRACE_SECONDS" in c_env:
        grace = int(c_env["SESSION_CACHE_SHUTDOWN_GRACE_SECONDS"].get("value"))
    checks.need(pod.get("terminationGracePeriodSeconds", 30) > grace,
                f"Deployment: terminationGracePeriodSeconds > the service's grace ({grace} s)")
    checks.need({"containerPort": 50051, "name": "grpc", "protocol": "TCP"}.items()
                <= (container.get("ports") or [{}])[0].items(),
                "Deployment: container port 50051 named grpc")
    live = container.get("livenessProbe", {}).get("grpc", {})
    ready = container.get("readinessProbe", {}).get("grpc", {})
    checks.need(live.get("port") == 50051 and live.get("service", "") == "",
                'Deployment: liveness is a gRPC probe of service "" on 50051')
    checks.need(ready.get("port") == 50051 and ready.get("service") == "sessioncache.v1.SessionCache",
                "Deployment: readiness is a gRPC probe of sessioncache.v1.SessionCache on 50051")
    res = container.get("resources", {})
    checks.need(all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")),
                "Deployment: cpu and memory requests and limits")
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    checks.need(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 10001,
                "Deployment: runAsNonRoot, runAsUser 10001")
    checks.need(container.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
                "Deployment: readOnlyRootFilesystem")
    checks.need(container.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
                "Deployment: allowPrivilegeEscalation false")
    checks.need("secretKeyRef" in c_env.get("SESSION_CACHE_REDIS_URL", {}).get("valueFrom", {}),
                "Deployment: SESSION_CACHE_REDIS_URL from a Secret")
    checks.need("SESSION_CACHE_ALLOW_UNAUTHENTICATED" not in c_env,
                "Deployment: callers authenticate (no --allow-unauthenticated)")
    keys_file = c_env.get("SESSION_CACHE_API_KEYS_FILE", {}).get("value", "")
    mounts = {m.get("name"): m.get("mountPath", "") for m in container.get("volumeMounts", [])}
    secret_volumes = {v.get("name") for v in pod.get("volumes", []) if "secret" in v}
    checks.need(any(keys_file.startswith(path.rstrip("/") + "/") and name in secret_volumes
                    for name, path in mounts.items()),
                "Deployment: SESSION_CACHE_API_KEYS_FILE is in a mounted Secret")
    checks.done()



def test_service(kube, checks):
    """A ClusterIP Service on 50051 (appProtocol grpc) selecting the Deployment's pods."""
    labels = pod_labels(kube)
    s_spec = (kube.get("Service") or [{}])[0].get("spec", {})
    s_port = (s_spec.get("ports") or [{}])[0]
    checks.need(s_spec.get("type", "ClusterIP") == "ClusterIP", "Service: ClusterIP")
    checks.need(s_port.get("port") == 50051 and s_port.get("appProtocol") == "grpc",
                "Service: port 50051 with appProtocol grpc")
    checks.need(s_port.get("targetPort") in (50051, "grpc"), "Service: targets the grpc container port")
    checks.need(bool(s_spec.get("selector")) and all(labels.get(k) == v for k, v in s_spec["selector"].items()),
                "Service: selects the Deployment's pods")
    checks.done()



def test_network_policies(kube, checks):
    """Every NetworkPolicy applies to the Deployment's pods."""
    labels = pod_labels(kube)
    for policy in kube.get("NetworkPolicy", []):
        p_sel = policy.get("spec", {}).get("podSelector", {}).get("matchLabels", {})
        checks.need(bool(p_sel) and all(labels.get(k) == v for k, v in p_sel.items()),
                    "NetworkPolicy: applies to the Deployment's pods")
    checks.done()


def test_docker_run_example(checks):
    """deploy/README.md's `docker run` steps: the service's port published on the host's
    loopback only, Redis on a user-defined network under the name the Redis URL gives,
    and every variable one the service reads (docs/CONFIGURATION.md's table)."""
    blocks = [b for b in sh_blocks(DEPLOY / "README.md") if "docker run" in b.text]
    checks.need(len(blocks) == 1, "deploy/README.md has one block of docker run steps")
    commands = [shlex.split(line) for line in blocks[0].text.replace("\\\n", " ").splitlines() if line.strip()]
    networks = {c[3] for c in commands if c[:3] == ["docker", "network", "create"]}
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    service = [c for c in runs if c[-1] == "session-cache"]
    checks.need(len(service) == 1, "one docker run of the session-cache image")
    known = set(re.findall(r"`(SESSION_CACHE_[A-Z_]+)`", (ROOT / "docs" / "CONFIGURATION.md").read_text()))
    for run in service:
        published = [run[i + 1] for i, a in enumerate(run[:-1]) if a in ("-p", "--publish")]
        checks.need(published != [] and all(p.startswith("127.0.0.1:") for p in published),
                    f"docker run publishes on loopback only: {published}")
        network = option(run, "--network")
        checks.need(network in networks, f"docker run joins a network the steps create: {network}")
        env = dict(run[i + 1].split("=", 1) for i, a in enumerate(run[:-1]) if a == "-e")
        checks.need(set(env) <= known, f"every variable is the service's: {sorted(set(env) - known)}")
        host = re.match(r"rediss?://(?:[^@]*@)?([^:/]+)", env.get("SESSION_CACHE_REDIS_URL", ""))
        redis = [r for r in runs if option(r, "--name") == (host.group(1) if host else None)]
        checks.need(redis != [] and option(redis[0], "--network") == network,
                    "the Redis the URL names runs on the same network under that name")
    text = (DEPLOY / "README.md").read_text()
    checks.need("SESSION_CACHE_REDIS_PASSWORD_FILE" in text and "SESSION_CACHE_API_KEYS_FILE" in text,
                "deploy/README.md says how to give the Redis password and callers' keys as files")
    checks.done()
