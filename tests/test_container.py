"""The one checksummed container: exact round trips of compressed and dense entries
of every dtype and of the metadata, version-1 and version-2 files, the compact
version-3 header, the readers' checks, and corrupt, truncated or inconsistent input
(every part, every byte)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergebench import codecs as C
from mergebench import container as K
from mergebench.errors import CorruptArtifactError, MergebenchError

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
V1_FIELDS = ("name", "shape", "dtype", "format", "bits", "quant", "params", "sparsity", "n_kept", "group_size",
             "offset", "length", "nbits", "crc32")  # a version-1 entry, in the order the version-1 writer used


def _tau(shape, seed):
    return np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)


def _mask(shape, density, seed):
    return np.random.default_rng(seed + 1).random(shape) < density


def _dense(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _artifact():
    """Codec entries of every format, dense entries (fp32, bit-packed bool, int64) and metadata."""
    return {
        "a": C.tswitch_from_task_vector(_tau((6, 5), 1), _mask((6, 5), 0.4, 1)),
        "b": C.quantized_from_task_vector(_tau((40,), 2), _mask((40,), 0.2, 2), 4, "sass"),
        "f": _dense((3, 4), torch.float32, 3),
        "m": _dense((13,), torch.bool, 4),
        "c": C.quantized_from_task_vector(_tau((3, 3), 3), _mask((3, 3), 0.6, 3), 2, "indep"),
        "i": _dense((5,), torch.int64, 5),
        "e": C.quantized_from_task_vector(_tau((8, 9), 6), _mask((8, 9), 0.3, 6), 3, "ans"),
    }


METADATA = {"content": "test/artifact", "task": "mnist", "lambda": 0.3125, "sizes": [1, 2], "nested": {"ok": True}}


def _header(data):
    _, _, hlen, _ = struct.unpack_from("<8sIII", data)
    return 20 + hlen, K.parse_header(data)


def _with_header(data, header, version=2):
    """The same payloads under another header, with a consistent header checksum; a JSON
    header (version 1 or 2) holds any value, a version-3 table only representable ones."""
    start, _ = _header(data)
    if version >= 3:
        hb = K.pack_container(header, [], 3)[20:]
    else:
        hb = json.dumps({**header, "version": header.get("version", version)} if "version" in header else header).encode()
    return struct.pack("<8sIII", K.MAGIC, version, len(hb), zlib.crc32(hb)) + hb + data[start:]


def _as_version_1(data, items):
    """A codec-only container as the version-1 writer laid it out (no kinds, no metadata)."""
    start, header = _header(data)
    entries = []
    for e in header["tensors"]:
        ct = items[e["name"]]
        e = {**e, "sparsity": ct.sparsity, "n_kept": ct.n_kept, "group_size": ct.group_size}
        entries.append({key: e[key] for key in V1_FIELDS})
    hb = json.dumps({"version": 1, "payload_bytes": header["payload_bytes"], "tensors": entries},
                    separators=(",", ":")).encode()
    return struct.pack("<8sIII", K.MAGIC, 1, len(hb), zlib.crc32(hb)) + hb + data[start:]


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


# --------------------------------------------------------------------------- round trips


@FAST
@given(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), st.sampled_from(list(K.DENSE_DTYPES.values())),
       st.integers(0, 2**31))
def test_dense_round_trip_every_dtype_and_shape(shape, dtype, seed):
    tensor = _dense(shape, dtype, seed)
    back = K.decode_tensors(K.encode_tensors({"t": tensor}))["t"]
    assert _equal(back, tensor)


def test_mixed_entries_and_metadata_round_trip_in_order(tmp_path):
    items = _artifact()
    path = tmp_path / "sub" / "mixed.mbc"
    size = K.write_artifact(path, items, METADATA)
    assert path.stat().st_size == size and [p.name for p in path.parent.iterdir()] == ["mixed.mbc"]
    back = K.read_artifact(path)
    assert list(back) == list(items) and all(_equal(back[k], items[k]) for k in items)
    assert back.metadata == METADATA and back.source == str(path)


def test_numpy_arrays_and_non_contiguous_tensors_are_stored_as_their_values():
    rows = torch.arange(12, dtype=torch.float32).view(3, 4).T  # a transposed view
    back = K.decode_tensors(K.encode_tensors({"n": np.arange(6, dtype=np.int16).reshape(2, 3), "t": rows}))
    assert _equal(back["n"], torch.arange(6, dtype=torch.int16).view(2, 3))
    assert _equal(back["t"], rows.contiguous())


def test_bool_entries_are_bit_packed():
    mask = _dense((1000,), torch.bool, 0)
    data = K.encode_tensors({"m": mask})
    _, header = _header(data)
    assert header["payload_bytes"] == 125 and header["tensors"][0]["length"] == 125
    assert data[-125:] == C.pack_bits(mask.numpy())  # the codec bit order: LSB first


def test_version_1_files_stay_readable():
    items = {k: v for k, v in _artifact().items() if isinstance(v, C.CompressedTensor) and v.fmt != "ans"}
    old = _as_version_1(K.encode_tensors(items), items)
    assert struct.unpack_from("<I", old, 8) == (1,)
    back = K.decode_tensors(old)
    assert back.metadata == {} and list(back) == list(items) and all(back[k] == items[k] for k in items)


def test_the_codec_module_names_the_same_container():
    assert C.encode_tensors is K.encode_tensors and C.read_artifact is K.read_artifact and C.MAGIC == K.MAGIC
    assert K.CONTAINER_VERSION == 3


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_version_2_file_written_by_the_old_writer_still_decodes():
    """tests/fixtures/container_v2.mbc was written by the version-2 (JSON header) writer
    before the binary header existed; its contents were recorded beside it as JSON."""
    blob = (FIXTURES / "container_v2.mbc").read_bytes()
    expected = json.loads((FIXTURES / "container_v2.json").read_text())
    assert struct.unpack_from("<I", blob, 8) == (2,)
    assert json.loads(blob[20:20 + struct.unpack_from("<I", blob, 12)[0]])["version"] == 2
    back = K.decode_tensors(blob, source="container_v2.mbc")
    assert back.metadata == expected["metadata"] and list(back) == list(expected["entries"])
    for name, want in expected["entries"].items():
        got = back[name]
        if want["kind"] == "codec":
            assert isinstance(got, C.CompressedTensor)
            assert (got.fmt, got.bits, got.quant, list(got.shape)) == (want["format"], want["bits"], want["quant"],
                                                                        want["shape"])
            assert got.params == pytest.approx(want["params"], rel=0, abs=0)
            assert np.flatnonzero(got.mask).tolist() == want["mask"] and got.codes.tolist() == want["codes"]
            assert got.to_numpy().ravel().tolist() == want["dense"]
        else:
            assert str(got.dtype).removeprefix("torch.") == want["dtype"] and list(got.shape) == want["shape"]
            values = got.ravel().tolist() if got.dtype == torch.int64 else got.float().ravel().tolist()
            assert values == want["values"]
    # and it re-encodes, in the current layout, to the same contents
    again = K.decode_tensors(K.encode_tensors(dict(back), back.metadata))
    assert all(_equal(again[k], back[k]) for k in back)


# a ViT-B/32 encoder layer (CLIP vision tower names and shapes)
VIT_LAYER = {f"vision_model.encoder.layers.0.{name}": shape for name, shape in [
    *((f"self_attn.{p}_proj.{w}", (768, 768) if w == "weight" else (768,)) for p in "kvqo" for w in ("weight", "bias")),
    ("layer_norm1.weight", (768,)), ("layer_norm1.bias", (768,)),
    ("mlp.fc1.weight", (3072, 768)), ("mlp.fc1.bias", (3072,)),
    ("mlp.fc2.weight", (768, 3072)), ("mlp.fc2.bias", (768,)),
    ("layer_norm2.weight", (768,)), ("layer_norm2.bias", (768,)),
]}


@pytest.mark.parametrize("fmt, bits", [("tswitch", 1), ("sass", 1), ("sass", 4), ("indep", 2), ("ans", 1), ("ans", 8)])
def test_header_is_at_most_1_percent_of_a_vit_b32_file_at_99_percent_sparsity(fmt, bits):
    rng = np.random.default_rng(0)
    items = {}
    for name, shape in VIT_LAYER.items():
        tau = rng.standard_t(3, size=shape).astype(np.float32)
        mask = np.abs(tau) > np.quantile(np.abs(tau), 0.99)
        items[name] = (C.tswitch_from_task_vector(tau, mask, fmt) if bits == 1
                       else C.quantized_from_task_vector(tau, mask, bits, fmt))
    blob = K.encode_tensors(items, {"content": "t-switch/switches"})
    header_bytes = 20 + struct.unpack_from("<I", blob, 12)[0]
    payload_bytes = sum(len(C.encode_payload(ct)[0]) for ct in items.values())
    assert len(blob) == header_bytes + payload_bytes
    assert header_bytes <= 0.01 * len(blob)


# --------------------------------------------------------------------------- what a writer may not store


def test_unstorable_entries_and_metadata_are_refused_when_written():
    with pytest.raises(TypeError, match="tensor 'z'.*complex64"):
        K.encode_tensors({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="tensor 'x'.*list"):
        K.encode_tensors({"x": [1.0]})
    with pytest.raises(ValueError, match="metadata.*finite"):
        K.encode_tensors({}, {"loss": float("nan")})
    with pytest.raises(ValueError, match="metadata"):
        K.encode_tensors({}, {1: "a"})


# --------------------------------------------------------------------------- the readers' checks


def test_accessors_name_the_file_and_tensor_on_a_mismatch():
    contents = K.decode_tensors(K.encode_tensors(_artifact(), METADATA), source="x.mbc")
    assert torch.equal(contents.dense("f", torch.float32, (3, 4)), _artifact()["f"])
    assert contents.compressed("a") == _artifact()["a"]
    assert contents.field("lambda", float) == 0.3125
    contents.expect_content("test/artifact")
    cases = [
        (lambda: contents.dense("f", torch.float64), r"x\.mbc: tensor 'f': is float32, expected float64"),
        (lambda: contents.dense("f", shape=(4, 3)), r"x\.mbc: tensor 'f': has shape \[3, 4\], expected \[4, 3\]"),
        (lambda: contents.dense("nope"), r"x\.mbc: tensor 'nope': missing"),
        (lambda: contents.dense("a"), r"x\.mbc: tensor 'a': is a compressed task vector"),
        (lambda: contents.compressed("m"), r"x\.mbc: tensor 'm': is a dense tensor"),
        (lambda: contents.field("task", float), r"x\.mbc: metadata 'task' is 'mnist', expected float"),
        (lambda: contents.field("nested", int), r"x\.mbc: metadata 'nested'"),
        (lambda: contents.expect_content("other"), r"x\.mbc: holds 'test/artifact', expected 'other'"),
    ]
    for call, message in cases:
        with pytest.raises(CorruptArtifactError, match=message):
            call()


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("name", ["b", "f", "m", "i"])
def test_flipped_payload_byte_names_the_tensor(tmp_path, name):
    path = tmp_path / "tv.mbc"
    K.write_artifact(path, _artifact(), METADATA)
    data = bytearray(path.read_bytes())
    start, header = _header(bytes(data))
    entry = next(e for e in header["tensors"] if e["name"] == name)
    data[start + entry["offset"] + entry["length"] // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=rf"tv\.mbc: tensor '{name}': payload checksum mismatch") as info:
        K.read_artifact(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MergebenchError)


def test_flipped_metadata_byte_is_a_header_checksum_mismatch(tmp_path):
    path = tmp_path / "tv.mbc"
    K.write_artifact(path, _artifact(), METADATA)
    data = bytearray(path.read_bytes())
    hlen = struct.unpack_from("<I", data, 12)[0]
    data[20 + hlen // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"tv\.mbc: header checksum mismatch"):
        K.read_artifact(path)


def test_truncated_file_names_file_and_says_truncated(tmp_path):
    path = tmp_path / "tv.mbc"
    K.write_artifact(path, _artifact(), METADATA)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 30, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptArtifactError, match=r"tv\.mbc.*truncated"):
            K.read_artifact(path)
    path.write_bytes(data[:-1])
    with pytest.raises(CorruptArtifactError, match=r"payload of tensor 'e' is cut off"):  # the last payload
        K.read_artifact(path)


def test_wrong_magic_version_and_trailing_bytes(tmp_path):
    data = K.encode_tensors(_artifact(), METADATA)
    path = tmp_path / "x.bin"
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CorruptArtifactError, match=r"x\.bin.*magic"):
        K.read_artifact(path)
    with pytest.raises(CorruptArtifactError, match="unsupported container version 99"):
        K.decode_tensors(data[:8] + struct.pack("<I", 99) + data[12:])
    with pytest.raises(CorruptArtifactError, match="trailing"):
        K.decode_tensors(data + b"\x00")
    with pytest.raises(CorruptArtifactError, match="header"):
        K.decode_tensors(data[:30] + bytes([data[30] ^ 1]) + data[31:])


INCONSISTENT = [
    ("c", "shape", [3, 4], "indep payload"),  # a codec payload that no longer fits its shape
    ("e", "shape", [9, 8], "ans|padding|stream"),
    ("f", "shape", [4, 4], "48 payload bytes for 16 float32 elements"),
    ("f", "dtype", "float64", "48 payload bytes for 12 float64 elements"),
    ("f", "dtype", "object", "unknown dense dtype 'object'"),
    ("m", "shape", [17], "2 payload bytes for 17 bit-packed bools"),
    ("m", "shape", [9], "non-zero padding bits"),
    ("a", "name", "b", "duplicate tensor name"),
    ("b", "bits", 5, "SASS stream length"),
]
JSON_ONLY = [  # not representable in a version-3 table (kinds are codes, offsets follow from lengths)
    ("i", "kind", "pickle", "unknown entry kind 'pickle'"),
    ("i", "offset", 0, "does not follow the previous payload"),
]


@pytest.mark.parametrize("version, name, field, value, message",
                         [(3, *case) for case in INCONSISTENT] + [(2, *case) for case in INCONSISTENT + JSON_ONLY])
def test_consistent_checksums_but_inconsistent_header_names_the_tensor(version, name, field, value, message):
    data = K.encode_tensors(_artifact(), METADATA)
    _, header = _header(data)
    header["version"] = version
    for e in header["tensors"]:
        if e["name"] == name:
            e[field] = value
            if version == 2 and e["kind"] == "codec":
                ct = _artifact()[name]
                e.update(sparsity=ct.sparsity, n_kept=ct.n_kept, group_size=ct.group_size)
    label = "b" if field == "name" else name
    with pytest.raises(CorruptArtifactError, match=rf"<bytes>: tensor '{label}': .*({message})"):
        K.decode_tensors(_with_header(data, header, version))


def test_a_version_3_table_that_does_not_parse_is_malformed():
    data = K.encode_tensors(_artifact(), METADATA)
    start, header = _header(data)
    table = zlib.decompress(data[20:start])
    for bad in (zlib.compress(table[:-3]), zlib.compress(table + b"\0"), b"not zlib",
                zlib.compress(table.replace(bytes([len("a")]) + b"a\x01", bytes([len("a")]) + b"a\x07", 1))):
        blob = struct.pack("<8sIII", K.MAGIC, 3, len(bad), zlib.crc32(bad)) + bad + data[start:]
        with pytest.raises(CorruptArtifactError, match="<bytes>: malformed header"):
            K.decode_tensors(blob)


def test_header_that_contradicts_its_version_or_lacks_metadata_is_malformed():
    data = K.encode_tensors(_artifact(), METADATA)
    _, header = _header(data)
    header["version"] = 2
    with pytest.raises(CorruptArtifactError, match="malformed header"):
        K.decode_tensors(_with_header(data, header, version=1))
    del header["metadata"]
    with pytest.raises(CorruptArtifactError, match="malformed header"):
        K.decode_tensors(_with_header(data, header))


@FAST
@given(st.data())
def test_any_single_byte_flip_or_cut_is_detected(data):
    blob = K.encode_tensors(_artifact(), METADATA)
    pos = data.draw(st.integers(0, len(blob) - 1))
    delta = data.draw(st.integers(1, 255))
    bad = bytearray(blob)
    bad[pos] ^= delta
    with pytest.raises(CorruptArtifactError):
        K.decode_tensors(bytes(bad))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CorruptArtifactError):
        K.decode_tensors(blob[:cut])


def test_every_single_bit_flip_is_detected():
    blob = K.encode_tensors({"f": _dense((2,), torch.float32, 0), "m": _dense((11,), torch.bool, 1)}, {"k": 1})
    for pos in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptArtifactError, match="<bytes>"):
                K.decode_tensors(bytes(bad))
