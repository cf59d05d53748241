#!/usr/bin/env bash
# Builds .gpu/ (git-ignored): what benchmarks/gpu_run.sh needs on a lent GPU machine beyond its
# image (Python 3.12, jax[cuda] 0.11.2, torch 2.11, optax, orbax, tensorstore, ...), which cannot
# reach a package index. Wheels for cp312 from PyPI, plus pure-Python packages that PyPI ships
# only as source (sam2 and its training package, iopath, antlr4) copied from this project's .venv (make setup).
# flax 0.12.12: 0.12.8 (our pin) imports jax.experimental.hijax.HiPrimitive, gone in jax 0.11.
#
#     bash benchmarks/gpu_packages.sh && echo /.gpu/ >> .git/info/exclude
set -eu
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/whl .gpu/pure
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl \
  flax==0.12.12 ml_collections==1.1.0 nibabel==5.4.2 grain==0.2.18 array_record==0.8.6 hydra-core==1.3.8 \
  omegaconf==2.3.1 tensorboardX==2.6.5 portpicker==1.6.0
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$SP/sam2" "$SP/training" "$SP/antlr4" "$SP/iopath" .gpu/pure/  # training: bench_train_full's SAM2Train
find .gpu/pure -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
