"""OTLP/JSON: export requests as JSON lines, the way the Collector's file exporter writes them.

A file of such lines can be replayed into a Collector (its ``otlpjsonfile`` receiver reads
exactly this), so what we write must follow the OTLP specification's "JSON Protobuf
Encoding" rather than plain proto3 JSON, which differs in two places:

* ``traceId``, ``spanId``, ``parentSpanId`` and ``profileId`` are lower-case hex, not
  base64. The Collector rejects base64 there (wrong length), so a generic
  ``MessageToJson`` file would not replay. Other bytes fields stay base64.
* Enums are integers, never names.

The rest is proto3 JSON: lowerCamelCase keys, fields at their default left out, 64-bit
integers as decimal strings (the Collector writes strings and reads strings or numbers),
non-finite doubles as ``"NaN"``/``"Infinity"``/``"-Infinity"`` (the Collector's reader
parses those with ``strconv.ParseFloat``). An all-zero id is left out, as the Collector
treats it as no id at all.

The id fields are found by walking the descriptors (bytes fields named ``trace_id``,
``span_id``, ``parent_span_id`` or ``profile_id``), so messages added to OTLP later are
covered without a list of paths here.

Encoding does not use ``json_format.MessageToDict``: it is pure Python, and with the
hex fix-up pass it would need and ``json.dumps`` it took about 90 ms for a profile of
2,000 stacks of 20 frames and 20,000 timestamps. The encoder here is also driven by
the descriptors, but does one ``ListFields()`` per message (which already leaves out
defaults, as proto3 JSON wants) and hands the dict to msgspec: about 30 ms.

Output is equivalent to the Collector's, not byte-identical: keys come in field-number
order, ``5.0`` is written ``5.0`` where Go writes ``5``, and an unset resource or scope
is left out where the Collector writes ``{}``. None of this changes what is read back.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar, cast

import msgspec
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["ID_SIZES", "encode_otlp_json"]

M = TypeVar("M", bound=Message)

# Bytes fields written as hex, with the size the Collector's reader insists on.
ID_SIZES: Final = {"trace_id": 16, "span_id": 8, "parent_span_id": 8, "profile_id": 16}

_INT64_TYPES: Final = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_SINT64,
})
# Already JSON as they come out of the message: 32-bit integers, bools, strings, enums.
_PLAIN_TYPES: Final = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM,
})

_Encode = Callable[[Any], Any]
# A dict, except for well-known types, which map to strings, lists and so on.
_EncodeMessage = Callable[[Message], Any]

# Returned by a field encoder for a value to leave out (an all-zero id).
_SKIP: Final = object()

_JSON_ENCODER: Final = msgspec.json.Encoder()
_MESSAGE_ENCODERS: dict[Descriptor, _EncodeMessage] = {}


def encode_otlp_json(request: Message) -> bytes:
    """One line of OTLP/JSON (no trailing newline) for one Export*ServiceRequest.

    Any message works; the Export*ServiceRequest types are the ones a Collector reads
    back. Raises ValueError for an id of the wrong size, which the Collector would
    refuse on read: better to fail here than to write a file that cannot be replayed.
    """
    line = _JSON_ENCODER.encode(_message_encoder(_descriptor(request))(request))
    # msgspec escapes control characters but writes U+0085/U+2028/U+2029 raw; escape
    # them too, so that no reader's idea of a line break can split a record.
    if b"\xc2\x85" in line or b"\xe2\x80\xa8" in line or b"\xe2\x80\xa9" in line:
        line = (line.replace(b"\xc2\x85", b"\\u0085")
                .replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029"))
    return line


# --- encoding ---------------------------------------------------------------------------


def _descriptor(message: Message | type[Message]) -> Descriptor:
    # The stubs type DESCRIPTOR as the pure-Python or the upb class; both have the same
    # interface, and the Python one is what the rest of this module is typed against.
    return cast(Descriptor, message.DESCRIPTOR)


def _message_encoder(descriptor: Descriptor) -> _EncodeMessage:
    """The dict-building function for one message type, made once and cached.

    Field plans are filled in lazily so that recursive types (AnyValue holds ArrayValue
    holds AnyValue) need no special care.
    """
    encoder = _MESSAGE_ENCODERS.get(descriptor)
    if encoder is not None:
        return encoder
    if descriptor.file.package == "google.protobuf":
        # Well-known types have JSON forms of their own; OTLP uses none, so the slow
        # path is fine (they cannot hold OTLP ids).
        def encode_well_known(message: Message) -> Any:
            return json_format.MessageToDict(message, use_integers_for_enums=True)
        encoder = encode_well_known
    else:
        plans: dict[FieldDescriptor, tuple[str, _Encode]] = {}

        def encode(message: Message) -> dict[str, Any]:
            out: dict[str, Any] = {}
            # ListFields() gives only fields that are set (non-default, non-empty, or a
            # chosen oneof member), which is what proto3 JSON writes.
            for field, value in message.ListFields():
                plan = plans.get(field)
                if plan is None:
                    plan = plans[field] = _field_plan(field)
                encoded = plan[1](value)
                if encoded is not _SKIP:
                    out[plan[0]] = encoded
            return out
        encoder = encode
    _MESSAGE_ENCODERS[descriptor] = encoder
    return encoder


def _field_plan(field: FieldDescriptor) -> tuple[str, _Encode]:
    key = f"[{field.full_name}]" if field.is_extension else field.json_name
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        return key, _map_encoder(message_type)
    if field.is_repeated:
        return key, _repeated_encoder(field)
    return key, _single_encoder(field)


def _single_encoder(field: FieldDescriptor) -> _Encode:
    kind = field.type
    if field.message_type is not None:
        return _message_encoder(field.message_type)
    if kind in _PLAIN_TYPES:
        return _same
    if kind in _INT64_TYPES:
        return str
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _double
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _float32
    if kind == FieldDescriptor.TYPE_BYTES:
        size = ID_SIZES.get(field.name)
        return _base64 if size is None else _hex_id(field.name, size)
    raise TypeError(f"{field.full_name}: field type {kind} has no JSON form")  # groups


def _repeated_encoder(field: FieldDescriptor) -> _Encode:
    kind = field.type
    if kind in _PLAIN_TYPES:
        return list
    if kind in _INT64_TYPES:
        def strings(values: Iterable[int]) -> list[str]:
            return list(map(str, values))
        return strings
    one = _single_encoder(field)

    def each(values: Iterable[Any]) -> list[Any]:
        return [one(value) for value in values]
    return each


def _map_encoder(entry: Descriptor) -> _Encode:
    # proto3 JSON writes a map as an object with string keys; OTLP has no maps today.
    key_type = entry.fields_by_name["key"].type
    encode_value = _single_encoder(entry.fields_by_name["value"])

    def encode(mapping: Any) -> dict[str, Any]:
        return {_map_key(key, key_type): encode_value(value) for key, value in mapping.items()}
    return encode


def _map_key(key: Any, key_type: int) -> str:
    if key_type == FieldDescriptor.TYPE_BOOL:
        return "true" if key else "false"
    return str(key)


def _same(value: Any) -> Any:
    return value


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _float32(value: float) -> float | str:
    """The shortest decimal that reads back as the same float32, as proto3 JSON writes it.

    A float field comes out of the message widened to a double (0.1 as 0.100000001...);
    writing that would be correct but noisy.
    """
    if not math.isfinite(value):
        return _double(value)
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        shorter = float(f"{value:.{digits}g}")
        if struct.pack("<f", shorter) == packed:
            return shorter
    return value


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _hex_id(name: str, size: int) -> _Encode:
    def encode(value: bytes) -> str | object:
        if len(value) != size:
            raise ValueError(f"{name} must be {size} bytes, not {len(value)}")
        return value.hex() if any(value) else _SKIP
    return encode
