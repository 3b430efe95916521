#!/usr/bin/env bash
# The whole test suite: Rust unit and engine tests, lints, the CUDA kernels compiled for sm_90
# (no GPU needed), then pytest (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/devnull.sh
empty_dev_null
cargo fmt --all -- --check
empty_dev_null
cargo clippy --all-targets -- -D warnings
# The Ascend path builds without CANN; its plans are checked against the CPU scorer.
empty_dev_null
cargo clippy -p peftscale-core --all-targets --features ascend -- -D warnings
empty_dev_null
cargo test -p peftscale-core --features ascend --lib -- kernels::ascend kernels::device
empty_dev_null
# The parser fuzzer also mutates the packaged model's tokenizer and chat template.
PEFTSCALE_PACKAGED_GGUF="$(python -c 'from peftscale.models import smollm2_135m_instruct as m; print(m())')"
export PEFTSCALE_PACKAGED_GGUF
cargo test --release
ruff check python tests benches
empty_dev_null
bash scripts/cuda-ptx.sh
empty_dev_null
python -m pytest -q
