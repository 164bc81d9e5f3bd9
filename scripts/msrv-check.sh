#!/usr/bin/env bash
# Holds `rust-version` in Cargo.toml (the oldest Rust that builds the service) without
# installing that toolchain:
#   - the standard library: clippy's incompatible_msrv lint, which reads rust-version and
#     refuses any std item stabilised after it, runs in `cargo clippy -- -D warnings`
#     (.ci/run); this script checks that nothing allows it away;
#   - the dependencies: no package of Cargo.lock declares a newer rust-version (cargo on
#     the older toolchain would refuse to build it).
# Language features stabilised after rust-version have no lint; only a build with that
# toolchain would catch them.
#
#   scripts/msrv-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$msrv" ] || { echo "Cargo.toml declares no rust-version"; exit 1; }
echo "rust-version $msrv"

if grep -rnE 'incompatible_msrv|^msrv' --include='*.rs' --include='clippy.toml' --include='.clippy.toml' \
  src tests examples build.rs . 2>/dev/null | grep -v '^./target/' | grep -v 'scripts/msrv-check.sh'; then
  echo "clippy's incompatible_msrv is allowed or its msrv overridden above: rust-version would go unchecked"
  exit 1
fi

host=$(rustc -vV | sed -n 's/^host: //p')
cargo metadata --format-version 1 --locked --filter-platform "$host" | python3 -c '
import json, sys
msrv = tuple(int(p) for p in sys.argv[1].split("."))
newer = []
for package in json.load(sys.stdin)["packages"]:
    declared = package.get("rust_version")
    if declared and tuple(int(p) for p in declared.split(".")) > msrv + (0,) * (3 - len(msrv)):
        newer.append("{} {} needs Rust {}".format(package["name"], package["version"], declared))
if newer:
    print("dependencies newer than rust-version " + sys.argv[1] + ":\n  " + "\n  ".join(sorted(newer)))
    sys.exit(1)
print("no dependency declares a rust-version newer than " + sys.argv[1])
' "$msrv"
