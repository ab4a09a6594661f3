"""The agent's generated messages against tritonclient's own (service_pb2, model_config_pb2):
every field the agent declares has Triton's number, type and cardinality, every enum value its
number, every RPC its request and response types; so stock clients parse what the agent sends."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from agent.serving.grpc import grpc_predict_v2_pb2 as ours

# tritonclient's modules register their files in protobuf's default pool.
TRITON = descriptor_pool.Default()
assert service_pb2.DESCRIPTOR.pool is TRITON and model_config_pb2.DESCRIPTOR.pool is TRITON


def _messages(descriptors: Iterator[Descriptor]) -> Iterator[Descriptor]:
    for message in descriptors:
        yield message
        yield from _messages(iter(message.nested_types))


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return ""


def field_mismatches(message: Descriptor, pool: descriptor_pool.DescriptorPool) -> list[str]:
    """Every way ``message``'s fields differ from the same-named message in ``pool``."""
    try:
        theirs = pool.FindMessageTypeByName(message.full_name)
    except KeyError:
        return [f"{message.full_name}: no such message in tritonclient"]
    found = []
    for field in message.fields:
        other = theirs.fields_by_name.get(field.name)
        where = f"{message.full_name}.{field.name}"
        if other is None:
            found.append(f"{where}: no such field in tritonclient")
            continue
        mine = (field.number, field.type, field.is_repeated, _type_name(field))
        their = (other.number, other.type, other.is_repeated, _type_name(other))
        if mine != their:
            found.append(f"{where}: (number, type, repeated, type name) {mine} != {their}")
    return found


def enum_mismatches(enum: EnumDescriptor, pool: descriptor_pool.DescriptorPool) -> list[str]:
    theirs = pool.FindEnumTypeByName(enum.full_name)
    return [
        f"{enum.full_name}.{value.name}: {value.number}"
        for value in enum.values
        if value.name not in theirs.values_by_name
        or theirs.values_by_name[value.name].number != value.number
    ]


def test_every_message_field_matches_tritonclient() -> None:
    file = ours.DESCRIPTOR
    assert file.pool is not TRITON  # a pool of its own: both can be loaded in one process
    messages = list(_messages(iter(file.message_types_by_name.values())))
    names = {message.full_name for message in messages}
    # The three RPCs' messages are among those compared.
    for name in ("ModelConfig", "ModelInput", "ModelStatistics", "RepositoryIndexResponse"):
        assert f"inference.{name}" in names
    problems = [problem for message in messages for problem in field_mismatches(message, TRITON)]
    assert problems == []
    assert enum_mismatches(file.enum_types_by_name["DataType"], TRITON) == []


def test_every_rpc_matches_tritonclient() -> None:
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = TRITON.FindServiceByName("inference.GRPCInferenceService")
    assert {"ModelConfig", "RepositoryIndex", "ModelStatistics"} <= set(service.methods_by_name)
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert not method.client_streaming and not method.server_streaming


def test_a_wrong_field_is_found() -> None:
    """The comparison itself: a message with a wrong number, type or cardinality is named."""
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="wrong.proto", package="inference")
    message = proto.message_type.add(name="StatisticDuration")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    message.field.add(
        name="count", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT64, label=optional
    )
    message.field.add(
        name="ns", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64, label=optional
    )
    message.field.add(
        name="extra", number=9, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL, label=optional
    )
    pool.Add(proto)
    wrong = pool.FindMessageTypeByName("inference.StatisticDuration")
    problems = field_mismatches(wrong, TRITON)
    assert len(problems) == 3
    assert problems[0].startswith("inference.StatisticDuration.count: ")
    assert problems[1].startswith("inference.StatisticDuration.ns: ")
    assert problems[2] == "inference.StatisticDuration.extra: no such field in tritonclient"
