"""Reading Caffe files: a network definition (.prototxt, protobuf text) and weights (.caffemodel,
binary protobuf), both generations of the format (``layer`` and legacy V1 ``layers``)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from converters.errors import ModelFormatError

from . import schema

log = logging.getLogger(__name__)


@dataclass
class Layer:
    """One Caffe layer, whichever generation it was written in."""

    name: str
    type: str  # LayerParameter type string ("Convolution", ...); V1 enum types are translated
    bottoms: list[str]
    tops: list[str]
    param: object  # the LayerParameter / V1LayerParameter message: read *_param fields from it
    index: int  # position in the file
    legacy: bool = False

    def has(self, field_name: str) -> bool:
        return field_name in self.param.DESCRIPTOR.fields_by_name and self.param.HasField(field_name)

    def sub(self, field_name: str):
        """The ``<type>_param`` sub-message (defaults when absent or when V1 has no such field)."""
        if field_name in self.param.DESCRIPTOR.fields_by_name:
            return getattr(self.param, field_name)
        return schema.message_class(f"caffe.{_PARAM_TYPES[field_name]}")()


_PARAM_TYPES = {f.name: f.message_type.name for f in schema.LayerParameter.DESCRIPTOR.fields
                if f.message_type is not None}


@dataclass
class Net:
    name: str
    msg: object  # the parsed NetParameter
    layers: list[Layer]
    legacy: bool  # written with V1 `layers`
    path: str = "<text>"


_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')


def _parse_error(path: str, e: text_format.ParseError) -> ModelFormatError:
    msg = re.sub(r"^\d+:\d+ : ", "", str(e)).strip()
    line = e.GetLine() if hasattr(e, "GetLine") else None
    where = f"{path}: line {line}" if line else path
    return ModelFormatError(f"{where}: prototxt syntax error: {msg}")


def parse_net_text(text: str, path: str = "<text>") -> Net:
    """Parse prototxt text into a :class:`Net`. Syntax errors name the line.

    Fields this importer's schema does not declare (solver-only or fork-specific ones) are skipped
    with a warning naming the first of them, instead of failing the whole file.
    """
    msg = schema.NetParameter()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        m = _UNKNOWN_FIELD.search(str(e))
        if not m:
            raise _parse_error(path, e) from None
        msg = schema.NetParameter()
        try:
            text_format.Parse(text, msg, allow_unknown_field=True)
        except text_format.ParseError as e2:
            raise _parse_error(path, e2) from None
        log.warning("%s: line %s: ignored field %r, which this importer does not know (and any "
                    "others like it)", path, e.GetLine(), m.group(1))
    return net_from_message(msg, path)


def parse_prototxt(path: str | os.PathLike) -> Net:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFormatError(f"{path}: not a text prototxt (binary data; is it a .caffemodel?)") from None
    return parse_net_text(text, str(path))


def net_from_message(msg, path: str = "<text>") -> Net:
    if len(msg.layer) and len(msg.layers):
        raise ModelFormatError(f"{path}: mixes `layer` and legacy `layers` definitions")
    legacy = len(msg.layers) > 0
    layers = []
    for i, lp in enumerate(msg.layers if legacy else msg.layer):
        if legacy:
            type_ = schema.v1_type_name(lp.type)
            if lp.type == 0:
                raise ModelFormatError(f"{path}: layer {lp.name or i!r} has no type (a V0-format net? upgrade it with "
                                       "Caffe's upgrade_net_proto_text)")
            if type_ is None:
                raise ModelFormatError(f"{path}: layer {lp.name!r} has unknown V1 layer type {lp.type}")
        else:
            type_ = lp.type
        name = lp.name or f"{type_.lower()}{i}"
        if not type_:
            raise ModelFormatError(f"{path}: layer {name!r} has no type")
        layers.append(Layer(name, type_, list(lp.bottom), list(lp.top), lp, i, legacy))
    if not layers:
        raise ModelFormatError(f"{path}: the network has no layers")
    return Net(msg.name, msg, layers, legacy, path)


# --- NetState filtering (Caffe's Net::FilterNet / StateMeetsRule), for phase TEST ---------------------

def _rule_met(state, rule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    if any(s in state.stage for s in rule.not_stage):
        return False
    return True


def filter_layers(net: Net, phase: str = "TEST") -> list[Layer]:
    """The layers Caffe instantiates for `phase` (include/exclude rules; level 0, no stages)."""
    state = schema.message_class("caffe.NetState")()
    state.phase = 1 if phase == "TEST" else 0
    kept = []
    for layer in net.layers:
        inc, exc = layer.param.include, layer.param.exclude
        if len(inc) and len(exc):
            raise ModelFormatError(f"{net.path}: layer {layer.name!r} has both include and exclude rules")
        if len(inc):
            keep = any(_rule_met(state, r) for r in inc)
        else:
            keep = not any(_rule_met(state, r) for r in exc)
        if keep:
            kept.append(layer)
    return kept


# --- weights --------------------------------------------------------------------------------------------

@dataclass
class Blob:
    """A weight blob as stored: its declared shape and values."""

    shape: tuple[int, ...]  # from `shape`, or the legacy 4-D (num, channels, height, width)
    legacy: bool  # shape came from the legacy 4-D fields
    data: np.ndarray = field(repr=False)  # flat float32


def _blob_from_raw(raw, where: str) -> Blob:
    if raw.HasField("shape"):
        shape, legacy = tuple(int(d) for d in raw.shape.dim), False
    elif any(raw.HasField(f) for f in ("num", "channels", "height", "width")):
        shape, legacy = (raw.num, raw.channels, raw.height, raw.width), True
    else:
        shape, legacy = (), False
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{where} has a negative dimension {shape}")
    if len(raw.data):
        buf = b"".join(raw.data)
        if len(buf) % 4:
            raise ModelFormatError(f"{where}: float data is {len(buf)} bytes, not a multiple of 4 (corrupt file?)")
        data = np.frombuffer(buf, dtype="<f4").astype(np.float32)
    elif len(raw.double_data):
        buf = b"".join(raw.double_data)
        if len(buf) % 8:
            raise ModelFormatError(f"{where}: double data is {len(buf)} bytes, not a multiple of 8 (corrupt file?)")
        data = np.frombuffer(buf, dtype="<f8").astype(np.float32)
    else:
        # Not packed (or empty): read it through the full schema, which accepts both encodings.
        full = schema.BlobProto()
        full.ParseFromString(raw.SerializeToString())
        if len(full.data):
            data = np.asarray(full.data, dtype=np.float32)
        else:
            data = np.asarray(full.double_data, dtype=np.float64).astype(np.float32)
    count = int(np.prod(shape, dtype=np.int64))
    if data.size != count:
        raise ModelFormatError(
            f"{where} holds {data.size} values for shape {list(shape)} ({count} values); "
            "the file is truncated or corrupt")
    return Blob(shape, legacy, data)


def read_caffemodel(path: str | os.PathLike) -> dict[str, list[Blob]]:
    """Layer name -> its parameter blobs, for every layer of a .caffemodel that has blobs.

    As Caffe's CopyTrainedLayersFrom, layers are matched by name; a later layer of the same name wins.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None
    raw = schema.RawNet()
    try:
        raw.ParseFromString(data)
    except pb_message.DecodeError as e:
        if _looks_like_text(data):
            raise ModelFormatError(f"{path}: looks like a text prototxt, not a binary .caffemodel") from None
        raise ModelFormatError(f"{path}: not a readable .caffemodel ({len(data):,} bytes; truncated or "
                               "corrupt)") from None
    if not len(raw.layer) and not len(raw.layers):
        raise ModelFormatError(f"{path}: not a .caffemodel (no layers found)")
    out: dict[str, list[Blob]] = {}
    for lp in list(raw.layer) + list(raw.layers):
        if len(lp.blobs):
            out[lp.name] = [_blob_from_raw(b, f"{path}: layer {lp.name!r} blob {i}") for i, b in enumerate(lp.blobs)]
    return out


def _looks_like_text(data: bytes) -> bool:
    try:
        head = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(re.search(r"^\s*(name|layers?|input)\s*[:{]", head, re.M))
