"""Reading OTLP/JSON lines back, as a Collector's ``otlpjsonfile`` receiver does.

Decoding goes through ``json_format.ParseDict``, which accepts every spelling proto3
JSON allows (snake_case keys, enum names, numbers or strings for integers, and Go's
``"+Inf"`` that the Collector writes); only the hex ids are turned into base64 first.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar, cast

import msgspec
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ebpf_stream._convert.json import ID_SIZES

M = TypeVar("M", bound=Message)


def decode_otlp_json(line: bytes | str, message_type: type[M]) -> M:
    """The inverse of ``encode_otlp_json``: reads what the profiler wrote back.

    Accepts any OTLP/JSON, not just ours (upper-case hex, integers as numbers, enum
    names, snake_case keys) and ignores fields it does not know, as the specification
    requires of receivers. Raises ValueError for anything that is not OTLP/JSON of
    message_type.
    """
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"OTLP/JSON must be an object, not {type(obj).__name__}")
    _ids_to_base64(obj, _id_walk_plan(cast(Descriptor, message_type.DESCRIPTOR)))
    message = message_type()
    try:
        json_format.ParseDict(obj, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from exc
    return message


# --- decoding ---------------------------------------------------------------------------

# Per message type: the JSON keys (both spellings) worth visiting on decode, each with
# either the id size to convert from hex or the nested type and its own plan.
_IdPlan = dict[str, "int | tuple[Descriptor, bool]"]
_ID_WALK_PLANS: dict[Descriptor, _IdPlan] = {}


def _id_walk_plan(descriptor: Descriptor) -> _IdPlan:
    """Which keys can lead to an id, so decoding skips the (many) subtrees without ids.

    In a profile request only the dictionary's link table and the profiles themselves
    hold ids; samples, stacks, locations and functions are never visited.
    """
    plan = _ID_WALK_PLANS.get(descriptor)
    if plan is not None:
        return plan
    reaches = _types_reaching_ids(descriptor)
    for message_type in reaches:
        entry: _IdPlan = {}
        for field in message_type.fields:
            target: int | tuple[Descriptor, bool]
            sub = field.message_type
            if field.type == FieldDescriptor.TYPE_BYTES and field.name in ID_SIZES:
                if field.is_repeated:
                    continue  # no such field in OTLP; left to ParseDict as base64
                target = ID_SIZES[field.name]
            elif sub is not None and reaches.get(sub, False):
                if sub.GetOptions().map_entry:
                    continue  # map values holding ids: not in OTLP, not handled
                target = (sub, field.is_repeated)
            else:
                continue
            entry[field.json_name] = target
            entry[field.name] = target
        _ID_WALK_PLANS[message_type] = entry
    return _ID_WALK_PLANS.get(descriptor, {})


def _types_reaching_ids(root: Descriptor) -> dict[Descriptor, bool]:
    """Every message type under root, and whether an id field lies at or below it."""
    found: list[Descriptor] = []
    seen = {root}
    stack = [root]
    while stack:
        message_type = stack.pop()
        found.append(message_type)
        for field in message_type.fields:
            sub = field.message_type
            if sub is not None and sub not in seen and sub.file.package != "google.protobuf":
                seen.add(sub)
                stack.append(sub)
    reaches = {
        t: any(f.type == FieldDescriptor.TYPE_BYTES and f.name in ID_SIZES for f in t.fields)
        for t in found
    }
    changed = True
    while changed:  # fixed point, as the type graph has cycles
        changed = False
        for message_type in found:
            if not reaches[message_type] and any(
                    f.message_type is not None and reaches.get(f.message_type, False)
                    for f in message_type.fields):
                reaches[message_type] = changed = True
    return reaches


def _ids_to_base64(obj: dict[str, Any], plan: _IdPlan) -> None:
    """Rewrite hex ids under obj, in place, to the base64 that ParseDict expects."""
    for key, value in obj.items():
        target = plan.get(key)
        if target is None or value is None:
            continue
        if isinstance(target, int):
            obj[key] = _hex_to_base64(value, key, target)
            continue
        sub, repeated = target
        sub_plan = _ID_WALK_PLANS[sub]
        if repeated and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _ids_to_base64(item, sub_plan)
        elif not repeated and isinstance(value, dict):
            _ids_to_base64(value, sub_plan)
        # Anything else has the wrong shape; ParseDict reports it.


def _hex_to_base64(value: Any, key: str, size: int) -> Any:
    if not isinstance(value, str):
        return value  # wrong type: ParseDict reports it
    if value == "":
        return value  # the Collector's older writers wrote empty ids as ""
    if len(value) != 2 * size:
        raise ValueError(f"{key} must be {2 * size} hex digits, not {value!r}")
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{key} is not hex: {value!r}") from exc
    # All zeros means no id to the Collector; keep it empty, as encoding leaves it out.
    return base64.b64encode(raw).decode("ascii") if any(raw) else ""
