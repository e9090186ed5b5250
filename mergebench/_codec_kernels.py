"""Compiled kernels of the storage codecs (numba), used by :mod:`mergebench.codecs` when numba
is installed (the ``fast`` extra); without it the codecs run their numpy code, which writes
the same bytes.

The kernels are plain Python functions under a ``jit`` decorator that is numba's ``njit``
when numba imports and the identity otherwise, so the tests run the same code either way
(slowly, on small inputs, without numba).

ANS: :func:`ans_encode` and :func:`ans_decode` are the stack coder of ``constriction``
(``constriction.stream.stack.AnsCoder``: 32-bit words, 64-bit state, 24-bit probabilities;
``src/stream/stack.rs``) with its ``Categorical(probabilities, perfect=False)`` model
(``fast_quantized_cdf`` in ``src/stream/model/categorical.rs``), step for step, so they
produce and read the same words. constriction's decoder finds a symbol by binary search
over the cdf; here a table indexed by the top bits of the quantile gives the first
candidate, which is the same symbol found faster.
"""
from __future__ import annotations

import numpy as np

try:  # the `fast` extra
    import numba

    HAVE_NUMBA = True
    jit = numba.njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False

    def jit(fn):
        return fn

ANS_PRECISION = 24          # DefaultAnsCoder / DefaultContiguousCategoricalEntropyModel
ANS_LOOKUP_BITS = 12        # decoder table: one entry per 2^(24 - 12) quantiles
_U64 = np.uint64


def categorical_cdf(probabilities: np.ndarray) -> np.ndarray:
    """The fixed-point cdf (uint32, N + 1 entries, last 2^24) that constriction's
    ``Categorical(probabilities, perfect=False)`` builds from float64 probabilities:
    ``cdf[i] = trunc(P_i * (2^24 - N) / Z) + i`` with ``P_i`` the left-to-right partial
    sums and ``Z`` their total (the same sequential float64 additions as its iterator)."""
    p = np.ascontiguousarray(probabilities, dtype=np.float64)
    n = p.size
    partial = np.cumsum(p)  # sequential left-to-right sums, as Rust's iterator fold
    scale = float((1 << ANS_PRECISION) - n) / float(partial[-1])
    cdf = np.empty(n + 1, dtype=np.uint32)
    cdf[0] = 0
    cdf[1:n] = (partial[:-1] * scale).astype(np.uint32) + np.arange(1, n, dtype=np.uint32)
    cdf[n] = 1 << ANS_PRECISION
    if not (np.diff(cdf.astype(np.int64)) > 0).all():
        raise ValueError("categorical model is not normalizable")
    return cdf


def decoder_table(cdf: np.ndarray) -> np.ndarray:
    """For every block of 2^(24 - 12) quantiles, the symbol holding the block's first quantile
    (uint8: the codecs' alphabets have at most 256 symbols; a 4 kB table stays in L1)."""
    if cdf.size > 257:
        raise ValueError("decoder tables hold alphabets of at most 256 symbols")
    starts = np.arange(1 << ANS_LOOKUP_BITS, dtype=np.int64) << (ANS_PRECISION - ANS_LOOKUP_BITS)
    return (np.searchsorted(cdf, starts, side="right") - 1).astype(np.uint8)


