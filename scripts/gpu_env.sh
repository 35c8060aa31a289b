# Source this on the GPU machine (repo root): makes `import loraserve` work from this checkout
# without pip (that machine has torch/triton/transformers/peft/grpcio but installs nothing).
# Generated stubs (services/core/v1/*_pb2*.py) must be generated here first (`make protos`)
# and carried: run(..., carry=["services/core/v1"]).
_ls_root=$(pwd)
rm -rf /tmp/lsroot && mkdir -p /tmp/lsroot/loraserve
cp -r services/core/. /tmp/lsroot/loraserve/
cp -r services/inference /tmp/lsroot/loraserve/inference
cp -r services/registry /tmp/lsroot/loraserve/registry
cp -r kernels /tmp/lsroot/loraserve/kernels
# stubs generated here by a newer grpcio-tools refuse that machine's older grpcio at import; the
# messages and stubs themselves are compatible, so the copies there skip the version guard
sed -i 's/^if _version_not_supported:/if False:/' /tmp/lsroot/loraserve/v1/*_pb2_grpc.py 2>/dev/null
export PYTHONPATH=/tmp/lsroot:${_ls_root}${PYTHONPATH:+:$PYTHONPATH}
# wheels that machine lacks (gRPC health/reflection, sqlalchemy for the registry), downloaded here by
# scripts/fetch_gpu_wheels.sh into .whl/ and carried: run(..., carry=[".whl", ...])
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS, multimem) stays off on that machine; the TP all-reduce uses P2P loads/stores
# only (services/inference/tp/allreduce.py). Spawned TP workers inherit these.
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NCCL_NVLS_ENABLE=0
