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
export PYTHONPATH=/tmp/lsroot:${_ls_root}${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
