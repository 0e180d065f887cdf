#!/usr/bin/env bash
# llama.cpp's Python bindings, built from source (about 8 minutes on 2 cores; needs cmake, ninja, g++), for tests/test_gguf.py's llama.cpp checks.
set -euo pipefail; nice -n 10 python -m pip install "${@}" llama-cpp-python
