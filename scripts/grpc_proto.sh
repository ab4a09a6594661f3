#!/bin/sh
# Regenerates agent/serving/grpc/grpc_predict_v2_pb2.py and .pyi from grpc_predict_v2.proto.
# Made with: pip install grpcio-tools==1.81.1 (libprotoc 33.5; the generated code needs
# protobuf >= 6.33.5 at run time, as the [grpc] extra says).
#
# The messages go into a descriptor pool of their own, not protobuf's default one: Triton's
# client (tritonclient.grpc) defines the same names (package "inference") in its own file, and
# one process may hold both (tests, benchmarks, an application that embeds the agent).
set -eu
cd "$(dirname "$0")/../agent/serving/grpc"
python="${PYTHON:-../../../.venv/bin/python}"
"$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. grpc_predict_v2.proto
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
    grpc_predict_v2_pb2.py
grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile' grpc_predict_v2_pb2.py
