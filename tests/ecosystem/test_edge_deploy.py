"""The edge deploy files against their proxies' own schemas: deploy/envoy/envoy.yaml parsed
into Envoy's Bootstrap proto with Envoy's published protos (xds-protos), as Envoy itself
reads YAML (to JSON, then into the proto, unknown fields refused), with the ext_authz
settings docs/edge.md promises; deploy/istio/ against Istio's CRD schemas
(istio/check.mjs, @kubernetes-models/istio)."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from google.protobuf import json_format

from support import ROOT

# Imported for their descriptors: the typed_config of each filter resolves through them.
from envoy.config.bootstrap.v3 import bootstrap_pb2  # isort: skip
from envoy.config.core.v3 import config_source_pb2  # isort: skip
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # isort: skip
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  # isort: skip
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # isort: skip
    http_connection_manager_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401  # isort: skip

ENVOY_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"
ISTIO = ROOT / "tests" / "ecosystem" / "istio"


def bootstrap(text: str) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def test_envoy_yaml_is_an_envoy_bootstrap_with_the_promised_ext_authz():
    """envoy.yaml parses into Envoy's Bootstrap; its ext_authz filter calls the cache over
    gRPC (HTTP/2) with a timeout, fails closed, sends no body, and runs before the router."""
    config = bootstrap(ENVOY_YAML.read_text())
    listener = config.static_resources.listeners[0]
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    names = [f.name for f in hcm.http_filters]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"], names
    authz = ext_authz_pb2.ExtAuthz()
    assert hcm.http_filters[0].typed_config.Unpack(authz)
    assert authz.grpc_service.envoy_grpc.cluster_name == "session-cache"
    assert authz.grpc_service.timeout.ToMilliseconds() > 0
    assert authz.failure_mode_allow is False
    assert not authz.HasField("with_request_body")
    assert authz.transport_api_version == config_source_pb2.V3
    clusters = {c.name: c for c in config.static_resources.clusters}
    assert set(clusters) == {"session-cache", "app"}
    options = clusters["session-cache"].typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "HttpProtocolOptions" in options.type_url


@pytest.mark.parametrize("mistake", [
    ("failure_mode_allow: false", "failure_mode_allow: nope"),
    ("timeout: 2.5s", "timeout: soon"),
    ("transport_api_version: V3", "transport_api_version: V9"),
    ("status_on_error:", "status_on_eror:"),
])
def test_the_envoy_checker_refuses_mistakes(mistake):
    """The checker is strict: a wrong value, an unknown enum or a misspelt field fails."""
    before, after = mistake
    text = ENVOY_YAML.read_text()
    assert before in text
    with pytest.raises(json_format.ParseError):
        bootstrap(text.replace(before, after))


def node_check(*files: str) -> subprocess.CompletedProcess:
    if not (ISTIO / "node_modules").is_dir():
        pytest.fail("no tests/ecosystem/istio/node_modules: run npm ci there (scripts/ecosystem-test.sh does)")
    done = subprocess.run(["node", "check.mjs", *files], cwd=ISTIO, capture_output=True, text=True, timeout=60)
    print(done.stdout, done.stderr)
    return done


def test_istio_files_pass_istios_crd_schemas():
    """Every document of deploy/istio/ is of a kind the checker knows and passes its
    schema; the policy is CUSTOM with the session-cache provider."""
    files = sorted(str(p) for p in (ROOT / "deploy" / "istio").glob("*.yaml"))
    done = node_check(*files)
    assert done.returncode == 0
    assert done.stdout.count("ok ") == 3
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "istio" / "authorization-policy.yaml").read_text()))
    custom = next(d for d in docs if d["spec"]["action"] == "CUSTOM")
    assert custom["spec"]["provider"]["name"] == "session-cache"
    mesh = yaml.safe_load((ROOT / "deploy" / "istio" / "extension-provider.yaml").read_text())
    provider = mesh["spec"]["meshConfig"]["extensionProviders"][0]
    assert provider["name"] == "session-cache"
    assert provider["envoyExtAuthzGrpc"]["failOpen"] is False


def test_the_istio_checker_refuses_mistakes(tmp_path):
    """An action the CRD does not know is refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "deploy" / "istio" / "authorization-policy.yaml").read_text()
                   .replace("action: CUSTOM", "action: ALLOW_ALL"))
    assert node_check(str(bad)).returncode == 1
