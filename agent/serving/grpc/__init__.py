"""The Open Inference Protocol's gRPC service (KServe v2), loaded only when configured.

Nothing outside imports this package unless ``[serving] grpc_socket`` or ``grpc_tcp`` is set:
grpcio costs about 26 MB of resident memory, which a device that only speaks REST keeps.
"""
