"""A Python grpcio client that survives its router: streams a generation and, when the stream
breaks, resumes it on the next router with the tokens already received (the answer continues
exactly where it stopped, token for token).

    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/moe/v1/*.proto
    python docs/examples/resume_client.py 127.0.0.1:50051,127.0.0.1:50052 "Hello, experts"
"""

import sys

import grpc
from moe.v1 import inference_pb2 as pb
from moe.v1 import inference_pb2_grpc as rpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def generate(endpoints, request):
    generated, digest = [], ""
    for attempt in range(2 * len(endpoints)):
        stub = rpc.InferenceStub(grpc.insecure_channel(endpoints[attempt % len(endpoints)]))
        if generated and digest:  # continue after what arrived
            request.resume.generated_token_ids[:] = generated
            request.resume.digest = digest
        try:
            for msg in stub.GenerateStream(request):
                if msg.HasField("finished"):
                    return generated
                digest = digest or msg.delta.resume_digest
                generated += msg.delta.token_ids
                print(msg.delta.text, end="", flush=True)
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:
                raise
            print(f"\n[{e.code().name}; resuming after {len(generated)} tokens]", file=sys.stderr)
    raise RuntimeError("no router finished the request")


if __name__ == "__main__":
    request = pb.GenerateRequest(text=sys.argv[2], sampling=pb.SamplingParams(max_new_tokens=64))
    tokens = generate(sys.argv[1].split(","), request)
    print(f"\n{len(tokens)} tokens")
