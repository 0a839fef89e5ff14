#!/usr/bin/env bash
# Compiles every CUDA kernel (cuda-kernels/kernels/*.cu) with NVRTC, the same
# way the crate does at run time. Needs no GPU and no CUDA toolkit: NVRTC comes
# from the `nvidia-cuda-nvrtc` wheel on PyPI, installed with pip into a folder
# under the cargo target dir (never committed). Fails if any kernel does not
# compile or a .cu file is missing from the crate's kernel list.
#
# Env: NVRTC_WHEEL (default nvidia-cuda-nvrtc==13.0.88), NVRTC_ARCHS
# (default "compute_75 compute_90"), CARGO_TARGET_DIR, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

wheel="${NVRTC_WHEEL:-nvidia-cuda-nvrtc==13.0.88}"
archs="${NVRTC_ARCHS:-compute_75 compute_90}"
target="${CARGO_TARGET_DIR:-target}"
python="${PYTHON:-python3}"
prefix="$target/nvrtc-wheel/${wheel//[^A-Za-z0-9._-]/_}"

if [ ! -f "$prefix/.installed" ]; then
  echo "installing $wheel into $prefix"
  rm -rf "$prefix"
  mkdir -p "$prefix"
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix" "$wheel"
  touch "$prefix/.installed"
fi

lib="$(find "$prefix" -name 'libnvrtc.so.*' -not -name '*builtins*' | head -n 1)"
if [ -z "$lib" ]; then
  echo "nvrtc-check: no libnvrtc.so.* in $prefix" >&2
  exit 1
fi
libdir="$(cd "$(dirname "$lib")" && pwd)"
echo "using $lib"
if [ "${NVRTC_CHECK_ONLY_INSTALL:-0}" = 1 ]; then
  exit 0
fi

# shellcheck disable=SC2086
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo run --quiet -p colony-kernels --features cuda --example nvrtc_check -- $archs
