#!/usr/bin/env bash
# The Python environment of the ecosystem tests and the linters: a venv in
# target/ecosystem/venv holding tests/ecosystem/requirements.txt (the example clients'
# packages, pytest, grpcurl, kubernetes-validate, ruff, shellcheck). Installs only when a
# requirements file changed since the last install; prints what is installed.
#
#   scripts/python-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/ecosystem/venv
REQUIREMENTS=(tests/ecosystem/requirements.txt examples/clients/python/requirements.txt)
stamp=$VENV/.requirements-installed

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ -f "$stamp" ] && cat "${REQUIREMENTS[@]}" | cmp -s - "$stamp"; then
  echo "already installed"
else
  timeout 600 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -r tests/ecosystem/requirements.txt
  # xds-protos ships its own, older copy of the OpenTelemetry protos (spans under
  # instrumentation_library_spans) into the same opentelemetry/proto package, and which
  # copy pip writes last is not fixed: the pinned opentelemetry-proto is written again
  # over it. Envoy's protos import only the common and resource messages, which both
  # copies define alike.
  otel=$(grep -E '^opentelemetry-proto==' tests/ecosystem/requirements.txt)
  timeout 600 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    --no-deps --force-reinstall "$otel"
  "$VENV/bin/python" -c 'from opentelemetry.proto.trace.v1 import trace_pb2; trace_pb2.ResourceSpans().scope_spans'
  cat "${REQUIREMENTS[@]}" >"$stamp"
fi
"$VENV/bin/python" -m pip freeze --disable-pip-version-check
