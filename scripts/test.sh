#!/usr/bin/env bash
# The whole test suite: Rust unit and engine tests, lints, then pytest (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --release
ruff check python tests benches
python -m pytest -q
