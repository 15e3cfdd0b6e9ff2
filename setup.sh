#!/usr/bin/env bash
# Set up kda-mcp in ./.venv. Safe to re-run.
#  - With a CUDA-capable torch already installed for $PYTHON, the venv sees it (--system-site-packages),
#    so a GPU machine keeps its CUDA torch and triton.
#  - Otherwise torch 2.13.0 is installed; pip takes the machine's local CPU wheel when one is on its
#    find-links path, so CPU machines never pull the multi-GB CUDA stack.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
quiet=(-q --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "setup: CUDA torch found for $PYTHON; the venv will use it"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch 2.13.0 (CPU build where the machine provides one)"
  "${PIP[@]}" install "${quiet[@]}" "torch==2.13.0"
fi
if ! .venv/bin/python -c "import triton" >/dev/null 2>&1; then
  # Triton compiles for GPU targets without a GPU and ships ptxas, cuobjdump and nvdisasm.
  "${PIP[@]}" install "${quiet[@]}" "triton==3.6.0"
fi
# flashinfer-bench's data model and harness; its flashinfer-python requirement (flashinfer's own
# CUDA kernels) is not needed by kda, so it is installed without dependencies.
"${PIP[@]}" install "${quiet[@]}" --no-deps "flashinfer-bench==0.1.2"
"${PIP[@]}" install "${quiet[@]}" -e ".[wiki,profile,dev]"
# Build the KernelWiki index now (embeddings of the shipped pages) so the first search is fast.
.venv/bin/kda wiki build >/dev/null || echo "setup: wiki index not built now; it is built on first use"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
