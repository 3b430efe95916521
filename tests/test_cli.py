"""The command line runs end to end on the packaged model."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peftscale", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_continuation(smollm2_path) -> None:
    r = _run("generate", "--chat", "--max-new-tokens", "16", "What is the capital of France? Answer in one sentence.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_model_path_is_a_clean_error(tmp_path) -> None:
    r = _run("generate", "--model", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode == 1
    assert "error: cannot load model" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_device_this_build_lacks_is_a_clean_error(smollm2_path, tmp_path) -> None:
    import peftscale as ps

    if "cuda" in ps.compiled_devices():
        pytest.skip("a CUDA build: --device cuda may work here")
    for args in (
        ("generate", "--device", "cuda:1", "hi"),
        ("eval", "--dataset", "game24", "--slice", "0:1", "--device", "cuda:1", "--out", str(tmp_path / "e")),
    ):
        r = _run(*args)
        assert r.returncode == 1, args
        assert "error: device `cuda:1` is not available" in r.stderr and "`cuda` feature" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
