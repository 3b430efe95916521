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
# A fresh clone anywhere works: the data sets ship with the project. The clone sits in a folder
# with no shared/ beside it and runs with its own Python files (the built extension copied in).
empty_dev_null
clone_root="$(mktemp -d)"
git clone --quiet . "$clone_root/peftscale"
cp python/peftscale/_core*.so "$clone_root/peftscale/python/peftscale/"
(cd "$clone_root/peftscale" && env -u PEFTSCALE_DATA PYTHONPATH="$clone_root/peftscale/python" \
  python -m peftscale eval --dataset gsm8k --slice 0:2 --strategies greedy --out "$clone_root/eval")
rm -rf "$clone_root"
# Every CPU path on every machine: the kernel, batching and determinism tests again with the
# kernels capped to AVX2 and to portable Rust (PEFTSCALE_MAX_CPU_ISA), whichever CPU runs CI.
# The portable path is slow, so it skips the two tests that decode the most.
for cap in avx2 portable; do
  empty_dev_null
  PEFTSCALE_MAX_CPU_ISA=$cap cargo test --release -p peftscale-core --lib kernels
  more=()
  if [ "$cap" = avx2 ]; then
    more=(tests/test_smollm2.py::test_quantized_top1_agrees_with_f32
      tests/test_eval_run.py::test_smaller_budgets_read_from_the_largest_run_equal_their_own_runs)
  fi
  PEFTSCALE_MAX_CPU_ISA=$cap python -m pytest -q tests/test_kernels.py tests/test_tiny_models.py \
    tests/test_half_weights.py \
    tests/test_smollm2.py::test_batched_prompts_of_different_lengths_equal_single "${more[@]}"
done
