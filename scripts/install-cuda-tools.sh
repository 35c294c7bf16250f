#!/usr/bin/env bash
# Install the CUDA 13.0 NVRTC toolchain from PyPI wheels (no GPU, no driver, no root needed), so
# that tests/nvrtc_compile.rs really compiles every kernel (sm_80/sm_90 CUBIN + ptxas report).
# Versions are pinned to 13.0.x on purpose: the GPU machines run driver 580 (CUDA 13.0), and a
# newer NVRTC emits PTX that their ptxas/driver rejects (see /work/shared/docs/CUDA_TOOLCHAIN.md).
#
# Two ways to use it:
#   bash scripts/install-cuda-tools.sh      # install (if needed), then print the export line to copy
#   source scripts/install-cuda-tools.sh    # install (if needed) and export LD_LIBRARY_PATH (and
#                                           # PATH, for ptxas) in the current shell
# Then: REQUIRE_NVRTC=1 cargo test --test nvrtc_compile
#
# CUDA_TOOLS_CUBLAS=1 also installs cuBLAS 13.0 (nvidia-cublas, a ~420 MB wheel, into its own
# folder ${CUDA_PYPI_CUBLAS:-$HOME/.cache/cuda-pypi-13.0-cublas}) and puts it on LD_LIBRARY_PATH:
# what a GPU machine without a CUDA toolkit needs to train (the tests and CI do not).
#
# After sourcing, _CUDA_TOOLS_LIB and _CUDA_TOOLS_BIN name the lib/ and bin/ folders (not exported);
# _CUDA_TOOLS_CUBLAS_LIB cuBLAS's lib/, with CUDA_TOOLS_CUBLAS=1.
# Idempotent: when libnvrtc.so.13 is already in the target folder nothing is downloaded.
# The folder is ${CUDA_PYPI:-$HOME/.cache/cuda-pypi-13.0}.
# All wheels go in ONE pip command: a second `pip install --target` into the same folder installs
# nothing ("already exists"), and --upgrade would wipe the wheels installed before it. To change
# the set, delete the folder and run this again.

_cuda_tools_main() {
    local dir="${CUDA_PYPI:-$HOME/.cache/cuda-pypi-13.0}"
    local lib="$dir/nvidia/cu13/lib"
    if [ ! -e "$lib/libnvrtc.so.13" ]; then
        echo "installing NVRTC 13.0 wheels into $dir" >&2
        # As root (containers, CI) pip warns that it may break the system packages; this installs
        # into its own --target folder, so the warning is noise.
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-cache-dir --no-deps --disable-pip-version-check --target "$dir" \
            nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
            nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvcc==13.0.88 || return 1
        if [ ! -e "$lib/libnvrtc.so.13" ]; then
            echo "error: pip finished but $lib/libnvrtc.so.13 is missing" >&2
            return 1
        fi
    else
        echo "NVRTC 13.0 already installed in $dir" >&2
    fi
    _CUDA_TOOLS_LIB="$lib"
    _CUDA_TOOLS_BIN="$dir/nvidia/cu13/bin"
    if [ "${CUDA_TOOLS_CUBLAS:-0}" = 1 ]; then
        # Its own folder: a second `pip install --target` into the NVRTC folder would install nothing.
        local blas="${CUDA_PYPI_CUBLAS:-$HOME/.cache/cuda-pypi-13.0-cublas}"
        if [ ! -e "$blas/nvidia/cu13/lib/libcublasLt.so.13" ]; then
            echo "installing cuBLAS 13.0 into $blas" >&2
            PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-cache-dir --no-deps --disable-pip-version-check --target "$blas" \
                nvidia-cublas==13.0.2.14 || return 1
            [ -e "$blas/nvidia/cu13/lib/libcublasLt.so.13" ] || { echo "error: pip finished but $blas/nvidia/cu13/lib/libcublasLt.so.13 is missing" >&2; return 1; }
        else
            echo "cuBLAS 13.0 already installed in $blas" >&2
        fi
        _CUDA_TOOLS_CUBLAS_LIB="$blas/nvidia/cu13/lib"
    fi
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: never `exit` or `set -e` here, that would act on the caller's shell. A failed
    # install makes `source` return 1 (so a caller under `set -e` stops).
    if _cuda_tools_main; then
        local_dir=""
        for local_dir in ${_CUDA_TOOLS_CUBLAS_LIB:+"$_CUDA_TOOLS_CUBLAS_LIB"} "$_CUDA_TOOLS_LIB"; do
            case ":${LD_LIBRARY_PATH:-}:" in
                *":$local_dir:"*) ;;
                *) export LD_LIBRARY_PATH="$local_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
            esac
        done
        unset local_dir
        case ":$PATH:" in
            *":$_CUDA_TOOLS_BIN:"*) ;;
            *) export PATH="$_CUDA_TOOLS_BIN:$PATH" ;;
        esac
        echo "exported LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
        unset -f _cuda_tools_main
        return 0
    fi
    unset -f _cuda_tools_main
    return 1
else
    set -euo pipefail
    _cuda_tools_main
    echo "export LD_LIBRARY_PATH=\"$_CUDA_TOOLS_LIB${_CUDA_TOOLS_CUBLAS_LIB:+:$_CUDA_TOOLS_CUBLAS_LIB}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
fi
