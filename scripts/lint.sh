#!/usr/bin/env bash
# Lints every Python file (ruff check, with ruff.toml) and every shell script (shellcheck,
# with .shellcheckrc) of the repository, with the versions pinned in
# tests/ecosystem/requirements.txt (installed by scripts/python-env.sh). Exits non-zero
# on any finding.
#
#   scripts/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/python-env.sh >/dev/null
BIN=target/ecosystem/venv/bin

# Shell scripts: *.sh, and any tracked file whose first line is a sh or bash shebang
# (.ci/run).
mapfile -t shell < <(
  git ls-files -z | xargs -0 awk 'FNR == 1 { if (FILENAME ~ /\.sh$/ || /^#!.*[/ ](ba)?sh( |$)/) print FILENAME; nextfile }'
)

echo "ruff $("$BIN/ruff" --version | cut -d' ' -f2): every Python file"
"$BIN/ruff" check .
echo "shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p'): ${shell[*]}"
"$BIN/shellcheck" "${shell[@]}"
echo "lint: no findings"
