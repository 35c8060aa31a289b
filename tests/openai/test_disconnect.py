"""A client that leaves before a non-streaming answer is ready aborts its engine requests
(vLLM's `with_cancellation`): nothing keeps generating for nobody, KV blocks come back at once."""
from __future__ import annotations

import json
import socket
import time

import grpc

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc


def test_disconnect_aborts_a_non_streaming_request(oai_stack):
    srv = oai_stack["srv"]
    port = srv.running.openai.port
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        before = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
        body = json.dumps({"prompt": "hello", "max_tokens": 400, "ignore_eos": True, "n": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 10
            while stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10).running_requests < 2:
                assert time.time() < deadline, "the request never started"
                time.sleep(0.01)
        # the client is gone; both choices must be aborted long before 400 tokens
        t0 = time.time()
        while time.time() - t0 < 10:
            s = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
            if s.running_requests == 0 and s.waiting_requests == 0 and s.active_streams == 0:
                break
            time.sleep(0.02)
        assert (s.running_requests, s.waiting_requests, s.active_streams) == (0, 0, 0)
        assert s.free_kv_blocks == s.total_kv_blocks
        assert s.requests_aborted - before.requests_aborted == 2
        assert time.time() - t0 < 5
