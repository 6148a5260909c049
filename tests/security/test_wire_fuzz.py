"""Malformed and oversized frames on the shared socket framing never crash or over-allocate."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.wire import (
    decode_body,
    encode_frame,
    pack_tensor,
    parse_address,
    recv_frame,
    send_frame,
    unpack_tensor,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bodies_decode_or_raise_transport_error(body: bytes) -> None:
    with contextlib.suppress(TransportError):
        decode_body(body)


_json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_json_like)
def test_unpack_tensor_rejects_anything_malformed(obj: object) -> None:
    try:
        arr = unpack_tensor(obj)
    except TransportError:
        return
    assert isinstance(arr, np.ndarray)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["int8", "int32", "int64", "float32", "float64"]),
    st.lists(st.integers(min_value=0, max_value=5), max_size=4),
)
def test_tensor_roundtrip(dtype: str, shape: list[int]) -> None:
    a = (np.arange(int(np.prod(shape)) if shape else 1) % 100).astype(dtype).reshape(tuple(shape))
    b = unpack_tensor(msgpack.unpackb(msgpack.packb(pack_tensor(a), use_bin_type=True), raw=False))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_tensor_with_wrong_byte_count_or_dtype_is_rejected() -> None:
    good = pack_tensor(np.zeros((2, 3), np.int32))
    with pytest.raises(TransportError, match="bytes for shape"):
        unpack_tensor({**good, "data": good["data"][:-1]})
    with pytest.raises(TransportError, match="dtype"):
        unpack_tensor({**good, "dtype": "object"})
    with pytest.raises(TransportError, match="dtype"):
        pack_tensor(np.array(["a"], dtype=object))


def test_oversized_frame_is_refused_before_reading_the_body() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(struct.pack(">I", 2**31))  # claims 2 GiB; no body follows
        b.settimeout(2)
        with pytest.raises(TransportError, match="exceeds limit"):
            recv_frame(b, max_bytes=1 << 20)
    finally:
        a.close()
        b.close()


def test_roundtrip_and_truncated_frame_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    try:
        payload = {"op": "ping", "x": pack_tensor(np.arange(10, dtype=np.int64))}
        t = threading.Thread(target=send_frame, args=(a, payload))
        t.start()
        got = recv_frame(b)
        t.join()
        assert got["op"] == "ping" and np.array_equal(unpack_tensor(got["x"]), np.arange(10))
        frame = encode_frame({"op": "ping"})
        a.sendall(frame[:-2])
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2)
        with pytest.raises(TransportError, match="closed"):
            recv_frame(b)
    finally:
        a.close()
        b.close()


def test_addresses() -> None:
    assert parse_address("127.0.0.1:9000") == (socket.AF_INET, ("127.0.0.1", 9000))
    assert parse_address("unix:/tmp/x.sock") == (socket.AF_UNIX, "/tmp/x.sock")
    with pytest.raises(TransportError, match="bad address"):
        parse_address("localhost")
