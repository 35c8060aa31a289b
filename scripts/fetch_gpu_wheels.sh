#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded here (it has no internet) into .whl/ (gitignored), which
# scripts/gpu_env.sh installs there: carry them with run(..., carry=[".whl", ...]).
#   grpcio-health-checking / grpcio-reflection: the gRPC servers (matching that machine's grpcio 1.84)
#   alembic (+ mako): the registry's schema migrations, imported when the registry starts
#   sqlalchemy (+ greenlet): the adapter registry, so registry-backed GPU tests and benchmarks/bench_churn.py
#   (registry on loopback for the cold-adapter figure) run there too
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 "sqlalchemy>=2.0,<2.1" greenlet alembic mako
ls .whl
