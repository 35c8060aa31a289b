"""Container health check: exit 0 when a gRPC server reports SERVING on grpc.health.v1.

Docker's HEALTHCHECK and docker-compose's `healthcheck` run this inside the container
(Kubernetes uses its native `grpc:` probes instead). Both loraserve services implement
grpc.health.v1; the inference service stays NOT_SERVING until the base model is loaded.

    python grpc_healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

HOST:PORT defaults to $LORASERVE_HEALTH_ADDRESS (each image sets it to its own port).
Exit status: 0 SERVING; 1 any other status, an error, or no answer within the timeout.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Ask `address` for the health of `service` ("" = the whole server): (serving, what it said)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health check for container probes")
    parser.add_argument("address", nargs="?", default=os.environ.get("LORASERVE_HEALTH_ADDRESS"),
                        help="HOST:PORT (default: $LORASERVE_HEALTH_ADDRESS)")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("give HOST:PORT or set LORASERVE_HEALTH_ADDRESS")
    serving, said = check(args.address, args.service, args.timeout)
    print(f"{args.address}: {said}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