@jit
def ans_encode(symbols, cdf, state, words, n_words):
    """Push ``symbols`` (in reverse, so they decode in order) onto the ANS stack given by
    ``state[0]`` (a uint64 array, updated) and ``words[:n_words]``; returns the new n_words.
    ``words`` must have room for one more word per symbol."""
    prec = _U64(ANS_PRECISION)
    room = _U64(64 - ANS_PRECISION)
    low32 = _U64(0xFFFFFFFF)
    st = state[0]
    for i in range(symbols.size - 1, -1, -1):
        s = np.int64(symbols[i])
        left = _U64(cdf[s])
        prob = _U64(cdf[s + 1]) - left
        if (st >> room) >= prob:
            words[n_words] = np.uint32(st & low32)
            n_words += 1
            st = st >> _U64(32)
        st = ((st // prob) << prec) | (left + st % prob)
    state[0] = st
    return n_words


def ans_finish(state: np.ndarray, words: np.ndarray, n_words: int) -> np.ndarray:
    """The compressed words: the bulk, then the state's low and (if non-zero) high word
    (none for a zero state), as constriction's ``get_compressed``."""
    state = int(state[0])
    tail = [state & 0xFFFFFFFF, state >> 32] if state >> 32 else ([state] if state else [])
    out = np.empty(n_words + len(tail), dtype=np.uint32)
    out[:n_words] = words[:n_words]
    out[n_words:] = tail
    return out


def ans_start(words: np.ndarray) -> tuple[np.ndarray, int]:
    """(state as a uint64 array, words left) of a decoder over ``words`` (constriction's
    ``from_compressed``)."""
    n = int(words.size)
    state = np.zeros(1, dtype=np.uint64)
    if n == 0:
        return state, 0
    if words[n - 1] == 0:
        raise ValueError("Invalid compressed data: ANS compressed data never ends in a zero word.")
    if n == 1:
        state[0] = words[0]
        return state, 0
    state[0] = (int(words[n - 1]) << 32) | int(words[n - 2])
    return state, n - 2


@jit
def ans_decode(words, pos, state, cdf, table, out):
    """Pop ``out.size`` symbols off the ANS stack (``state[0]``, a uint64 array, updated, and
    ``words[:pos]``) into ``out``; returns the new pos. Decoding past the end is deterministic,
    as constriction's."""
    prec = _U64(ANS_PRECISION)
    qmask = _U64((1 << ANS_PRECISION) - 1)
    shift = _U64(ANS_PRECISION - ANS_LOOKUP_BITS)
    refill = _U64(1) << _U64(32)
    st = state[0]
    for i in range(out.size):
        q = st & qmask
        s = np.int64(table[q >> shift])
        while _U64(cdf[s + 1]) <= q:
            s += 1
        left = _U64(cdf[s])
        st = (st >> prec) * (_U64(cdf[s + 1]) - left) + (q - left)
        if st < refill and pos > 0:
            pos -= 1
            st = (st << _U64(32)) | _U64(words[pos])
        out[i] = s
    state[0] = st
    return pos


@jit
def _group_of(i, c, inv_c, shift):
    """i // c for 0 <= i < 2^52: a shift when c = 2^shift (shift >= 0), else a float reciprocal
    and one correction step (no integer division)."""
    if shift >= 0:
        return i >> shift
    g = np.int64(i * inv_c)
    if g * c > i:
        g -= 1
    elif (g + 1) * c <= i:
        g += 1
    return g


@jit
def sass_write(idx, codes, c, ib, bits, bitmap_start, base, out):
    """The bitmap bits and records of a SASS stream, OR-ed into ``out`` (zeroed, 8 bytes longer
    than the stream): for kept position ``idx[j]`` of group g = idx[j] // c, bit
    ``bitmap_start + g`` is set and record j (in-group index, code, end-of-group flag; L =
    ib + bits + 1 bits, LSB first) is written at bit ``base + j L``."""
    k = idx.size
    inv_c = 1.0 / c
    shift = ib if c == 1 << ib else -1
    cb = np.uint64(ib)
    eb = np.uint64(ib + bits)
    width = ib + bits + 1
    acc = np.uint64(0)
    nacc = base & 7
    p = base >> 3
    g_next = _group_of(idx[0], c, inv_c, shift) if k else 0
    prev = -1
    for j in range(k):
        i = idx[j]
        g = g_next
        if g != prev:
            b = bitmap_start + g
            out[b >> 3] |= np.uint8(1 << (b & 7))
            prev = g
        if j + 1 < k:
            g_next = _group_of(idx[j + 1], c, inv_c, shift)
            eog = np.uint64(1 if g_next != g else 0)
        else:
            eog = np.uint64(1)
        rec = np.uint64(i - g * c) | (np.uint64(codes[j]) << cb) | (eog << eb)
        acc |= rec << np.uint64(nacc)
        nacc += width
        if nacc >= 32:
            out[p] |= np.uint8(acc & np.uint64(0xFF))
            out[p + 1] |= np.uint8((acc >> np.uint64(8)) & np.uint64(0xFF))
            out[p + 2] |= np.uint8((acc >> np.uint64(16)) & np.uint64(0xFF))
            out[p + 3] |= np.uint8((acc >> np.uint64(24)) & np.uint64(0xFF))
            p += 4
            acc >>= np.uint64(32)
            nacc -= 32
    while nacc > 0:
        out[p] |= np.uint8(acc & np.uint64(0xFF))
        p += 1
        acc >>= np.uint64(8)
        nacc -= 8


@jit
def sass_read(data, base, k, c, ib, bits, nonempty, mask, codes):
    """Parse the k records of a SASS stream (from bit ``base`` of ``data``, which has 8 bytes of
    slack after the stream) into ``mask`` (zeroed) and ``codes``, with the groups numbered by
    the end-of-group flags over ``nonempty`` (the set bits of the bitmap). Returns 0 when the
    stream is consistent (flag count, last flag, in-group indices in range and strictly
    increasing), else 1 (the caller then reports which check failed)."""
    width = ib + bits + 1
    lmask = np.uint64((1 << ib) - 1)
    cmask = np.uint64((1 << bits) - 1)
    cb = np.uint64(ib)
    eb = np.uint64(ib + bits)
    p = base >> 3
    acc = np.uint64(data[p]) >> np.uint64(base & 7)
    nacc = 8 - (base & 7)
    p += 1
    gi = 0
    n_groups = nonempty.size
    last = -1
    eog = np.uint64(0)
    for j in range(k):
        while nacc < width:
            acc |= np.uint64(data[p]) << np.uint64(nacc)
            p += 1
            nacc += 8
        local = np.int64(acc & lmask)
        codes[j] = np.uint8((acc >> cb) & cmask)
        eog = (acc >> eb) & np.uint64(1)
        acc >>= np.uint64(width)
        nacc -= width
        if gi >= n_groups or local >= c:
            return 1
        i = nonempty[gi] * c + local
        if i <= last:
            return 1
        mask[i] = True
        last = i
        gi += np.int64(eog)
    if gi != n_groups or (k and eog == 0):
        return 1
    return 0


@jit
def line_counts(mask2d):
    """Kept entries of every row and every column of a C-contiguous boolean matrix (int64),
    in one pass."""
    rows, cols = mask2d.shape
    per_row = np.zeros(rows, dtype=np.int64)
    per_col = np.zeros(cols, dtype=np.int64)
    for r in range(rows):
        total = 0
        for q in range(cols):
            v = np.int64(mask2d[r, q])
            per_col[q] += v
            total += v
        per_row[r] = total
    return per_row, per_col


@jit
def histogram(codes, size):
    """np.bincount(codes, minlength=size) for uint8 codes < size."""
    out = np.zeros(size, dtype=np.int64)
    for i in range(codes.size):
        out[codes[i]] += 1
    return out


@jit
def bas_codes(x, v_neg, delta, top, as_printed):
    """BAS bin indices Clamp(ceil((x + v_neg) / delta), 1, top) - 1 (floor when ``as_printed``),
    in the float64 operations of the numpy path, as uint8."""
    out = np.empty(x.size, dtype=np.uint8)
    for i in range(x.size):
        t = (np.float64(x[i]) + v_neg) / delta
        t = np.floor(t) if as_printed else np.ceil(t)
        t = min(max(t, 1.0), top)
        out[i] = np.uint8(t - 1.0)
    return out


@jit
def scatter_values(idx, codes, table, out):
    """out[idx[j]] = table[codes[j]]: the decoded values of the kept entries, in place."""
    for j in range(idx.size):
        out[idx[j]] = table[codes[j]]
