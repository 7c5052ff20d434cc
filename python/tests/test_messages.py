"""
Messages of every shape through the path that writes large ``bytes`` fields from their values (``_codec._split``):
the other fields are copied into a message of their own, field by field, so every kind of field must survive it
(nested messages, repeated fields, maps, oneofs, proto3 ``optional``, defaults left unset). The message type is built
at run time from a descriptor (no protoc), and random instances go through ``_split`` and through a server.
"""

from __future__ import annotations

import os
import pathlib
import random
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import shmgrpc
from shmgrpc import _codec, _core

F = descriptor_pb2.FieldDescriptorProto
LARGE = _core.LARGE_FIELD
METHOD = "/richtest.Rich/Echo"


def _field(m: Any, name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "") -> Any:
    label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    f = m.field.add(name=name, number=number, type=kind, label=label)
    if type_name:
        f.type_name = type_name
    return f


@pytest.fixture(scope="module")
def rich() -> Any:
    """A proto3 message with a field of every kind next to its large ``bytes`` fields."""
    f = descriptor_pb2.FileDescriptorProto(name="rich_test.proto", package="richtest", syntax="proto3")
    inner = f.message_type.add(name="Inner")
    _field(inner, "blob", 1, F.TYPE_BYTES)
    _field(inner, "n", 2, F.TYPE_INT64)
    m = f.message_type.add(name="Rich")
    entry = m.nested_type.add(name="AttrsEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    _field(entry, "value", 2, F.TYPE_BYTES)
    entry = m.nested_type.add(name="KidsEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    _field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".richtest.Inner")
    m.oneof_decl.add(name="choice")
    m.oneof_decl.add(name="_opt")
    _field(m, "big", 1, F.TYPE_BYTES)
    _field(m, "other", 2, F.TYPE_BYTES)
    opt = _field(m, "opt", 3, F.TYPE_BYTES)
    opt.proto3_optional, opt.oneof_index = True, 1
    _field(m, "choice_blob", 4, F.TYPE_BYTES).oneof_index = 0
    _field(m, "choice_text", 5, F.TYPE_STRING).oneof_index = 0
    _field(m, "inner", 6, F.TYPE_MESSAGE, type_name=".richtest.Inner")
    _field(m, "inners", 7, F.TYPE_MESSAGE, repeated=True, type_name=".richtest.Inner")
    _field(m, "tags", 8, F.TYPE_BYTES, repeated=True)
    _field(m, "attrs", 9, F.TYPE_MESSAGE, repeated=True, type_name=".richtest.Rich.AttrsEntry")
    _field(m, "kids", 10, F.TYPE_MESSAGE, repeated=True, type_name=".richtest.Rich.KidsEntry")
    _field(m, "num", 11, F.TYPE_INT64)
    _field(m, "text", 12, F.TYPE_STRING)
    _field(m, "flag", 13, F.TYPE_BOOL)
    _field(m, "nums", 14, F.TYPE_INT64, repeated=True)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("richtest.Rich"))


def _payload(rng: random.Random) -> bytes:
    """Empty, small or large (from the split size up), at random."""
    return os.urandom(rng.choice([0, 7, 1000, LARGE, LARGE + rng.randrange(1 << 16)]))


def _instance(rich: Any, rng: random.Random) -> Any:
    m = rich()
    for name in ("big", "other"):
        if rng.random() < 0.8:
            setattr(m, name, _payload(rng))
    if rng.random() < 0.5:
        m.opt = _payload(rng)  # presence: set even when empty
    c = rng.random()
    if c < 0.4:
        m.choice_blob = _payload(rng)
    elif c < 0.7:
        m.choice_text = "chosen"
    if rng.random() < 0.5:
        m.inner.blob = _payload(rng)
        m.inner.n = rng.randrange(-(1 << 40), 1 << 40)
    for _ in range(rng.randrange(3)):
        m.inners.add(blob=os.urandom(rng.randrange(50)), n=rng.randrange(100))
    m.tags.extend(os.urandom(rng.randrange(20)) for _ in range(rng.randrange(3)))
    for i in range(rng.randrange(3)):
        m.attrs[f"k{i}"] = os.urandom(rng.randrange(30))
    for i in range(rng.randrange(3)):
        m.kids[f"kid{i}"].n = i + 1
    m.num = rng.randrange(-1000, 1000)
    m.text = rng.choice(["", "text", "ünïcode"])
    m.flag = rng.random() < 0.5
    m.nums.extend(rng.randrange(1000) for _ in range(rng.randrange(4)))
    return m


def test_split_messages_of_every_shape_parse_back_equal(rich: Any) -> None:
    rng = random.Random(18)
    split = 0
    for _ in range(200):
        m = _instance(rich, rng)
        items = _codec._split(m, rich.SerializeToString)
        large = [f.name for f in m.DESCRIPTOR.fields if f.type == f.TYPE_BYTES and not f.is_repeated]
        wanted = any(len(getattr(m, name)) >= LARGE for name in large)
        assert (items is not None) == wanted, m
        if items is None:
            continue
        split += 1
        again = rich.FromString(b"".join(bytes(i) for i in items))
        assert again == m
        assert again.HasField("opt") == m.HasField("opt") and again.WhichOneof("choice") == m.WhichOneof("choice")
    assert split >= 50, split


def test_messages_of_every_shape_echo_through_shared_memory(rich: Any, tmp_path: pathlib.Path) -> None:
    def echo(request: Any, context: grpc.ServicerContext) -> Any:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo, rich.FromString, rich.SerializeToString)
    server = shmgrpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("richtest.Rich", {"Echo": handler}),))
    target = f"unix:{tmp_path / 'rich.sock'}"
    server.add_insecure_port(target)
    server.start()
    try:
        with shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            call = ch.unary_unary(METHOD, rich.SerializeToString, rich.FromString)
            rng = random.Random(19)
            for _ in range(40):
                m = _instance(rich, rng)
                assert call(m, timeout=20) == m
            assert ch.stats()["shm_sent"] > 0 and ch.stats()["shm_received"] > 0, ch.stats()
    finally:
        server.stop(None)
