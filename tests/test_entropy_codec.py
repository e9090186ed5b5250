"""The ans format: exact round trips on random and adversarial masks, sizes against
entropy bounds computed here, the per-line mask model on structured masks, the payload
fields, and corrupt or inconsistent payloads."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergebench import codecs as C
from mergebench import container as K
from mergebench.errors import CorruptArtifactError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _h2(p):
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _ct(mask, codes, bits, shape=None):
    mask = np.asarray(mask, dtype=bool)
    shape = tuple(shape or mask.shape)
    return C.CompressedTensor(shape, "ans", bits, mask.ravel(), np.asarray(codes, dtype=np.uint8), "bas",
                              {"v_neg": 1.0, "v_pos": 2.0, "scale": 1.0})


def _round_trip(ct):
    back = C.decode_tensors(C.encode_tensors({"w": ct}))["w"]
    assert back == ct
    assert torch.equal(back.to_dense(), ct.to_dense())
    return back


# --------------------------------------------------------------------------- round trips


@FAST
@given(st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple), st.floats(0.0, 1.0), st.integers(1, 8),
       st.sampled_from(["uniform", "skewed", "one-code"]), st.integers(0, 2**31))
def test_random_masks_and_codes_round_trip(shape, density, bits, codes_kind, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    k = int(mask.sum())
    if codes_kind == "uniform":
        codes = rng.integers(0, 1 << bits, k)
    elif codes_kind == "skewed":
        codes = np.minimum(rng.geometric(0.6, k) - 1, (1 << bits) - 1)
    else:
        codes = np.full(k, (1 << bits) - 1)
    _round_trip(_ct(mask, codes, bits))


@pytest.mark.parametrize("shape", [(1,), (7,), (64,), (9, 13), (16, 24), (3, 4, 5), (1, 50), (50, 1)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_adversarial_masks_round_trip(shape, bits):
    n = math.prod(shape)
    rng = np.random.default_rng(n * 10 + bits)
    masks = [np.zeros(n, bool), np.ones(n, bool)]
    for where in {0, n // 2, n - 1}:  # one kept entry, and all but one
        one = np.zeros(n, bool)
        one[where] = True
        masks += [one, ~one]
    for alpha in np.linspace(0.0, 1.0, 11):  # every alpha, exactly round(n (1 - alpha)) kept
        m = np.zeros(n, bool)
        m[rng.permutation(n)[:round(n * (1 - alpha))]] = True
        masks.append(m)
    for m in masks:
        codes = rng.integers(0, 1 << bits, int(m.sum()))
        _round_trip(_ct(m.reshape(shape), codes, bits))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)])
def test_empty_tensors_round_trip(shape):
    _round_trip(_ct(np.zeros(shape, bool), [], 4))


def test_sign_values_and_torch_input_round_trip():
    tau = torch.randn(33, 17)
    mask = tau.abs() > 1.0
    ct = C.tswitch_from_task_vector(tau, mask, fmt="ans")
    back = _round_trip(ct)
    beta = np.float32(ct.params["beta"])
    expected = np.where(mask.numpy(), np.where(tau.numpy() > 0, beta, -beta), 0).astype(np.float32)
    np.testing.assert_array_equal(back.to_numpy(), expected)


def test_encoding_is_deterministic():
    rng = np.random.default_rng(5)
    mask = rng.random((40, 64)) < rng.random((1, 64))
    codes = np.minimum(rng.geometric(0.3, int(mask.sum())) - 1, 15)
    assert C.encode_payload(_ct(mask, codes, 4))[0] == C.encode_payload(_ct(mask.copy(), codes.copy(), 4))[0]


# --------------------------------------------------------------------------- sizes against the bounds


@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_size_within_2_percent_of_the_iid_bound_on_bernoulli_masks(alpha, bits):
    """The bound of an i.i.d. Bernoulli mask with b-bit values: n H(1 - alpha) + K b, with the
    empirical keep rate of each trial; the mean measured size is at most 1.02 times it."""
    n, trials = 1 << 18, 3
    ratios = []
    for trial in range(trials):
        rng = np.random.default_rng(1000 * bits + trial)
        mask = rng.random(n) < 1 - alpha
        k = int(mask.sum())
        codes = rng.integers(0, 1 << bits, k)
        bound = n * _h2(k / n) + k * bits
        ratios.append(_ct(mask, codes, bits).payload_bits / bound)
    assert np.mean(ratios) <= 1.02
    assert np.mean(ratios) >= 0.99  # (a bound: no coder is far below it)


@pytest.mark.parametrize("shape", [(1 << 14, 1), (1 << 14, 1, 1), (1 << 11, 12), (12, 1 << 11), (1 << 14,)])
def test_lines_not_a_whole_number_of_bytes_cost_no_more_than_the_bound(shape):
    """A column (n, 1) or rows of 12 entries: the byte padding of each line must not be paid for."""
    rng = np.random.default_rng(21)
    mask = rng.random(shape) < 0.5
    n, k = mask.size, int(mask.sum())
    codes = rng.integers(0, 2, k)
    assert _ct(mask, codes, 1).payload_bits <= 1.02 * (n * _h2(k / n) + k)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
def test_skewed_values_are_coded_near_their_own_entropy(alpha):
    """Non-uniform 4-bit codes cost their empirical entropy, well below 4 bits each."""
    n = 1 << 18
    rng = np.random.default_rng(7)
    mask = rng.random(n) < 1 - alpha
    k = int(mask.sum())
    codes = np.minimum(rng.geometric(0.5, k) - 1, 15)
    p = np.bincount(codes, minlength=16) / k
    h_codes = -sum(q * math.log2(q) for q in p if q > 0)
    bound = n * _h2(k / n) + k * h_codes
    size = _ct(mask, codes, 4).payload_bits
    assert size <= 1.02 * bound
    assert size < n * _h2(k / n) + 4 * k - 0.5 * k * (4 - h_codes)  # below b bits a value by most of the gap


def test_column_structure_goes_below_the_iid_bound():
    """Columns with different keep rates: the per-column model beats the i.i.d. bound and
    stays within 2 % of the per-column entropy (plus its stored line buckets)."""
    rng = np.random.default_rng(11)
    rows, cols = 512, 768
    rates = rng.choice([0.002, 0.02, 0.1, 0.3], size=cols)
    mask = rng.random((rows, cols)) < rates
    codes = np.zeros(int(mask.sum()), dtype=np.uint8)  # one code: values cost ~nothing
    n, k = mask.size, int(mask.sum())
    iid = n * _h2(k / n)
    per_column = sum(rows * _h2(c / rows) for c in mask.sum(axis=0))
    data, nbits = C.encode_payload(_ct(mask, codes, 1))
    flags = data[1]
    assert flags & 1 == 1 and (flags >> 1) & 7 >= 2  # columns, at least 4 buckets
    assert nbits < 0.8 * iid
    assert nbits <= 1.02 * per_column + cols * ((flags >> 1) & 7) + 16 * (1 << ((flags >> 1) & 7)) + 256
    _round_trip(_ct(mask, codes, 1))


def test_row_structure_picks_rows_and_iid_masks_pick_one_bucket():
    rng = np.random.default_rng(12)
    rates = np.repeat([0.01, 0.4], 64)[:, None]
    rows_mask = rng.random((128, 256)) < rates
    data, _ = C.encode_payload(_ct(rows_mask, np.zeros(int(rows_mask.sum())), 1))
    assert data[1] & 1 == 0 and (data[1] >> 1) & 7 >= 1
    iid_mask = rng.random((128, 256)) < 0.1
    data, _ = C.encode_payload(_ct(iid_mask, np.zeros(int(iid_mask.sum())), 1))
    assert (data[1] >> 1) & 7 == 0


def test_payload_fields_by_hand():
    """Layout byte, flags, the u16 keep rate round(p * 65535), the value model (presence
    bitmap and u16 frequencies) and the word count, read here from the bytes."""
    rng = np.random.default_rng(3)
    mask = rng.random(5000) < 0.3
    k = int(mask.sum())
    codes = np.where(rng.random(k) < 0.75, 1, 2)  # two codes of 2 bits: coded, not raw
    data, nbits = C.encode_payload(_ct(mask, codes, 2))
    assert nbits == 8 * len(data)
    assert data[0] == 1 and data[1] == 0  # rows (a vector), one bucket, values coded
    (rate,) = struct.unpack_from("<H", data, 2)
    assert rate == round(k / 5000 * 65535)
    assert data[4] == 0b0110  # codes 1 and 2 present
    f1, f2 = struct.unpack_from("<HH", data, 5)
    assert f1 / f2 == pytest.approx(np.sum(codes == 1) / np.sum(codes == 2), rel=1e-3)
    (words,) = struct.unpack_from("<I", data, 9)
    assert len(data) == 13 + 4 * words


def test_bounds_by_hand():
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    codes = np.array([1, 0, 1])
    b = C.entropy_bounds(mask, codes, (3, 4), 1)
    assert b["mask_iid"] == pytest.approx(12 * _h2(3 / 12))
    assert b["mask_rows"] == pytest.approx(4 * _h2(1 / 4) + 4 * _h2(2 / 4))
    assert b["mask_columns"] == pytest.approx(3 * _h2(2 / 3) + 3 * _h2(1 / 3))
    # contexts (left, up): (0,0) holds 9 entries with 1 kept ((0,0)); (0,1) entries (1,0),(2,0),(1,1)...
    left = np.zeros_like(mask)
    left[:, 1:] = mask[:, :-1]
    up = np.zeros_like(mask)
    up[1:] = mask[:-1]
    expected = 0.0
    for ctx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        sel = (left == ctx[0]) & (up == ctx[1])
        if sel.any():
            expected += sel.sum() * _h2(mask[sel].mean())
    assert b["mask_context"] == pytest.approx(expected)
    assert b["values_iid"] == pytest.approx(3 * _h2(2 / 3))
    assert b["values_uniform"] == 3
    assert b["values_rows"] == pytest.approx(2 * _h2(1 / 2))  # row 0: one code; row 1: codes 0, 1


# --------------------------------------------------------------------------- corrupt payloads


def _with_payload(blob, payload):
    """The container of one ans entry with another payload, checksums made consistent."""
    header = K.parse_header(blob)
    header["tensors"][0].update(length=len(payload), nbits=8 * len(payload), crc32=zlib.crc32(payload))
    header["payload_bytes"] = len(payload)
    return K.pack_container(header, [payload])


@pytest.fixture()
def ans_blob():
    rng = np.random.default_rng(9)
    mask = rng.random((24, 40)) < rng.random((24, 1))
    codes = np.minimum(rng.geometric(0.4, int(mask.sum())) - 1, 7)
    ct = _ct(mask, codes, 3)
    return C.encode_tensors({"w": ct}), C.encode_payload(ct)[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p[:-1], "cut off|ANS|stream|bytes"),
    (lambda p: p + b"\0\0\0\0", "unexpected bytes"),
    (lambda p: b"\x07" + p[1:], "layout"),
    (lambda p: p[:1] + bytes([p[1] | 0x80]) + p[2:], "flags"),
    (lambda p: p[:1], "cut off"),
])
def test_inconsistent_payload_is_refused_with_the_tensor_named(ans_blob, mutate, message):
    blob, payload = ans_blob
    with pytest.raises(CorruptArtifactError, match=rf"tensor 'w'.*({message})"):
        C.decode_tensors(_with_payload(blob, mutate(payload)))


def test_every_byte_flip_of_an_ans_file_is_detected(ans_blob):
    blob, _ = ans_blob
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        with pytest.raises(CorruptArtifactError):
            C.decode_tensors(bytes(bad))


# --------------------------------------------------------------------------- in a method


def test_t_switch_in_the_ans_format_is_lossless(tmp_path):
    """The same switches in ans and in the T-Switch layout: equal decoded contents, equal predictions."""
    from mergebench.runner import make_method
    from tests._stub import finetuned_from, make_pool, tensors

    rng = np.random.default_rng(4)
    pre = tensors(w=rng.normal(size=(16, 24)).tolist(), b=rng.normal(size=8).tolist())
    taus = [tensors(w=rng.standard_t(3, size=(16, 24)).tolist(), b=rng.normal(size=8).tolist()) for _ in range(2)]
    with make_pool(tmp_path, pre, finetuned_from(pre, *taus)) as pool:
        plain = make_method("t-switch", {"alpha": 0.7, "format": "tswitch"}).merge(pool)
        coded = make_method("t-switch", {"alpha": 0.7, "format": "ans"}).merge(pool)
        assert list(plain.artifacts()) == list(coded.artifacts())
        for name, blob in coded.artifacts().items():
            a, b = C.decode_tensors(plain.artifacts()[name]), C.decode_tensors(blob)
            assert list(a) == list(b) and {t.fmt for t in b.values()} == {"ans"}
            for key in a:
                assert np.array_equal(a[key].to_numpy(), b[key].to_numpy())
        x = {"x": torch.ones(1)}
        for task in pool.tasks:
            assert torch.equal(plain.predict(task, x), coded.predict(task, x))
