"""TensorBoard event files written with the standard library (no TensorFlow, no protobuf).

An event file is a sequence of TFRecords: ``uint64 length``, ``uint32 masked CRC32C of
the length``, the bytes, ``uint32 masked CRC32C of the bytes`` (little endian; the mask is
``((crc >> 15) | (crc << 17)) + 0xa282ead8``). Each record is a serialised ``Event``
protocol buffer; only the few fields TensorBoard needs are written:

    Event    {1: wall_time double, 2: step int64, 3: file_version string, 5: summary}
    Summary  {1: repeated Value}
    Value    {1: tag string, 2: simple_value float, 8: tensor, 9: metadata}
    Tensor   {1: dtype enum (7 = DT_STRING), 2: shape (empty: a scalar), 8: string_val}
    Metadata {1: plugin_data {1: plugin_name "text"}}

so scalars are ``simple_value`` summaries and text a scalar string tensor for the text
plugin. Tests read the files back with the ``tensorboard`` package's own event reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around ``data``."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


# --- protocol buffer wire format: just what an Event needs

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def scalar_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))


def text_value(tag: str, text: str) -> bytes:
    tensor = _key(1, 0) + _varint(7) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
    metadata = _bytes_field(1, _bytes_field(1, b"text"))
    return _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, metadata)


def event(step: int, wall_time: float, values=(), file_version: str | None = None) -> bytes:
    """A serialised Event with a Summary of the given serialised Values."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    return out


class EventWriter:
    """Appends events to one ``events.out.tfevents.<time>.<host>`` file in ``directory``.

    The directory and file are made on the first write; every write is flushed (a run
    that is killed leaves whole records, and TensorBoard shows them while it runs)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.path = None

    def _open(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.dir / name
        with open(self.path, "ab") as f:
            f.write(tfrecord(event(0, time.time(), file_version="brain.Event:2")))

    def write(self, step: int, values):
        if not values:
            return
        if self.path is None:
            self._open()
        with open(self.path, "ab") as f:
            f.write(tfrecord(event(step, time.time(), values)))

    def scalars(self, step: int, scalars: dict):
        """One event holding a scalar summary per (tag, value); None values are left out."""
        self.write(step, [scalar_value(tag, v) for tag, v in scalars.items() if v is not None])

    def text(self, step: int, tag: str, text: str):
        self.write(step, [text_value(tag, text)])
