"""trtllm-bench style LoRA benchmarks: `loraserve bench prepare-dataset | throughput`.

dataset.py  synthetic requests as JSON lines (trtllm-bench's format)
runner.py   replay against an in-process engine or a gRPC server, timing each request
report.py   throughput, TTFT/TPOT percentiles, adapter cache hit rate; text, JSON, PNG
cli.py      the `bench` command group
"""
