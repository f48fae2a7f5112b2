#!/usr/bin/env bash
# The llama.cpp yardstick of bench/inference.py: llama-cpp-python built from its PyPI source for this CPU
# (CPU only, the machine's own instruction set), and the gguf package that writes the bench's model files,
# installed into the current Python environment. Never a project or CI dependency. Compiling takes 10-40 minutes
# on 2 cores. Usage: bash bench/setup_llama_cpp.sh [python]   (default: the python on PATH)
set -euo pipefail
PY="${1:-python}"
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$PY" -m pip install --no-binary llama-cpp-python --no-cache-dir llama-cpp-python gguf
"$PY" -c "import llama_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__, 'ready')"
