"""The one checksummed container for everything a method stores or caches.

Switches, masks, factors, routers, query sets and training caches all go through
this format, so that every file a run keeps or reuses is checked the same way:
each part checksummed, read back without pickle, and any truncated, corrupt or
inconsistent input rejected with a :class:`CorruptArtifactError` that names the
file (or ``<bytes>``) and the tensor.

A container holds named entries of two kinds and one small JSON metadata object:

* ``codec``: a compressed task vector (:class:`~mergebench.codecs.CompressedTensor`),
  its payload laid out by :mod:`mergebench.codecs` (``tswitch``, ``indep``, ``sass``, ``ans``);
* ``dense``: a tensor of any of :data:`DENSE_DTYPES`, its elements in row-major
  order as little-endian bytes; ``bool`` is bit-packed, one bit per element in
  the codec bit order (:func:`~mergebench.codecs.pack_bits`, zero padding).

Layout (version 3)
------------------
::

    offset 0   8 bytes   magic b"MBCODEC\\0"
    offset 8   u32 LE    container version (3)
    offset 12  u32 LE    header length H in bytes
    offset 16  u32 LE    crc32 of the header bytes
    offset 20  H bytes   header: a zlib-compressed binary table
    offset 20+H          payloads, one per entry, back to back in entry order

The table (integers as unsigned LEB128 varints unless a width is given):
``payload_bytes``; the metadata as compact UTF-8 JSON (its length, then the bytes;
length 0 for ``{}``); the entry count; then per entry: name (length, UTF-8), kind
(u8: 0 dense, 1 codec), dtype (u8 index into :data:`_V3_DTYPES`, or 255 and a
length-prefixed name), ndim and the dimensions, payload length, payload crc32 (u32
LE); a codec entry adds format (u8 index into :data:`_V3_FORMATS`), bits (u8), quant
(u8: 0 sign, 1 bas), its parameters as f32 LE (sign: beta; bas: v_neg, v_pos, scale)
and the payload's bit length. Offsets follow from the lengths. A header costs a few
bytes per entry (a JSON header cost ~330), so it stays far below 1 % of a compressed
task vector's file even at 99 % sparsity.

Versions 1 and 2 (a UTF-8 JSON header ``{"version", "payload_bytes", "metadata",
"tensors"}`` whose entries also name ``offset``, and for codecs ``sparsity``,
``n_kept`` and ``group_size``; version 1: codec entries only, without ``kind`` or
metadata) are still read. The metadata object is covered by the header's crc32,
every payload by its own.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from mergebench.cache import write_bytes
from mergebench.codecs import CompressedTensor, decode_payload, encode_payload, pack_bits, unpack_bits
from mergebench.errors import CorruptArtifactError

__all__ = [
    "MAGIC",
    "CONTAINER_VERSION",
    "DENSE_DTYPES",
    "Entry",
    "ArtifactContents",
    "encode_tensors",
    "decode_tensors",
    "write_artifact",
    "read_artifact",
    "parse_header",
    "pack_container",
]

MAGIC = b"MBCODEC\x00"
CONTAINER_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_PREAMBLE = struct.Struct("<8sIII")  # magic, version, header length, header crc32

DENSE_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64)
}

Entry = Union[CompressedTensor, torch.Tensor]

# Version-3 codes: fixed for the format (new names are appended, never reordered).
_V3_KINDS = ("dense", "codec")
_V3_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64")
_V3_FORMATS = ("tswitch", "indep", "sass", "ans")
_V3_QUANTS = ("sign", "bas")
_V3_PARAMS = {"sign": ("beta",), "bas": ("v_neg", "v_pos", "scale")}
_V3_OTHER = 255


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ArtifactContents(dict):
    """The entries of one container (name -> CompressedTensor or dense torch.Tensor, in
    stored order), its ``metadata`` object and its ``source``. The accessors check what
    a reader expects, so a method's decoder reports a mismatch naming the file and tensor."""

    def __init__(self, source: str, metadata: dict[str, Any]):
        super().__init__()
        self.source = source
        self.metadata = metadata

    def error(self, message: str, name: str | None = None) -> CorruptArtifactError:
        where = self.source if name is None else f"{self.source}: tensor {name!r}"
        return CorruptArtifactError(f"{where}: {message}")

    def dense(self, name: str, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Dense entry ``name``, of ``dtype`` and ``shape`` when given."""
        entry = self.get(name)
        if entry is None:
            raise self.error("missing", name)
        if not isinstance(entry, torch.Tensor):
            raise self.error("is a compressed task vector, expected a dense tensor", name)
        if dtype is not None and entry.dtype != dtype:
            raise self.error(f"is {_dtype_name(entry.dtype)}, expected {_dtype_name(dtype)}", name)
        if shape is not None and tuple(entry.shape) != tuple(shape):
            raise self.error(f"has shape {list(entry.shape)}, expected {list(shape)}", name)
        return entry

    def compressed(self, name: str) -> CompressedTensor:
        """Codec entry ``name``."""
        entry = self.get(name)
        if entry is None:
            raise self.error("missing", name)
        if not isinstance(entry, CompressedTensor):
            raise self.error("is a dense tensor, expected a compressed task vector", name)
        return entry

    def field(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """Metadata value ``key``, of the JSON type ``kind`` (a bool is not a number)."""
        value = self.metadata.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(f"metadata {key!r} is {value!r}, expected {names}")
        return value

    def expect_content(self, content: str) -> None:
        """Refuse a container written for something else (metadata ``content``), e.g. one
        task's file in place of another's, or a router in place of a query set."""
        found = self.metadata.get("content")
        if found != content:
            raise self.error(f"holds {found!r}, expected {content!r}")


# --------------------------------------------------------------------------- dense entries


def _encode_dense(value: torch.Tensor | np.ndarray) -> tuple[dict[str, Any], Any]:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    name = _dtype_name(tensor.dtype)
    if name not in DENSE_DTYPES:
        raise TypeError(f"dtype {name} cannot be stored; storable: {', '.join(DENSE_DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if tensor.dtype == torch.bool:
        data: Any = pack_bits(flat.numpy())
    elif flat.numel() == 0:
        data = b""
    else:
        data = memoryview(flat.view(torch.uint8).numpy())  # no copy: joined straight into the container
    return {"kind": "dense", "shape": list(tensor.shape), "dtype": name}, data


def _decode_dense(payload: memoryview, shape: tuple[int, ...], dtype_name: str) -> torch.Tensor:
    """ValueError when the payload does not fit the declared shape and dtype."""
    dtype = DENSE_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"unknown dense dtype {dtype_name!r}")
    n = math.prod(shape)
    if dtype == torch.bool:
        if len(payload) != (n + 7) // 8:
            raise ValueError(f"{len(payload)} payload bytes for {n} bit-packed bools")
        if n % 8 and payload[-1] >> (n % 8):
            raise ValueError("non-zero padding bits")
        return torch.from_numpy(unpack_bits(payload, n).view(np.bool_)).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(payload) != n * itemsize:
        raise ValueError(f"{len(payload)} payload bytes for {n} {dtype_name} elements")
    if n == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()).view(dtype).reshape(shape)


# --------------------------------------------------------------------------- headers


def _put_varint(out: bytearray, value: int) -> None:
    value = int(value)
    if value < 0:
        raise ValueError(f"cannot store the negative integer {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_code(out: bytearray, name: str, names: tuple[str, ...]) -> None:
    if name in names:
        out.append(names.index(name))
    else:
        raw = str(name).encode("utf-8")
        out.append(_V3_OTHER)
        _put_varint(out, len(raw))
        out += raw


def _pack_v3(header: Mapping[str, Any]) -> bytes:
    out = bytearray()
    _put_varint(out, header["payload_bytes"])
    meta = json.dumps(header["metadata"], separators=(",", ":"), allow_nan=False).encode("utf-8") if header["metadata"] else b""
    _put_varint(out, len(meta))
    out += meta
    _put_varint(out, len(header["tensors"]))
    for e in header["tensors"]:
        name = e["name"].encode("utf-8")
        _put_varint(out, len(name))
        out += name
        out.append(_V3_KINDS.index(e["kind"]))
        _put_code(out, e["dtype"], _V3_DTYPES)
        _put_varint(out, len(e["shape"]))
        for d in e["shape"]:
            _put_varint(out, d)
        _put_varint(out, e["length"])
        out += struct.pack("<I", e["crc32"])
        if e["kind"] == "codec":
            out += bytes([_V3_FORMATS.index(e["format"]), e["bits"], _V3_QUANTS.index(e["quant"])])
            out += struct.pack(f"<{len(_V3_PARAMS[e['quant']])}f", *(e["params"][k] for k in _V3_PARAMS[e["quant"]]))
            _put_varint(out, e["nbits"])
    return zlib.compress(bytes(out), 9)


class _Reader:
    """A cursor over a version-3 header table; ValueError when it runs out."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("the header table ends early")
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("a header integer is too long")

    def code(self, names: tuple[str, ...], what: str) -> str:
        code = self.take(1)[0]
        if code == _V3_OTHER:
            return self.take(self.varint()).decode("utf-8")
        if code >= len(names):
            raise ValueError(f"unknown {what} code {code}")
        return names[code]


def _parse_v3(header_bytes: bytes) -> dict[str, Any]:
    try:
        table = zlib.decompress(header_bytes)
    except zlib.error as exc:
        raise ValueError(f"the header table does not decompress ({exc})") from None
    r = _Reader(table)
    total = r.varint()
    meta_len = r.varint()
    metadata = json.loads(r.take(meta_len).decode("utf-8")) if meta_len else {}
    entries, offset = [], 0
    for _ in range(r.varint()):
        e: dict[str, Any] = {"name": r.take(r.varint()).decode("utf-8")}
        e["kind"] = r.code(_V3_KINDS, "entry kind")
        e["dtype"] = r.code(_V3_DTYPES, "dtype")
        e["shape"] = [r.varint() for _ in range(r.varint())]
        e["offset"], e["length"] = offset, r.varint()
        e["crc32"] = struct.unpack("<I", r.take(4))[0]
        offset += e["length"]
        if e["kind"] == "codec":
            e["format"] = r.code(_V3_FORMATS, "codec format")
            e["bits"] = r.take(1)[0]
            e["quant"] = r.code(_V3_QUANTS, "value quantisation")
            names = _V3_PARAMS[e["quant"]]
            e["params"] = dict(zip(names, (float(v) for v in struct.unpack(f"<{len(names)}f", r.take(4 * len(names))))))
            e["nbits"] = r.varint()
        entries.append(e)
    if r.pos != len(table):
        raise ValueError(f"{len(table) - r.pos} unexpected bytes after the header table")
    return {"version": 3, "payload_bytes": total, "metadata": metadata, "tensors": entries}


def pack_container(header: Mapping[str, Any], payloads: Sequence[Any], version: int = CONTAINER_VERSION) -> bytes:
    """A container from a header (the dict :func:`parse_header` returns) and its payloads:
    version 3 as the binary table, versions 1 and 2 as their JSON (for tests and tools that
    need an older layout; the writer uses version 3)."""
    if version >= 3:
        header_bytes = _pack_v3(header)
    else:
        header_bytes = json.dumps({**header, "version": version}, separators=(",", ":"),
                                  allow_nan=False).encode("utf-8")
    return b"".join([_PREAMBLE.pack(MAGIC, version, len(header_bytes), zlib.crc32(header_bytes)), header_bytes,
                     *payloads])


def parse_header(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> dict[str, Any]:
    """The header of a container of any readable version as one dict (``version``,
    ``payload_bytes``, ``metadata``, ``tensors``: entries with their offsets); errors as
    :func:`decode_tensors`."""
    return _read_header(bytes(data), str(source))[0]


def _read_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """(header, offset of the first payload); CorruptArtifactError naming ``where``."""
    if len(data) < _PREAMBLE.size:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise CorruptArtifactError(f"{where}: not a mergebench container (bad magic)")
        raise CorruptArtifactError(f"{where}: truncated: {len(data)} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
    magic, version, hlen, hcrc = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise CorruptArtifactError(f"{where}: not a mergebench container (bad magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise CorruptArtifactError(f"{where}: unsupported container version {version} "
                                   f"(this reader: {', '.join(map(str, READABLE_VERSIONS))})")
    hend = _PREAMBLE.size + hlen
    if len(data) < hend:
        raise CorruptArtifactError(f"{where}: truncated: {len(data)} bytes, the header alone needs {hend}")
    header_bytes = data[_PREAMBLE.size:hend]
    if zlib.crc32(header_bytes) != hcrc:
        raise CorruptArtifactError(f"{where}: header checksum mismatch (corrupt header)")
    try:
        if version >= 3:
            header = _parse_v3(header_bytes)
        else:
            header = json.loads(header_bytes.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            if version == 1:
                header["metadata"] = {}
        if not isinstance(header["tensors"], list) or not isinstance(header["metadata"], dict):
            raise ValueError("bad header fields")
        header["payload_bytes"] = int(header["payload_bytes"])
        if header.get("version") != version:
            raise ValueError(f"the header says version {header.get('version')!r}, the preamble {version}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{where}: malformed header: {exc}") from None
    return header, hend


# --------------------------------------------------------------------------- the container


def encode_tensors(tensors: Mapping[str, Entry | np.ndarray], metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialise named entries (compressed task vectors, dense tensors) and a JSON metadata
    object into one container (see the module docstring)."""
    metadata = dict(metadata or {})
    try:
        if not all(isinstance(key, str) for key in metadata):
            raise TypeError("keys must be strings")
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"container metadata must be a JSON object with finite numbers: {exc}") from None
    entries: list[dict[str, Any]] = []
    payloads: list[Any] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if isinstance(value, CompressedTensor):
            data, nbits = encode_payload(value)
            entry = {"kind": "codec", "shape": list(value.shape), "dtype": value.dtype, "format": value.fmt,
                     "bits": value.bits, "quant": value.quant, "params": value.params, "nbits": nbits}
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            try:
                entry, data = _encode_dense(value)
            except TypeError as exc:
                raise TypeError(f"tensor {name!r}: {exc}") from None
        else:
            raise TypeError(f"tensor {name!r}: expected a CompressedTensor or a dense tensor, got {type(value).__name__}")
        entries.append({"name": name, **entry, "offset": offset, "length": len(data), "crc32": zlib.crc32(data)})
        payloads.append(data)
        offset += len(data)
    header = {"version": CONTAINER_VERSION, "payload_bytes": offset, "metadata": metadata, "tensors": entries}
    return pack_container(header, payloads)


def decode_tensors(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> ArtifactContents:
    """Inverse of :func:`encode_tensors`; ``source`` names the file in error messages."""
    data = bytes(data)
    where = str(source)
    header, hend = _read_header(data, where)
    version, entries, total, metadata = header["version"], header["tensors"], header["payload_bytes"], header["metadata"]
    body = memoryview(data)[hend:]
    if len(body) < total:
        cut = next((e.get("name", "?") for e in entries if _ends_after(e, len(body))), "?")
        raise CorruptArtifactError(f"{where}: truncated: {len(data)} bytes, header declares "
                                   f"{hend + total}; payload of tensor {cut!r} is cut off")
    if len(body) > total:
        raise CorruptArtifactError(f"{where}: {len(body) - total} unexpected trailing bytes after the payloads")
    out = ArtifactContents(where, metadata)
    expected_offset = 0
    for i, e in enumerate(entries):
        name = e.get("name") if isinstance(e, dict) else None
        label = f"tensor {name!r}" if isinstance(name, str) else f"tensor #{i}"
        try:
            if not isinstance(name, str):
                raise ValueError("missing name")
            if name in out:
                raise ValueError("duplicate tensor name")
            kind = e["kind"] if version >= 2 else "codec"
            off, length = int(e["offset"]), int(e["length"])
            if off != expected_offset or length < 0 or off + length > total:
                raise ValueError(f"payload range [{off}, {off + length}) does not follow the previous payload "
                                 f"(at {expected_offset}) inside the {total} payload bytes")
            expected_offset = off + length
            payload = body[off:off + length]
            if zlib.crc32(payload) != int(e["crc32"]):
                raise ValueError("payload checksum mismatch (corrupt payload)")
            shape = tuple(int(s) for s in e["shape"])
            if any(s < 0 for s in shape):
                raise ValueError(f"negative dimension in shape {list(shape)}")
            if kind == "dense":
                out[name] = _decode_dense(payload, shape, str(e["dtype"]))
            elif kind == "codec":
                out[name] = _decode_codec(payload, shape, e)
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except CorruptArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise CorruptArtifactError(f"{where}: {label}: {exc}") from None
    if expected_offset != total:
        raise CorruptArtifactError(f"{where}: the payloads cover {expected_offset} of the {total} declared bytes")
    return out


def _ends_after(entry: Any, available: int) -> bool:
    """Whether an entry's payload ends past the ``available`` payload bytes."""
    try:
        return int(entry["offset"]) + int(entry["length"]) > available
    except (KeyError, TypeError, ValueError):
        return False


def _decode_codec(payload: memoryview, shape: tuple[int, ...], e: Mapping[str, Any]) -> CompressedTensor:
    ct = decode_payload(payload, int(e["nbits"]), shape=shape, fmt=e["format"], bits=int(e["bits"]),
                        quant=e["quant"], params={k: float(v) for k, v in e["params"].items()}, dtype=str(e["dtype"]))
    if "n_kept" in e and ct.n_kept != int(e["n_kept"]):  # versions 1 and 2 also state these
        raise ValueError(f"{ct.n_kept} kept entries, header says {e['n_kept']}")
    if "n_kept" in e and ct.group_size != e.get("group_size"):
        raise ValueError(f"group size {ct.group_size}, header says {e.get('group_size')}")
    return ct


def write_artifact(path: str | os.PathLike, tensors: Mapping[str, Entry | np.ndarray],
                   metadata: Mapping[str, Any] | None = None) -> int:
    """Write a container atomically (temporary file, then rename); returns its size in bytes."""
    data = encode_tensors(tensors, metadata)
    write_bytes(Path(path), data)
    return len(data)


def read_artifact(path: str | os.PathLike) -> ArtifactContents:
    """Read a container written by :func:`write_artifact`; errors name the file."""
    path = Path(path)
    return decode_tensors(path.read_bytes(), source=str(path))
