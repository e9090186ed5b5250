"""The codecs' compiled kernels (numba, the `fast` extra) against the numpy path, loop-by-loop
reference streams written here, and constriction's ANS coder: the same bytes, tensors and
errors on random inputs and edge cases (empty, one element, nothing / everything kept,
alpha 0.99, lengths that are not a multiple of 8).

Each test runs three ways: the numpy path ("numpy"), the kernels as installed ("kernels":
compiled with numba, plain Python without it) and, where numba is installed, the kernels'
own Python source ("python", what runs where numba is absent)."""
from __future__ import annotations

import types

import constriction
import numpy as np
import pytest

from mergebench import _codec_kernels as K
from mergebench import codecs as C

PATHS = ["numpy", "kernels"] + (["python"] if K.HAVE_NUMBA else [])


def _python_kernels():
    return types.SimpleNamespace(**{name: getattr(value, "py_func", value) for name, value in vars(K).items()})


def _use(monkeypatch, path):
    kern = {"numpy": None, "kernels": K, "python": _python_kernels() if path == "python" else None}[path]
    monkeypatch.setattr(C, "_kernels", lambda: kern)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    _use(monkeypatch, request.param)
    return request.param


# --------------------------------------------------------------------------- references


def _pack(bits):
    """A list of 0/1 into bytes, stream bit i = bit i % 8 of byte i // 8 (the codecs' order)."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        out[i // 8] |= int(bit) << (i % 8)
    return bytes(out)


def _field(value, width):
    return [(int(value) >> j) & 1 for j in range(width)]


def _reference_payload(mask, codes, fmt, bits, n):
    """The tswitch / indep / sass streams of the module docstring, one bit at a time."""
    mask = [bool(v) for v in mask]
    codes = [int(v) for v in codes]
    if fmt == "tswitch":
        return _pack([int(m) for m in mask] + codes)
    if fmt == "indep":
        full, it = [], iter(codes)
        for m in mask:
            full += _field(next(it) if m else 0, bits)
        return _pack([int(m) for m in mask] + full)
    k = len(codes)
    c = C.choose_group_size(n, 1.0 - k / n if n else 1.0)
    ib = (c - 1).bit_length()
    stream = _field(n // c, 27) + _field(c - 1, 8)
    stream += [int(any(mask[g * c:(g + 1) * c])) for g in range(n // c)]
    kept = [i for i in range(n) if mask[i]]
    for j, i in enumerate(kept):
        last = j == k - 1 or kept[j + 1] // c != i // c
        stream += _field(i % c, ib) + _field(codes[j], bits) + [int(last)]
    return _pack(stream)


def _case(n, density, seed, shape=None):
    rng = np.random.default_rng(seed)
    tau = (rng.standard_t(3, size=n) * 1e-3).astype(np.float32)
    tau[::11] = 0.0
    if density == "none":
        mask = np.zeros(n, dtype=bool)
    elif density == "all":
        mask = np.ones(n, dtype=bool)
    else:
        mask = rng.random(n) < density
    shape = shape or (n,)
    return tau.reshape(shape), mask.reshape(shape)


CASES = [  # (n, density, shape): empty, one element, odd lengths, nothing / everything kept, sparse
    (0, 0.5, None), (1, "all", None), (1, "none", None), (13, 0.5, None), (61, 0.3, (61, 1)),
    (200, "none", (8, 25)), (203, "all", (7, 29)), (1001, 0.5, (7, 143)), (1000, 0.01, (40, 25)),
    (999, 0.2, (27, 37)), (1536, 0.3, (24, 64)), (3000, 0.1, (30, 100)),
]
FORMATS = [("tswitch", 1, "sign"), ("indep", 1, "sign"), ("indep", 2, "bas"), ("indep", 3, "bas"),
           ("indep", 8, "bas"), ("sass", 1, "sign"), ("sass", 2, "bas"), ("sass", 4, "bas"),
           ("sass", 5, "bas"), ("sass", 8, "bas"), ("ans", 1, "sign"), ("ans", 2, "bas"),
           ("ans", 3, "bas"), ("ans", 4, "bas"), ("ans", 8, "bas")]


def _build(tau, mask, fmt, bits, quant):
    if quant == "sign":
        return C.tswitch_from_task_vector(tau, mask, fmt=fmt)
    return C.quantized_from_task_vector(tau, mask, bits, fmt=fmt)


# --------------------------------------------------------------------------- every format


@pytest.mark.parametrize("fmt,bits,quant", FORMATS)
def test_every_path_writes_the_reference_bytes_and_decodes_them(path, monkeypatch, fmt, bits, quant):
    for n, density, shape in CASES:
        tau, mask = _case(n, density, seed=n + bits, shape=shape)
        ct = _build(tau, mask, fmt, bits, quant)
        data, nbits = C.encode_payload(ct)
        # the numpy path's bytes (and, for tswitch / indep / sass, the loop reference's)
        _use(monkeypatch, "numpy")
        ref_ct = _build(tau, mask, fmt, bits, quant)
        ref_data, ref_bits = C.encode_payload(ref_ct)
        assert (data, nbits) == (ref_data, ref_bits), (fmt, bits, n, density)
        assert np.array_equal(ct.codes, ref_ct.codes) and ct.params == ref_ct.params
        if fmt != "ans":
            assert data == _reference_payload(ct.mask, ct.codes, fmt, bits, ct.n), (fmt, bits, n, density)
        expected = np.zeros(ct.n, dtype=np.float32)
        kept = np.flatnonzero(ct.mask)
        for j, i in enumerate(kept):  # dense values, one at a time
            code = int(ct.codes[j])
            if quant == "sign":
                expected[i] = ct.params["beta"] if code else -ct.params["beta"]
            else:
                expected[i] = np.float32(-ct.params["v_neg"] + (code + 0.5) * ct.bas_params.step)
        _use(monkeypatch, path)
        back = C.decode_payload(data, nbits, shape=ct.shape, fmt=fmt, bits=bits, quant=quant, params=ct.params)
        assert back == ct
        dense = back.to_numpy()
        assert dense.dtype == np.float32 and dense.shape == ct.shape
        assert np.array_equal(dense.ravel().view(np.uint32), expected.view(np.uint32)), (fmt, bits, n, density)


@pytest.mark.parametrize("fmt,bits,quant", [("tswitch", 1, "sign"), ("sass", 4, "bas"), ("ans", 8, "bas"),
                                            ("ans", 4, "bas"), ("indep", 2, "bas")])
@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.9, 0.99])
def test_magnitude_masked_matrix_at_the_benchmark_sparsities(path, monkeypatch, fmt, bits, quant, alpha):
    rng = np.random.default_rng(int(alpha * 100) + bits)
    tau = (rng.standard_t(3, size=(48, 160)) * 1e-3).astype(np.float32)
    mask = np.abs(tau) >= np.quantile(np.abs(tau), alpha)
    ct = _build(tau, mask, fmt, bits, quant)
    blob = C.encode_tensors({"w": ct})
    _use(monkeypatch, "numpy")
    ref = _build(tau, mask, fmt, bits, quant)
    assert blob == C.encode_tensors({"w": ref})
    ref_dense = ref.to_numpy()
    _use(monkeypatch, path)
    dense = C.decode_tensors(blob)["w"].to_numpy()
    assert np.array_equal(dense.view(np.uint32), ref_dense.view(np.uint32))


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("as_printed", [False, True])
def test_bas_codes_match_the_float64_formula(path, bits, as_printed):
    rng = np.random.default_rng(bits)
    x = np.concatenate([(rng.standard_t(3, size=997) * 1e-3).astype(np.float32), np.float32([0.0, -1e-30])])
    rounding = np.floor if as_printed else np.ceil
    codes, params = C.quantize(x, bits, as_printed=as_printed)
    expected = [int(min(max(rounding((float(v) + params.v_neg) / params.step), 1), 1 << bits) - 1) for v in x]
    assert codes.dtype == np.uint8 and codes.tolist() == expected
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1 or as_printed
    v_neg, v_pos = C._f32(2 * params.v_neg), C._f32(3 * params.v_pos)  # a wider fixed range
    wide, _ = C.quantize(x, bits, bounds=(2 * params.v_neg, 3 * params.v_pos))
    step = (v_pos + v_neg) / (1 << bits)
    assert wide.tolist() == [int(min(max(np.ceil((float(v) + v_neg) / step), 1), 1 << bits) - 1) for v in x]


def test_bas_codes_with_a_tiny_step_saturate_like_numpy(monkeypatch):
    x = np.array([0.0, 1e-45, 2e-45, -1e-45], dtype=np.float32)  # subnormal range: huge quotients
    out = {}
    for p in PATHS:
        _use(monkeypatch, p)
        out[p] = C.quantize(x, 8)[0].tolist()
    assert len({tuple(v) for v in out.values()}) == 1, out


def test_line_counts_and_histogram_kernels():
    rng = np.random.default_rng(3)
    m = rng.random((17, 23)) < 0.4
    for kern in (K, _python_kernels()):
        rows, cols = kern.line_counts(m)
        assert rows.tolist() == [sum(map(int, r)) for r in m] and cols.tolist() == [sum(map(int, c)) for c in m.T]
        codes = rng.integers(0, 16, size=500).astype(np.uint8)
        assert kern.histogram(codes, 16).tolist() == [int((codes == v).sum()) for v in range(16)]


# --------------------------------------------------------------------------- ans against constriction


@pytest.mark.parametrize("seed", range(6))
def test_ans_kernels_write_constrictions_words(seed):
    """Two segments under two Categorical(perfect=False) models (with zero-probability symbols
    that still occur), pushed as constriction's AnsCoder.encode_reverse pushes them; then
    decoded back, ending in an empty stack."""
    rng = np.random.default_rng(seed)
    for kern in ([K, _python_kernels()] if K.HAVE_NUMBA else [K]):
        for size_a, size_b in ((0, 0), (1, 0), (0, 3), (257, 1000), (4000, 33)):
            n_sym = int(rng.choice([2, 3, 8, 256]))
            p = rng.random(n_sym) ** int(rng.choice([1, 8]))
            p[rng.random(n_sym) < 0.25] = 0.0
            p[0] += 1e-3
            q = rng.random(256)
            a = rng.integers(0, n_sym, size=size_a).astype(np.uint8)
            b = rng.integers(0, 256, size=size_b).astype(np.uint8)
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(a.astype(np.int32), constriction.stream.model.Categorical(p, perfect=False))
            coder.encode_reverse(b.astype(np.int32), constriction.stream.model.Categorical(q, perfect=False))
            expected = coder.get_compressed()
            state = np.zeros(1, dtype=np.uint64)
            words = np.empty(size_a + size_b + 2, dtype=np.uint32)
            used = kern.ans_encode(a, kern.categorical_cdf(p), state, words, 0)
            used = kern.ans_encode(b, kern.categorical_cdf(q), state, words, used)
            got = kern.ans_finish(state, words, used)
            assert got.dtype == np.uint32 and got.tolist() == expected.tolist()
            state, pos = kern.ans_start(got)
            outs = []
            for sym, probs in ((b, q), (a, p)):
                cdf = kern.categorical_cdf(probs)
                out = np.empty(sym.size, dtype=np.uint8)
                pos = kern.ans_decode(got, pos, state, cdf, kern.decoder_table(cdf), out)
                outs.append(out)
            assert np.array_equal(outs[0], b) and np.array_equal(outs[1], a) and state[0] == 0 and pos == 0


def test_ans_decoder_start_rejects_a_trailing_zero_word_like_constriction():
    words = np.array([5, 0], dtype=np.uint32)
    with pytest.raises(ValueError, match="never ends in a zero word"):
        constriction.stream.stack.AnsCoder(words)
    with pytest.raises(ValueError, match="never ends in a zero word"):
        K.ans_start(words)
    assert K.ans_start(np.zeros(0, dtype=np.uint32))[0][0] == 0


# --------------------------------------------------------------------------- corrupt payloads


def _outcome(fn):
    try:
        mask, codes = fn()[:2]
        return ("ok", mask.tobytes(), codes.tobytes())
    except ValueError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("fmt,bits", [("sass", 1), ("sass", 4), ("sass", 8), ("ans", 1), ("ans", 4), ("ans", 8)])
def test_corrupt_payloads_give_the_same_result_or_error_on_every_path(monkeypatch, fmt, bits):
    rng = np.random.default_rng(bits)
    tau, mask = _case(1200, 0.3, seed=bits, shape=(30, 40))
    quant = "sign" if bits == 1 else "bas"
    ct = _build(tau, mask, fmt, bits, quant)
    data, nbits = C.encode_payload(ct)
    variants = []
    for _ in range(40):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 4))):
            bad[pos] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(bad))
    variants += [data[:-1], data + b"\0", bytes(len(data))]
    for bad in variants:
        if fmt == "sass":
            fn = lambda: C.sass_decode(bad, nbits if len(bad) * 8 >= nbits else len(bad) * 8, ct.n, bits)  # noqa: E731
        else:
            fn = lambda: C.ans_decode(bad, ct.shape, bits)  # noqa: E731
        results = {}
        for p in PATHS:
            _use(monkeypatch, p)
            results[p] = _outcome(fn)
        assert len(set(results.values())) == 1, results


def test_kernels_are_optional_and_loaded_on_first_use(monkeypatch):
    monkeypatch.setattr(C, "_FAST", False)
    assert C._kernels() is None
    monkeypatch.setattr(C, "_FAST", None)
    assert (C._kernels() is K) == K.HAVE_NUMBA
