"""Write a TFLite model (the flatbuffer object API's ModelT) with nothing stored twice.

The object API's `Pack` writes every vector and table it meets, so a model repeats what is the same:
the all-zero zero-point vector of each per-channel quantized tensor (8 bytes a channel: 19 KB of a
MobileNetV2-style net's int8 bundle, once per distinct channel count is enough), the shape vector of
each tensor, the options table of each op, the empty Buffer table of each tensor without data. A
flatbuffer may point at one copy from many places: readers follow offsets and never ask whether
two are equal (flatc's builders share strings and vtables the same way). `pack` keeps one copy of
each distinct scalar vector, string and table. What a reader sees is unchanged; only offsets move.

It also writes Buffer.data 16-byte aligned, as the schema asks (`force_align: 16`) and as the
converter wrote it; the object API's numpy path would write it with alignment 1.
"""
import hashlib

import flatbuffers
import numpy as np

TFLITE_FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16
# Keys of vectors longer than this hold their sha256, not their bytes (weights can be megabytes).
_KEY_BYTES = 64


class SharingBuilder(flatbuffers.Builder):
    """A flatbuffers Builder that writes each distinct scalar vector, string and table once."""

    def __init__(self, initial_size: int = 1024):
        super().__init__(initial_size)
        self._written = {}   # key -> offset of the copy already written
        self._start = None   # Offset() where the vector or table being written began
        self._vector = None  # [element size, alignment, holds offsets] of the vector being written
        self._fields = None  # [field count, (slot, kind, value)...] of the table being written

    # Vectors and strings.
    def StartVector(self, elemSize, numElems, alignment):
        self._start, self._vector = self.Offset(), [elemSize, alignment, False]
        return super().StartVector(elemSize, numElems, alignment)

    def PrependUOffsetTRelative(self, off):
        if self._vector is not None:
            # Offsets are relative to where they sit: equal bytes elsewhere point somewhere else.
            self._vector[2] = True
        return super().PrependUOffsetTRelative(off)

    def EndVector(self, numElems=None):
        if self._vector is None:  # CreateString's own call: it shares below
            return super().EndVector(numElems)
        (size, alignment, holds_offsets), start = self._vector, self._start
        self._vector = None
        end = super().EndVector(numElems)
        if holds_offsets:
            return end
        return self._once(("vector", size, alignment, self._written_bytes(size)), start, end)

    def CreateNumpyVector(self, x):
        if x.dtype != np.uint8:
            return super().CreateNumpyVector(x)
        # Byte vectors are Buffer.data (and custom options): aligned as the schema forces for data.
        self.StartVector(1, x.size, BUFFER_ALIGNMENT)
        payload = x.tobytes()
        self.head -= len(payload)
        self.Bytes[self.head:self.head + len(payload)] = payload
        self.vectorNumElems = x.size
        return self.EndVector()

    def CreateString(self, s, encoding="utf-8", errors="strict"):
        start = self.Offset()
        end = super().CreateString(s, encoding, errors)
        return self._once(("string", self._written_bytes(1)), start, end)

    # Tables.
    def StartObject(self, numfields):
        super().StartObject(numfields)
        self._start, self._fields = self.Offset(), [numfields]

    def PrependSlot(self, flags, o, x, d):
        if self._fields is not None and (x != d or self.forceDefaults):
            # Compared as the bytes written: 1 and 1.0, or 0.0 and -0.0, are other bytes.
            self._fields.append((o, flags.name, flags.packer_type.pack(x)))
        return super().PrependSlot(flags, o, x, d)

    def PrependUOffsetTRelativeSlot(self, o, x, d):
        if self._fields is not None and (x != d or self.forceDefaults):
            self._fields.append((o, "offset", x))  # x is absolute: equal means the same child
        return super().PrependUOffsetTRelativeSlot(o, x, d)

    def PrependStructSlot(self, v, x, d):
        self._fields = None  # an inline struct is not compared: this table is written as it is
        return super().PrependStructSlot(v, x, d)

    def EndObject(self):
        fields, start = self._fields, self._start
        self._fields = None
        if fields is None:
            return super().EndObject()
        key = ("table", tuple(fields))
        if key in self._written:
            self.nested, self.current_vtable = False, None
            return self._rewind(key, start)
        self._written[key] = end = super().EndObject()
        return end

    # Sharing.
    def _written_bytes(self, element_size: int) -> bytes:
        """The length prefix and elements of the vector or string just written."""
        length = int.from_bytes(self.Bytes[self.head:self.head + 4], "little")
        written = bytes(self.Bytes[self.head:self.head + 4 + length * element_size])
        return written if len(written) <= _KEY_BYTES else hashlib.sha256(written).digest()

    def _once(self, key, start: int, end: int) -> int:
        if key in self._written:
            return self._rewind(key, start)
        self._written[key] = end
        return end

    def _rewind(self, key, start: int) -> int:
        """Drop what was written since `start` (an Offset(), stable when the buffer grows) and
        point at the earlier copy instead."""
        self.head = len(self.Bytes) - start
        return self._written[key]


def pack(model) -> bytes:
    """The .tflite bytes of `model` (a ModelT), each distinct vector, string and table once."""
    builder = SharingBuilder()
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def buffer_data_positions(model_buffer: bytes) -> list[int | None]:
    """Where in the file each Buffer's data starts (None: no data). Buffers `pack` wrote once share
    a position: a weight stored for two tensors is one copy of its bytes."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(model_buffer, 0)
    positions = []
    for index in range(model.BuffersLength()):
        buffer = model.Buffers(index)
        field = buffer._tab.Offset(4)  # Buffer.data, the table's first field
        positions.append(buffer._tab.Vector(field) if field and buffer.DataLength() else None)
    return positions
