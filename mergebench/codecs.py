"""Storage codecs for compressed task vectors (T-Switch, Indep, SASS, ans).

This module turns one tensor's compressed task vector into a real bitstream and
back, exactly; :mod:`mergebench.container` puts these payloads, with any dense
tensors and metadata, into one checksummed file.
Everything is vectorised with numpy: there is no Python loop per element or per
group, only over a fixed handful of bit fields. Where numba is installed (the ``fast``
extra), the loops numpy cannot vectorise well (SASS records, the ANS coder, BAS codes, the
dense scatter) run as compiled kernels (:mod:`mergebench._codec_kernels`) that write the
same bytes.

Specification
-------------
* **T-Switch** (Qi et al., CVPR 2025, Sec. 3.3-3.4; Auto-FlexSwitch Eqs. 3-4):
  a task vector tau is approximated by ``beta * A (.) P`` with the activation
  mask ``A`` in {0,1}^n, the polarity ``P = g_b(tau)`` in {-1,+1}^n (``+1`` if
  tau_j > 0, ``-1`` if tau_j <= 0, Eq. 4) and the knob
  ``beta = ||tau (.) A||_2 / ||A (.) P||_2`` (Eq. 3; = ||tau (.) A||_2 / sqrt(|A|)).
* **BAS quantiser** (Auto-FlexSwitch Eq. 13): b-bit asymmetric quantiser over
  ``[-v_neg, v_pos]`` with step ``delta = (v_pos + v_neg) / 2^b`` and levels
  ``-v_neg + (I + 0.5) * delta``, ``I`` in ``[0, 2^b - 1]``. See :func:`quantize`
  for the one deviation from the printed formula (``ceil`` instead of ``floor``).
* **Indep** (Sec. III-C4): a mask bit for every element and a b-bit code for
  every element, ``(b + 1) * n`` bits.
* **SASS** (Sec. III-C4, Eqs. 16-17): grouped COO; see :func:`sass_encode`.

Bit order (chosen once, used everywhere)
----------------------------------------
A payload is a bitstream; stream bit ``i`` is bit ``i % 8`` (least significant
first) of byte ``i // 8`` (``np.packbits(..., bitorder="little")``). A multi-bit
field of width ``w`` holding the unsigned integer ``v`` occupies ``w`` consecutive
stream bits, least significant bit first. The last byte is zero padded.

Payload layouts (n = number of elements, K = number of kept entries, in
row-major (C) order of the original shape)
----------------------------------------------------------------------------
* ``tswitch``: n mask bits, then K sign bits (1 = +1, 0 = -1) for the kept
  entries only (smaller than n sign bits whenever K < n). beta (fp32) is in the
  header. Payload bits = n + K.
* ``indep``: n mask bits, then n b-bit codes (code 0 at non-kept entries).
  Payload bits = (b + 1) n, exactly ``Storage^Indep``. Quantiser parameters
  (fp32) are in the header.
* ``sass``: 27-bit group count G = n / c, 8-bit ``c - 1`` (the paper's 35-bit
  constant), a G-bit bitmap of non-empty groups, then for each non-empty group
  and each of its non-zero entries, a record of ``ceil(log2 c)`` bits of
  in-group index, b bits of value code and a 1-bit end-of-group flag (1 on the
  last entry of the group). Payload bits = 35 + n/c + K (ceil(log2 c) + b + 1),
  which is Eq. 16 evaluated at the tensor's actual sparsity.
* ``ans``: the mask and the value codes entropy-coded (asymmetric numeral systems,
  the ``constriction`` package), with the probability model in a few bytes at the
  start of the payload; see :func:`ans_encode`. Not in the papers: it measures how
  close a file can get to the entropy of mask + values (:func:`entropy_bounds`), and
  below the i.i.d. bound where rows or columns keep different fractions of entries.

Values: ``quant="sign"`` (1 bit: the T-Switch polarity, value = +-beta, also
usable inside ``indep``/``sass``), or ``quant="bas"`` (b-bit BAS codes, value =
``scale * Q``; ``scale`` is the optional calibration factor sigma(kappa) of
FlexSwitch, 1.0 by default).

Container
---------
A named set of compressed tensors is stored in the one container of
:mod:`mergebench.container` (header with shape, dtype, parameters and a crc32 per
payload; never pickle); ``encode_tensors``, ``decode_tensors``, ``write_artifact``
and ``read_artifact`` are importable from here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMATS",
    "MAX_GROUP_SIZE",
    "CorruptArtifactError",
    "BASParams",
    "CompressedTensor",
    "pack_bits",
    "unpack_bits",
    "pack_codes",
    "unpack_codes",
    "quantize",
    "dequantize",
    "choose_group_size",
    "sass_bits_eq16",
    "sass_bits_exact",
    "indep_bits",
    "tswitch_bits",
    "entropy_bound_bits",
    "entropy_bounds",
    "ans_encode",
    "ans_decode",
    "tswitch_from_task_vector",
    "quantized_from_task_vector",
    "encode_payload",
    "decode_payload",
    "sass_encode",
    "sass_decode",
]

FORMATS = ("tswitch", "indep", "sass", "ans")
QUANTS = ("sign", "bas")
MAX_GROUP_SIZE = 256          # SASS: "a maximum group size of 256, for which 8 bits are allocated"
SASS_COUNT_BITS = 27          # SASS: "27 bits are reserved to store the group count"
SASS_SIZE_BITS = 8
SASS_CONST_BITS = SASS_COUNT_BITS + SASS_SIZE_BITS  # = 35, the constant of Eq. 16


from mergebench.errors import CorruptArtifactError  # noqa: E402  (re-exported)

# Whether to run the compiled kernels of mergebench._codec_kernels (numba, the `fast` extra)
# instead of numpy; both write the same bytes. None: decided on first use, so that importing
# this module does not import numba (a second); tests set it to compare the two paths.
_FAST: bool | None = None


def _kernels():
    """The compiled kernels module when numba imports (and _FAST is not False), else None."""
    global _FAST
    if _FAST is False:
        return None
    from mergebench import _codec_kernels

    if _FAST is None:
        _FAST = _codec_kernels.HAVE_NUMBA
    return _codec_kernels if _FAST and _codec_kernels.HAVE_NUMBA else None


# --------------------------------------------------------------------------- bits


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a 0/1 (or bool) array into bytes, stream bit i = bit i%8 (LSB first) of byte i//8."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8).ravel()
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(data: bytes | np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`: a uint8 0/1 array of ``nbits`` (default all) bits."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return np.unpackbits(buf, bitorder="little", count=nbits)


def _codes_to_bits(codes: np.ndarray, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """(m,) uint8 codes -> (m, width) uint8 bits, LSB first (written into ``out`` if given).
    A loop over the <= 8 bit planes, each one vectorised over all codes."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if out is None:
        out = np.empty((codes.size, width), dtype=np.uint8)
    for j in range(width):
        np.bitwise_and(codes >> j, 1, out=out[:, j])
    return out


def _bits_to_codes(bits: np.ndarray) -> np.ndarray:
    """(m, width <= 8) 0/1 bits (LSB first) -> (m,) uint8 codes."""
    acc = np.zeros(bits.shape[0], dtype=np.uint8)
    plane = np.empty(bits.shape[0], dtype=np.uint8)
    for j in range(bits.shape[1]):
        np.left_shift(bits[:, j], j, out=plane, casting="unsafe")  # (no temporaries per plane)
        acc |= plane
    return acc


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes of ``bits`` (1..8) bits each densely: code i occupies
    stream bits [i*bits, (i+1)*bits), least significant bit first."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    codes = codes.astype(np.uint8).ravel()
    if bits == 8:
        return codes.tobytes()
    if 8 % bits:  # 3, 5, 6, 7 bits: through the bit planes
        return pack_bits(_codes_to_bits(codes, bits))
    per = 8 // bits  # 1, 2, 4 bits: whole codes per byte
    pad = (-codes.size) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, dtype=np.uint8)])
    v = codes.reshape(-1, per)
    acc = v[:, 0].copy()
    for j in range(1, per):
        acc |= v[:, j] << (j * bits)
    return acc.tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes."""
    _check_bits(bits)
    if len(data) * 8 < count * bits:
        raise ValueError(f"{len(data)} bytes cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return np.frombuffer(data, dtype=np.uint8, count=count).copy()
    if 8 % bits:
        return _bits_to_codes(unpack_bits(data, count * bits).reshape(count, bits))
    per = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8, count=-(-count // per))
    out = np.empty((raw.size, per), dtype=np.uint8)
    lowmask = np.uint8((1 << bits) - 1)
    for j in range(per):
        np.bitwise_and(raw >> (j * bits), lowmask, out=out[:, j])
    return out.reshape(-1)[:count].copy()


def _int_to_bits(value: int, width: int) -> np.ndarray:
    return ((int(value) >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)


def _bits_to_int(bits: np.ndarray) -> int:
    return int((bits.astype(np.int64) << np.arange(bits.size, dtype=np.int64)).sum())


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bit-width must be an integer in 1..8, got {bits!r}")


def _ceil_log2(c: int) -> int:
    return int(c - 1).bit_length()  # 0 for c = 1, exact ceil(log2 c) for c >= 1


# --------------------------------------------------------------------------- BAS quantiser


@dataclass(frozen=True)
class BASParams:
    """Parameters of the BAS quantiser of Eq. 13 (stored as fp32 in the header)."""

    v_neg: float  # v_max^-: magnitude of the most negative value (range starts at -v_neg)
    v_pos: float  # v_max^+: the largest value (range ends at v_pos)
    bits: int

    @property
    def step(self) -> float:
        """delta = (v_pos + v_neg) / 2^b."""
        return (self.v_pos + self.v_neg) / float(1 << self.bits)


def _f32(x: float) -> float:
    return float(np.float32(x))


def quantize(x: Any, bits: int, *, as_printed: bool = False,
             bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, BASParams]:
    """BAS asymmetric quantiser, Auto-FlexSwitch Eq. 13.

    ``v_pos = max(x)``, ``v_neg = -min(x)`` (fp32), ``delta = (v_pos + v_neg) / 2^b``
    and the bin index ``I = Clamp(ceil((x + v_neg) / delta), 1, 2^b) - 1`` in
    ``[0, 2^b - 1]``; :func:`dequantize` gives ``-v_neg + (I + 0.5) delta``.

    Deviation: the paper prints ``floor`` inside the clamp. Taken literally, an
    element in bin k (k >= 1) is mapped to the centre of bin k - 1, so the error
    reaches 1.5 steps and the two lowest bins collapse; with ``ceil`` (the 1-based
    form the ``Clamp(., 1, 2^b) - 1`` is written for) every element is mapped to
    the centre of its own bin, error <= delta / 2. ``as_printed=True`` gives the
    literal formula, for comparison.

    A constant (or empty) input has delta = 0: all codes are 0 and dequantise to
    the constant exactly.

    ``bounds=(v_neg, v_pos)`` fixes the range instead of taking it from ``x``: FlexSwitch
    quantises the kept entries over the range of the whole task vector (Eq. 13's
    v_max^-, v_max^+), which is the range of ``x`` whenever both extremes are kept.
    """
    _check_bits(bits)
    x = _as_numpy_f32(x).ravel()
    if x.size == 0:
        return np.zeros(0, dtype=np.uint8), BASParams(0.0, 0.0, int(bits))
    v_neg, v_pos = (_f32(-x.min()), _f32(x.max())) if bounds is None else (_f32(bounds[0]), _f32(bounds[1]))
    if not (math.isfinite(v_pos) and math.isfinite(v_neg)):
        raise ValueError("cannot quantise non-finite values")
    params = BASParams(v_neg, v_pos, int(bits))
    delta = params.step
    if delta == 0.0:
        return np.zeros(x.size, dtype=np.uint8), params
    kern = _kernels()
    if kern is not None:
        return kern.bas_codes(x, v_neg, delta, float(1 << bits), as_printed), params
    t = x.astype(np.float64)  # the same float64 operations as (x + v_neg) / delta, in place
    t += v_neg
    t /= delta
    (np.floor if as_printed else np.ceil)(t, out=t)
    np.clip(t, 1, 1 << bits, out=t)
    t -= 1
    return t.astype(np.uint8), params


def dequantize(codes: np.ndarray, params: BASParams) -> np.ndarray:
    """``-v_neg + (I + 0.5) * delta`` as float32 (Eq. 13)."""
    codes = np.asarray(codes)
    return (-params.v_neg + (codes.astype(np.float64) + 0.5) * params.step).astype(np.float32)


# --------------------------------------------------------------------------- sizes


def choose_group_size(n: int, alpha: float, max_group_size: int = MAX_GROUP_SIZE) -> int:
    """SASS group size, Eq. 17: ``argmin_{c | n, c <= 256} |ln 2 / (1 - alpha) - c|``.

    The divisors are capped at 256, the largest group size the 8-bit field of
    Eq. 16's 35-bit constant can hold (the paper's stated maximum). alpha = 1
    (nothing kept) gives the largest allowed divisor; ties go to the smaller c.
    For n = 0 the answer is 1.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sparsity alpha must be in [0, 1], got {alpha}")
    if n == 0:
        return 1
    cand = np.arange(1, min(n, int(max_group_size)) + 1, dtype=np.int64)
    cand = cand[n % cand == 0]
    if alpha >= 1.0:
        return int(cand[-1])
    target = math.log(2.0) / (1.0 - alpha)
    return int(cand[np.argmin(np.abs(target - cand.astype(np.float64)))])


def sass_bits_eq16(n: int, alpha: float, b: int, c: int) -> float:
    """Eq. 16: ``35 + n/c + n (1 - alpha) (ceil(log2 c) + b + 1)`` bits."""
    return SASS_CONST_BITS + n / c + n * (1.0 - alpha) * (_ceil_log2(c) + b + 1)


def sass_bits_exact(n: int, n_kept: int, b: int, c: int) -> int:
    """Exact SASS payload bits for a tensor with ``n_kept`` non-zeros (Eq. 16 at the actual alpha)."""
    return SASS_CONST_BITS + n // c + n_kept * (_ceil_log2(c) + b + 1)


def indep_bits(n: int, b: int) -> int:
    """``Storage^Indep = (b + 1) n`` bits."""
    return (b + 1) * n


def tswitch_bits(n: int, n_kept: int) -> int:
    """T-Switch payload: n mask bits + one sign bit per kept entry (beta is in the header)."""
    return n + n_kept


def _binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_bound_bits(n: int, alpha: float, b: int) -> float:
    """Entropy bound: n * (H(1 - alpha) + (1 - alpha) b) bits (i.i.d. Bernoulli mask, b-bit values)."""
    return n * (_binary_entropy(1.0 - alpha) + (1.0 - alpha) * b)


def entropy_bounds(mask: Any, codes: Any, shape: tuple[int, ...], bits: int) -> dict[str, float]:
    """Empirical entropies (bits, numpy) of one tensor's mask and kept value codes under the
    models an entropy coder can use; the tensor is read as the matrix of :func:`_grid`.

    * ``mask_iid``: n H(K / n), one keep rate for the whole tensor;
    * ``mask_rows`` / ``mask_columns``: sum over rows (columns) of their length times H of their keep rate;
    * ``mask_context``: H(m_ij | m_i,j-1, m_i-1,j), the left and upper neighbours (0 outside);
    * ``values_iid``: K H(codes), the codes' own histogram; ``values_uniform``: K b;
    * ``values_rows`` / ``values_columns``: the codes' histogram per row (column).

    These are lower bounds for coders that learn each model's parameters for free; a real
    file also stores them (a few bytes per tensor, or per line for the per-line models).
    """
    m = _as_numpy_bool(mask).reshape(_grid(tuple(shape)))
    c = np.asarray(codes, dtype=np.int64).ravel()
    rows, cols = m.shape
    k = int(np.count_nonzero(m))
    out = {"mask_iid": float(_bernoulli_bits(k, m.size)),
           "mask_rows": float(_bernoulli_bits(np.count_nonzero(m, axis=1), cols).sum()),
           "mask_columns": float(_bernoulli_bits(np.count_nonzero(m, axis=0), rows).sum())}
    left = np.zeros_like(m)
    left[:, 1:] = m[:, :-1]
    up = np.zeros_like(m)
    up[1:, :] = m[:-1, :]
    context = (2 * left + up).ravel()
    n_ctx = np.bincount(context, minlength=4)
    k_ctx = np.bincount(context, weights=m.ravel(), minlength=4)
    out["mask_context"] = float(_bernoulli_bits(k_ctx, n_ctx).sum())
    symbols = 1 << int(bits)
    counts = np.bincount(c, minlength=symbols)
    out["values_iid"] = float(_xlog2(counts, counts / max(k, 1)).sum())
    out["values_uniform"] = float(k * bits)
    r_idx, c_idx = np.nonzero(m)  # row-major, the order of the codes
    for name, line, size in (("values_rows", r_idx, rows), ("values_columns", c_idx, cols)):
        table = np.bincount(line * symbols + c, minlength=size * symbols).reshape(size, symbols)
        totals = table.sum(axis=1, keepdims=True)
        out[name] = float(_xlog2(table, table / np.maximum(totals, 1)).sum())
    return out


# --------------------------------------------------------------------------- the data class


def _as_numpy_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _as_numpy_bool(m: Any) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    if m.dtype != np.bool_:
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1)")
        m = m.astype(np.bool_)
    return m


def _dtype_name(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return str(np.asarray(x).dtype)


@dataclass(eq=False)
class CompressedTensor:
    """One tensor's compressed task vector.

    ``mask`` is the flat boolean activation mask (n,) in row-major order; ``codes``
    holds one uint8 code per kept entry, in the same order. ``quant="sign"``: 1-bit
    polarity codes (1 = +1, 0 = -1), value ``params["beta"] * (+-1)``;
    ``quant="bas"``: b-bit BAS codes, value ``params["scale"] * Q`` with
    ``params = {"v_neg", "v_pos", "scale"}``. ``fmt`` picks the storage layout.
    """

    shape: tuple[int, ...]
    fmt: str
    bits: int
    mask: np.ndarray
    codes: np.ndarray
    quant: str
    params: dict[str, float]
    dtype: str = "float32"  # dtype of the original task vector (metadata only)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"bad shape {self.shape}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown codec format {self.fmt!r}; expected one of {FORMATS}")
        if self.quant not in QUANTS:
            raise ValueError(f"unknown value quantisation {self.quant!r}; expected one of {QUANTS}")
        _check_bits(self.bits)
        self.bits = int(self.bits)
        if self.quant == "sign" and self.bits != 1:
            raise ValueError("sign values are 1 bit")
        if self.fmt == "tswitch" and self.quant != "sign":
            raise ValueError("the tswitch format stores signs only (quant='sign', bits=1)")
        self.mask = np.ascontiguousarray(self.mask, dtype=np.bool_).ravel()
        self.codes = np.ascontiguousarray(self.codes, dtype=np.uint8).ravel()
        if self.mask.size != self.n:
            raise ValueError(f"mask has {self.mask.size} entries, shape {self.shape} has {self.n}")
        n_kept = int(np.count_nonzero(self.mask))
        if self.codes.size != n_kept:
            raise ValueError(f"{self.codes.size} codes for {n_kept} kept entries")
        if self.codes.size and int(self.codes.max()) >= 1 << self.bits:
            raise ValueError(f"codes exceed {self.bits} bits")
        self._n_kept = n_kept
        self._ans_payload: bytes | None = None
        needed = ("beta",) if self.quant == "sign" else ("v_neg", "v_pos", "scale")
        params = dict(self.params)
        if self.quant == "bas":
            params.setdefault("scale", 1.0)
        if set(params) != set(needed):
            raise ValueError(f"quant={self.quant!r} needs params {needed}, got {sorted(params)}")
        for k, v in params.items():
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"parameter {k} is not finite: {v}")
            params[k] = _f32(v)
        self.params = {k: params[k] for k in needed}

    # ---- derived quantities
    @property
    def n(self) -> int:
        return int(math.prod(self.shape))

    @property
    def n_kept(self) -> int:
        return self._n_kept

    @property
    def sparsity(self) -> float:
        """alpha: fraction of zero (not kept) entries; 1.0 for an empty tensor."""
        return 1.0 - self._n_kept / self.n if self.n else 1.0

    @property
    def group_size(self) -> int | None:
        """SASS group size chosen by Eq. 17 from the actual sparsity (None for other formats)."""
        return choose_group_size(self.n, self.sparsity) if self.fmt == "sass" else None

    @property
    def bas_params(self) -> BASParams:
        return BASParams(self.params["v_neg"], self.params["v_pos"], self.bits)

    @property
    def payload_bits(self) -> int:
        """Exact length of the packed payload bitstream (before byte padding; ans: whole bytes,
        known only by encoding, which is done once and kept)."""
        if self.fmt == "ans":
            if self._ans_payload is None:
                self._ans_payload = ans_encode(self.mask, self.codes, self.shape, self.bits)
            return 8 * len(self._ans_payload)
        if self.fmt == "tswitch":
            return tswitch_bits(self.n, self.n_kept)
        if self.fmt == "indep":
            return indep_bits(self.n, self.bits)
        return sass_bits_exact(self.n, self.n_kept, self.bits, self.group_size)

    # ---- values
    def value_table(self) -> np.ndarray:
        """The float32 value of every code (2^bits entries): values are a function of the code
        alone, so decoding is one table lookup per kept entry."""
        if self.quant == "sign":
            beta = self.params["beta"]
            return np.array([-beta, beta], dtype=np.float32)  # code 1 -> +beta, 0 -> -beta
        vals = dequantize(np.arange(1 << self.bits), self.bas_params)
        if self.params["scale"] != 1.0:
            vals = (vals * np.float32(self.params["scale"])).astype(np.float32)
        return vals

    def values(self) -> np.ndarray:
        """The float32 values of the kept entries."""
        return self.value_table()[self.codes]

    def to_numpy(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        kern = _kernels()
        if kern is not None:
            kern.scatter_values(np.flatnonzero(self.mask), self.codes, self.value_table(), out)
        else:
            out[np.flatnonzero(self.mask)] = self.values()  # (integer scatter: faster than out[mask])
        return out.reshape(self.shape)

    def to_dense(self) -> torch.Tensor:
        """The decoded task vector as a float32 CPU tensor of the original shape."""
        return torch.from_numpy(self.to_numpy())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompressedTensor):
            return NotImplemented
        return (self.shape == other.shape and self.fmt == other.fmt and self.bits == other.bits
                and self.quant == other.quant and self.params == other.params
                and self.dtype == other.dtype and np.array_equal(self.mask, other.mask)
                and np.array_equal(self.codes, other.codes))

    def __repr__(self) -> str:
        return (f"CompressedTensor(shape={self.shape}, fmt={self.fmt!r}, bits={self.bits}, "
                f"quant={self.quant!r}, n_kept={self.n_kept}, params={self.params})")


def _prepare(tau: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], str]:
    t = _as_numpy_f32(tau)
    m = _as_numpy_bool(mask)
    if m.size != t.size or (m.ndim > 1 and m.shape != t.shape):
        raise ValueError(f"mask shape {m.shape} does not match task vector shape {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("task vector has non-finite values (NaN or inf)")
    return t.ravel(), m.ravel(), tuple(t.shape), _dtype_name(tau)


def tswitch_from_task_vector(tau: Any, mask: Any, fmt: str = "tswitch") -> CompressedTensor:
    """T-Switch decomposition {A, P, beta}: A = mask, P = sign(tau) with 0 -> -1 (Eq. 4),
    beta = ||tau (.) A||_2 / ||A (.) P||_2 (Eq. 3; beta = 0 when nothing is kept).
    ``fmt`` may also be "sass" or "indep" (1-bit sign values in those layouts)."""
    t, m, shape, dtype = _prepare(tau, mask)
    kept = np.compress(m, t)  # (the same entries as t[m], several times faster)
    beta = float(np.linalg.norm(kept.astype(np.float64)) / math.sqrt(kept.size)) if kept.size else 0.0
    codes = (kept > 0).astype(np.uint8)
    return CompressedTensor(shape, fmt, 1, m, codes, "sign", {"beta": beta}, dtype)


def quantized_from_task_vector(tau: Any, mask: Any, bits: int, fmt: str = "sass", *,
                               scale: float = 1.0, bounds: tuple[float, float] | None = None) -> CompressedTensor:
    """BAS-quantised (Eq. 13) kept entries of ``tau`` at ``bits`` bits, stored as
    ``fmt`` ("sass" or "indep"). The quantiser range is that of the kept entries
    unless ``bounds=(v_neg, v_pos)`` is given (see :func:`quantize`).
    ``scale`` (the FlexSwitch sigma(kappa)) multiplies the decoded values."""
    if fmt == "tswitch":
        raise ValueError("the tswitch format stores signs; use tswitch_from_task_vector")
    t, m, shape, dtype = _prepare(tau, mask)
    codes, p = quantize(np.compress(m, t), bits, bounds=bounds)
    return CompressedTensor(shape, fmt, bits, m, codes, "bas",
                            {"v_neg": p.v_neg, "v_pos": p.v_pos, "scale": float(scale)}, dtype)


# --------------------------------------------------------------------------- payloads


def sass_encode(mask: np.ndarray, codes: np.ndarray, bits: int, c: int) -> tuple[bytes, int]:
    """SASS grouped-COO bitstream -> (bytes, exact bit length).

    Layout: G = n/c (27 bits), c - 1 (8 bits), G-bit bitmap of non-empty groups, then
    one record per non-zero entry in order: in-group index (ceil(log2 c) bits, none
    for c = 1), value code (``bits`` bits), end-of-group flag (1 bit). Records have a
    constant length L, so record j starts at 35 + G + j L; the records are built as a
    (K, L) bit matrix and the whole stream is packed at once.
    """
    n = mask.size
    if n % c:
        raise ValueError(f"group size {c} does not divide n = {n}")
    if not 1 <= c <= MAX_GROUP_SIZE:
        raise ValueError(f"group size must be in 1..{MAX_GROUP_SIZE}, got {c}")
    groups = n // c
    if groups >= 1 << SASS_COUNT_BITS:
        raise ValueError(f"tensor too large for SASS: {groups} groups do not fit the 27-bit count")
    ib = _ceil_log2(c)
    L = ib + bits + 1
    idx = np.flatnonzero(mask)
    k = idx.size
    kern = _kernels()
    if kern is not None:  # the same stream, written record by record by a compiled kernel
        nbits = SASS_CONST_BITS + groups + k * L
        out = np.zeros((nbits + 7) // 8 + 8, dtype=np.uint8)
        out[:5] = np.frombuffer((groups | (c - 1) << SASS_COUNT_BITS).to_bytes(5, "little"), dtype=np.uint8)
        kern.sass_write(idx, np.ascontiguousarray(codes, dtype=np.uint8), c, ib, int(bits),
                        SASS_CONST_BITS, SASS_CONST_BITS + groups, out)
        return out[:(nbits + 7) // 8].tobytes(), nbits
    rec = np.empty((k, L), dtype=np.uint8)
    if ib:
        grp, local = np.divmod(idx, c)
        bitmap = np.zeros(groups, dtype=np.bool_)
        bitmap[grp] = True  # (a scatter: much faster than mask.reshape(G, c).any(1) for small c)
    else:
        bitmap = mask  # c = 1: the bitmap is the mask
    if k:
        if ib:
            _codes_to_bits(local.astype(np.uint8), ib, out=rec[:, :ib])
            np.not_equal(grp[1:], grp[:-1], out=rec[:-1, L - 1], casting="unsafe")
        else:
            rec[:, L - 1] = 1  # c = 1: every non-empty group holds exactly one entry
        _codes_to_bits(codes, bits, out=rec[:, ib:ib + bits])
        rec[-1, L - 1] = 1
    stream = np.concatenate([
        _int_to_bits(groups, SASS_COUNT_BITS),
        _int_to_bits(c - 1, SASS_SIZE_BITS),
        bitmap.view(np.uint8),
        rec.reshape(-1),
    ])
    return pack_bits(stream), int(stream.size)


def sass_decode(payload: bytes, nbits: int, n: int, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse of :func:`sass_encode` -> (mask, codes, c). Raises ValueError on an
    inconsistent stream. Group boundaries come from the end-of-group flags: the group
    ordinal of record j is the number of flags before it (an exclusive cumsum of the
    flags), computed here as ``np.repeat`` of the non-empty group starts by the group
    sizes (the gaps between flag positions), which is the same thing, faster."""
    if nbits < SASS_CONST_BITS or len(payload) * 8 < nbits:
        raise ValueError(f"SASS stream of {nbits} bits does not fit its {len(payload)} bytes")
    kern = _kernels()
    if kern is not None:
        parsed = _sass_decode_fast(kern, payload, nbits, n, bits)
        if parsed is not None:
            return parsed
    stream = unpack_bits(payload)
    if stream[nbits:].any():
        raise ValueError("non-zero padding bits after the SASS stream")
    groups = _bits_to_int(stream[:SASS_COUNT_BITS])
    c = _bits_to_int(stream[SASS_COUNT_BITS:SASS_CONST_BITS]) + 1
    if groups * c != n:
        raise ValueError(f"SASS stream says {groups} groups of {c}, tensor has {n} elements")
    ib = _ceil_log2(c)
    L = ib + bits + 1
    base = SASS_CONST_BITS + groups
    if nbits < base or (nbits - base) % L:
        raise ValueError(f"SASS stream length {nbits} is not 35 + {groups} + K * {L}")
    k = (nbits - base) // L
    bitmap = stream[SASS_CONST_BITS:base].view(np.bool_)
    rec = stream[base:nbits].reshape(k, L)
    eog = rec[:, L - 1]
    nonempty = np.flatnonzero(bitmap)
    if int(eog.sum()) != nonempty.size or (k and not eog[-1]):
        raise ValueError(f"{int(eog.sum())} end-of-group flags for {nonempty.size} non-empty groups")
    if ib == 0:  # c = 1: every non-empty group is one entry, the bitmap is the mask
        if k != nonempty.size:
            raise ValueError(f"{k} records for {nonempty.size} non-empty groups of size 1")
        mask = bitmap
    else:
        # group of record j = the number of end-of-group flags before it; with the
        # flag positions `ends`, group i covers records (ends[i-1], ends[i]].
        ends = np.flatnonzero(eog.view(np.bool_))  # (on bools: ten times faster than on uint8)
        sizes = np.diff(ends, prepend=-1)
        local = _bits_to_codes(rec[:, :ib])
        if k and int(local.max()) >= c:
            raise ValueError("in-group index out of range")
        # positions increase strictly iff in-group indices do within each group (a later
        # group starts at least c past the earlier one, and local < c)
        if k > 1 and not ((local[1:] > local[:-1]) | eog[:-1].view(np.bool_)).all():
            raise ValueError("in-group indices are not strictly increasing")
        idx = np.repeat(nonempty * c, sizes)
        idx += local
        mask = np.zeros(n, dtype=np.bool_)
        mask[idx] = True
    codes = _bits_to_codes(rec[:, ib:ib + bits])
    return mask, codes, c


def _sass_decode_fast(kern, payload: bytes, nbits: int, n: int, bits: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """:func:`sass_decode` by the compiled record reader; None when the stream fails any of
    its checks (the numpy path then says which)."""
    if len(payload) != (nbits + 7) // 8 or not _padding_is_zero(payload, nbits):
        return None
    head = int.from_bytes(bytes(payload[:5]), "little")
    groups, c = head & ((1 << SASS_COUNT_BITS) - 1), ((head >> SASS_COUNT_BITS) & 0xFF) + 1
    ib = _ceil_log2(c)
    L = ib + bits + 1
    base = SASS_CONST_BITS + groups
    if groups * c != n or nbits < base or (nbits - base) % L:
        return None
    k = (nbits - base) // L
    data = np.zeros(len(payload) + 8, dtype=np.uint8)
    data[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    nonempty = np.flatnonzero(np.unpackbits(data, count=base, bitorder="little")[SASS_CONST_BITS:].view(np.bool_))
    mask = np.zeros(n, dtype=np.bool_)
    codes = np.empty(k, dtype=np.uint8)
    if kern.sass_read(data, base, k, c, ib, int(bits), nonempty, mask, codes):
        return None
    return mask, codes, c


# --------------------------------------------------------------------------- the ans format


ANS_LAYOUT = 1            # version byte at the start of every ans payload
ANS_MAX_BUCKETS_LOG2 = 4  # up to 16 keep-rate buckets of lines
_RATE_ONE = 65535         # a bucket's keep rate is stored as u16: p = q / 65535 (0 and 1 exact)
_FREQ_MAX = 65535         # value-code frequencies are stored as u16
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
_ANS_FLAG_COLUMNS, _ANS_FLAG_RAW_VALUES = 1, 1 << 4
_U32 = np.dtype("<u4")


def _constriction():
    try:
        import constriction
    except ImportError:  # a core dependency; a broken install is worth one clear line
        raise ImportError("the ans codec needs the 'constriction' package: pip install constriction") from None
    return constriction.stream


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view the ans mask model reads: (shape[0], rest) for a matrix or more, (1, n) for a
    vector (and for a column, (n, 1), whose rows would be one bit each)."""
    n = int(math.prod(shape))
    if len(shape) >= 2 and shape[0] > 0 and n // int(shape[0]) > 1:
        return int(shape[0]), n // int(shape[0])
    return 1, n


def _xlog2(k: np.ndarray, p: np.ndarray) -> np.ndarray:
    """-k log2 p with 0 log 0 = 0 (elementwise)."""
    k = np.asarray(k, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, -k * np.log2(np.where(p > 0, p, 1.0)), 0.0)


def _bernoulli_bits(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Empirical entropy in bits of ``k`` ones among ``n`` binary symbols (elementwise)."""
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    p = np.divide(k, n, out=np.zeros_like(n), where=n > 0)
    return _xlog2(k, p) + _xlog2(n - k, 1.0 - p)


def _quantised_rate(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Keep rates as u16 numerators of 65535; exactly 0 or 65535 only for an all-zero or all-one bucket."""
    q = np.rint(np.divide(k, np.maximum(n, 1)) * _RATE_ONE)
    q = np.clip(q, 1, _RATE_ONE - 1)
    q = np.where(k == 0, 0, np.where(k == n, _RATE_ONE, q))
    return q.astype(np.uint16)


def _mask_model(mask2d: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The cheapest mask model: orientation (0: rows, 1: columns), the bucket of every line
    and the u16 keep rate of every bucket. Lines (rows or columns) are sorted by keep rate and
    cut into 2^j equal-count buckets (j = 0..4); the cost of each candidate is its exact code
    length under the quantised bucket rates (with the zero bits that pad each line to whole
    bytes) plus the bucket indices and rates it stores."""
    best = None
    kern = _kernels()
    counts = kern.line_counts(np.ascontiguousarray(mask2d)) if kern is not None else None
    for orient, axis in ((0, 1), (1, 0)):
        k = counts[orient] if counts is not None else np.count_nonzero(mask2d, axis=axis)
        width = mask2d.shape[axis]
        lines = k.size
        order = np.argsort(k, kind="stable")
        for j in range(ANS_MAX_BUCKETS_LOG2 + 1):
            buckets = 1 << j
            if buckets > lines or (j and width == 0):
                break
            bucket = np.empty(lines, dtype=np.int64)
            bucket[order] = np.arange(lines) * buckets // lines
            kb = np.bincount(bucket, weights=k, minlength=buckets)
            nb = np.bincount(bucket, minlength=buckets).astype(np.float64) * width
            p = _quantised_rate(kb, nb).astype(np.float64) / _RATE_ONE
            pad = np.bincount(bucket, minlength=buckets).astype(np.float64) * ((-width) % 8)
            cost = float((_xlog2(kb, p) + _xlog2(nb - kb + pad, 1.0 - p)).sum()) + lines * j + 16 * buckets
            if best is None or cost < best[0]:
                best = (cost, orient, bucket.astype(np.uint8), _quantised_rate(kb, nb))
        if mask2d.shape[0] == 1 or mask2d.shape[1] == 1:
            break  # a vector: one orientation
    return best[1], best[2], best[3]


def _byte_probs(q: int) -> np.ndarray:
    """Probabilities of a byte of 8 i.i.d. Bernoulli(q / 65535) bits, P(s) = p^pop(s) (1-p)^(8-pop(s)).
    Built with IEEE multiplications only, so encoder and decoder get the same table on every machine."""
    p = q / _RATE_ONE
    ones, zeros = [1.0], [1.0]
    for _ in range(8):
        ones.append(ones[-1] * p)
        zeros.append(zeros[-1] * (1.0 - p))
    return np.array(ones)[_POPCOUNT] * np.array(zeros)[8 - _POPCOUNT]



def _codes_per_symbol(bits: int) -> int:
    """b in {1, 2, 4}: 8 / b codes share one byte symbol (a product model); otherwise one code per symbol."""
    return 8 // bits if bits < 8 and 8 % bits == 0 else 1


def _value_probs(freq: np.ndarray, bits: int) -> np.ndarray:
    """Probabilities of one value symbol: ``8 / b`` codes of probability freq / sum(freq)
    (a product, by IEEE multiplications) for b in {1, 2, 4}, one code otherwise."""
    prob = freq.astype(np.float64) / float(freq.sum())
    g = _codes_per_symbol(bits)
    if g == 1:
        return prob
    sym = np.arange(256)
    lowmask = (1 << bits) - 1
    probs = prob[sym & lowmask]
    for i in range(1, g):
        probs = probs * prob[(sym >> (i * bits)) & lowmask]
    return probs



class _AnsEncoder:
    """constriction's AnsCoder (encode_reverse with a Categorical(perfect=False) model, then
    get_compressed), or the compiled coder of :mod:`mergebench._codec_kernels` that writes the
    same words."""

    def __init__(self, capacity: int):
        self.kern = _kernels()
        if self.kern is not None:
            self.state = np.zeros(1, dtype=np.uint64)
            self.words = np.empty(capacity + 2, dtype=np.uint32)
            self.n_words = 0
        else:
            self.coder = _constriction().stack.AnsCoder()

    def encode_reverse(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        if self.kern is not None:
            self.n_words = self.kern.ans_encode(np.ascontiguousarray(symbols, dtype=np.uint8),
                                                self.kern.categorical_cdf(probs), self.state, self.words, self.n_words)
        else:
            self.coder.encode_reverse(np.asarray(symbols, dtype=np.int32),
                                      _constriction().model.Categorical(probs, perfect=False))

    def get_compressed(self) -> np.ndarray:
        if self.kern is not None:
            return self.kern.ans_finish(self.state, self.words, self.n_words)
        return self.coder.get_compressed()


class _AnsDecoder:
    """The decoding side of :class:`_AnsEncoder`."""

    def __init__(self, words: np.ndarray):
        self.kern = _kernels()
        if self.kern is not None:
            self.words = words
            self.state, self.pos = self.kern.ans_start(words)
        else:
            self.coder = _constriction().stack.AnsCoder(words)

    def decode(self, probs: np.ndarray, count: int) -> np.ndarray:
        """``count`` symbols (uint8) under the categorical model of ``probs``."""
        if self.kern is not None:
            cdf = self.kern.categorical_cdf(probs)
            out = np.empty(count, dtype=np.uint8)
            self.pos = self.kern.ans_decode(self.words, self.pos, self.state, cdf, self.kern.decoder_table(cdf), out)
            return out
        return self.coder.decode(_constriction().model.Categorical(probs, perfect=False), count).astype(np.uint8)

    def is_empty(self) -> bool:
        return bool(self.state[0] == 0) if self.kern is not None else self.coder.is_empty()


def _value_symbols(codes: np.ndarray, bits: int) -> np.ndarray:
    g = _codes_per_symbol(bits)
    if g == 1:
        return codes
    return np.frombuffer(pack_codes(codes, bits), dtype=np.uint8)


def _quantised_freq(counts: np.ndarray) -> np.ndarray:
    """Code counts scaled to at most 65535 (every used code keeps a frequency >= 1)."""
    counts = counts.astype(np.float64)
    scale = min(1.0, _FREQ_MAX / counts.max())
    return np.where(counts > 0, np.maximum(1, np.rint(counts * scale)), 0).astype(np.uint16)


def ans_encode(mask: np.ndarray, codes: np.ndarray, shape: tuple[int, ...], bits: int) -> bytes:
    """The ans payload: the mask and the b-bit value codes entropy-coded with one
    asymmetric-numeral-systems stack (``constriction``'s AnsCoder, 32-bit words).

    Layout (bytes, little endian): layout version (u8); flags (u8: bit 0 lines are
    columns, bits 1-3 log2 of the number of mask buckets B, bit 4 values stored raw);
    B u16 keep rates (p = q / 65535); if B > 1, the bucket of every line as packed
    log2(B)-bit codes; unless raw, the value model: a 2^b-bit presence bitmap and a u16
    frequency per present code; u32 number of ANS words; the words; if raw, the codes
    packed at b bits (:func:`pack_codes`).

    Mask model: the tensor seen as a matrix (:func:`_grid`), its rows or columns
    ("lines") in B keep-rate buckets, each line's bits in bytes (zero padded to a whole
    byte) coded with the product Bernoulli model of its bucket; a bucket of rate 0 or
    1 codes nothing. B = 1 is the i.i.d. model; the encoder keeps the cheapest
    (:func:`_mask_model`). Values: the kept entries' codes in row-major order, i.i.d.
    under their stored frequencies, 8 / b codes per symbol for b in {1, 2, 4} (the last
    symbol zero padded); stored raw when that is no larger.
    """
    n = mask.size
    rows, cols = _grid(shape)
    out = [bytes([ANS_LAYOUT])]
    if n == 0:
        out += [bytes([_ANS_FLAG_RAW_VALUES]), np.zeros(1, _U32).tobytes()]
        return b"".join(out)
    m2 = mask.reshape(rows, cols)
    orient, bucket, rates = _mask_model(m2)
    lines = m2 if orient == 0 else m2.T
    j = int(rates.size).bit_length() - 1
    k = codes.size
    raw, freq = True, None
    if k:
        kern = _kernels()
        counts = kern.histogram(codes, 1 << bits) if kern is not None else np.bincount(codes, minlength=1 << bits)
        freq = _quantised_freq(counts)
        coded = float(_xlog2(counts, freq / float(freq.sum())).sum()) + (1 << bits) + 16 * np.count_nonzero(freq)
        raw = coded >= k * bits
    flags = (_ANS_FLAG_COLUMNS if orient else 0) | (j << 1) | (_ANS_FLAG_RAW_VALUES if raw else 0)
    out += [bytes([flags]), rates.astype("<u2").tobytes()]
    if j:
        out.append(pack_codes(bucket, j))
    if not raw:
        out += [pack_bits(freq > 0), freq[freq > 0].astype("<u2").tobytes()]
    packed = np.packbits(lines, axis=1, bitorder="little")
    values = None if raw else _value_symbols(codes, bits)
    coder = _AnsEncoder(packed.size + (0 if raw else values.size))
    if not raw:
        coder.encode_reverse(values, _value_probs(freq, bits))
    for b in range(rates.size - 1, -1, -1):  # a stack: the first bucket is encoded last, decoded first
        if 0 < rates[b] < _RATE_ONE:
            coder.encode_reverse(packed.reshape(-1) if rates.size == 1 else packed[bucket == b].ravel(),
                                 _byte_probs(int(rates[b])))
    words = coder.get_compressed()
    out += [np.array([words.size], _U32).tobytes(), words.astype(_U32).tobytes()]
    if raw:
        out.append(pack_codes(codes, bits))
    return b"".join(out)


def ans_decode(payload: bytes, shape: tuple[int, ...], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`ans_encode` -> (mask, codes); ValueError on an inconsistent payload."""
    data = memoryview(payload)
    n = int(math.prod(shape))
    rows, cols = _grid(shape)
    pos = 0

    def take(size: int, what: str) -> memoryview:
        nonlocal pos
        if pos + size > len(data):
            raise ValueError(f"ans payload of {len(data)} bytes is cut off in its {what}")
        pos += size
        return data[pos - size:pos]

    if take(1, "layout")[0] != ANS_LAYOUT:
        raise ValueError(f"unknown ans payload layout {data[0]} (this reader: {ANS_LAYOUT})")
    flags = take(1, "flags")[0]
    j = (flags >> 1) & 7
    if flags & ~(_ANS_FLAG_COLUMNS | (7 << 1) | _ANS_FLAG_RAW_VALUES) or j > ANS_MAX_BUCKETS_LOG2:
        raise ValueError(f"bad ans flags {flags:#x}")
    raw = bool(flags & _ANS_FLAG_RAW_VALUES)
    if n == 0:
        if flags != _ANS_FLAG_RAW_VALUES or bytes(take(4, "word count")) != bytes(4) or pos != len(data):
            raise ValueError("ans payload of an empty tensor is not empty")
        return np.zeros(0, dtype=np.bool_), np.zeros(0, dtype=np.uint8)
    orient = flags & _ANS_FLAG_COLUMNS
    n_lines, width = (rows, cols) if orient == 0 else (cols, rows)
    if orient and (rows == 1 or cols == 1):
        raise ValueError("ans payload orders the lines of a vector by columns")
    buckets = 1 << j
    if buckets > n_lines:
        raise ValueError(f"{buckets} mask buckets for {n_lines} lines")
    rates = np.frombuffer(take(2 * buckets, "keep rates"), dtype="<u2")
    bucket = (unpack_codes(bytes(take(-(-n_lines * j // 8), "line buckets")), j, n_lines) if j
              else np.zeros(n_lines, dtype=np.uint8))
    if int(bucket.max()) >= buckets:
        raise ValueError("a line's mask bucket is out of range")
    freq = None
    if not raw:
        present = unpack_bits(bytes(take(-(-(1 << bits) // 8), "value model")), 1 << bits).astype(np.bool_)
        freq = np.zeros(1 << bits, dtype=np.uint16)
        freq[present] = np.frombuffer(take(2 * int(present.sum()), "value model"), dtype="<u2")
        if not present.any() or not (freq[present] > 0).all():
            raise ValueError("ans value model has no code or a zero frequency")
    n_words = int(np.frombuffer(take(4, "word count"), dtype=_U32)[0])
    words = np.frombuffer(take(4 * n_words, "ANS words"), dtype=_U32).astype(np.uint32)
    coder = _AnsDecoder(words)
    nbytes = -(-width // 8)
    packed = np.zeros((n_lines, nbytes), dtype=np.uint8)
    ones = np.zeros(n_lines, dtype=np.bool_)
    for b in range(buckets):
        sel = bucket == b
        if rates[b] == _RATE_ONE:
            ones |= sel
        elif rates[b]:
            count = int(sel.sum()) * nbytes
            symbols = coder.decode(_byte_probs(int(rates[b])), count).reshape(-1, nbytes)
            if buckets == 1:
                packed = symbols
            else:
                packed[sel] = symbols
    if width % 8 and (packed[:, -1] >> (width % 8)).any():
        raise ValueError("non-zero padding bits in the ans mask")
    lines = np.unpackbits(packed, axis=1, count=width, bitorder="little").view(np.bool_)
    lines[ones] = True
    mask = np.ascontiguousarray(lines if orient == 0 else lines.T).reshape(-1)
    k = int(np.count_nonzero(mask))
    if raw:
        if not coder.is_empty():
            raise ValueError("ans stream holds more than its mask")
        raw_bytes = bytes(take(-(-k * bits // 8), "raw values"))
        codes = unpack_codes(raw_bytes, bits, k)
        if not _padding_is_zero(raw_bytes, k * bits):
            raise ValueError("non-zero padding bits after the raw ans values")
    else:
        if k == 0:
            raise ValueError("ans value model stored for an empty mask")
        g = _codes_per_symbol(bits)
        symbols = coder.decode(_value_probs(freq, bits), -(-k // g))
        if g == 1:
            codes = symbols
        else:
            codes = unpack_codes(symbols.tobytes(), bits, -(-k // g) * g)
            if codes[k:].any():
                raise ValueError("non-zero padding codes after the ans values")
            codes = codes[:k].copy()
        if not coder.is_empty():
            raise ValueError("ans stream does not end after its values")
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} unexpected bytes after the ans payload")
    return mask, codes


def encode_payload(ct: CompressedTensor) -> tuple[bytes, int]:
    """The packed payload of one tensor and its exact bit length."""
    if ct.fmt == "ans":
        nbits = ct.payload_bits  # encodes once
        return ct._ans_payload, nbits
    if ct.fmt == "sass":
        data, nbits = sass_encode(ct.mask, ct.codes, ct.bits, ct.group_size)
    elif ct.fmt == "tswitch":
        stream = np.concatenate([ct.mask.view(np.uint8), ct.codes])
        data, nbits = pack_bits(stream), int(stream.size)
    else:  # indep
        full = np.zeros(ct.n, dtype=np.uint8)
        full[np.flatnonzero(ct.mask)] = ct.codes
        if ct.n % 8 == 0:  # byte-aligned blocks: pack each block on its own
            data = pack_bits(ct.mask) + pack_codes(full, ct.bits)
        else:
            data = pack_bits(np.concatenate([ct.mask.view(np.uint8), _codes_to_bits(full, ct.bits).ravel()]))
        nbits = indep_bits(ct.n, ct.bits)
    if nbits != ct.payload_bits:  # internal consistency (cheap)
        raise AssertionError(f"payload is {nbits} bits, expected {ct.payload_bits}")
    return data, nbits


def decode_payload(data: bytes, nbits: int, *, shape: tuple[int, ...], fmt: str, bits: int, quant: str,
                   params: dict[str, float], dtype: str = "float32") -> CompressedTensor:
    """Inverse of :func:`encode_payload`; ValueError when the payload is inconsistent."""
    n = int(math.prod(shape))
    if len(data) != (nbits + 7) // 8:
        raise ValueError(f"payload of {len(data)} bytes for {nbits} bits")
    if fmt == "sass":
        mask, codes, c = sass_decode(data, nbits, n, bits)
        expected = choose_group_size(n, 1.0 - np.count_nonzero(mask) / n if n else 1.0)
        if c != expected:
            raise ValueError(f"SASS stream uses group size {c}, Eq. 17 gives {expected}")
    elif fmt == "tswitch":
        if nbits < n:
            raise ValueError(f"tswitch payload of {nbits} bits is shorter than its {n}-bit mask")
        if not _padding_is_zero(data, nbits):
            raise ValueError("non-zero padding bits")
        stream = unpack_bits(data, nbits)
        mask = stream[:n].view(np.bool_)
        codes = stream[n:nbits]
        if codes.size != int(np.count_nonzero(mask)):
            raise ValueError(f"{codes.size} sign bits for {int(np.count_nonzero(mask))} kept entries")
    elif fmt == "ans":
        if nbits != 8 * len(data):
            raise ValueError(f"ans payload of {len(data)} bytes declared as {nbits} bits")
        mask, codes = ans_decode(bytes(data), tuple(shape), bits)
    elif fmt == "indep":
        if nbits != indep_bits(n, bits):
            raise ValueError(f"indep payload is {nbits} bits, expected {(bits + 1) * n}")
        if n % 8 == 0:
            mask = unpack_bits(data[: n // 8]).view(np.bool_)
            full = unpack_codes(data[n // 8:], bits, n)
        else:
            stream = unpack_bits(data)
            mask = stream[:n].view(np.bool_)
            full = _bits_to_codes(stream[n:nbits].reshape(n, bits))
        if not _padding_is_zero(data, nbits):
            raise ValueError("non-zero padding bits")
        codes = np.compress(mask, full)
        if np.count_nonzero(full) != np.count_nonzero(codes):
            raise ValueError("non-zero value codes at masked-out entries")
    else:
        raise ValueError(f"unknown codec format {fmt!r}")
    return CompressedTensor(tuple(shape), fmt, bits, mask, codes, quant, params, dtype)


def _padding_is_zero(data: bytes, nbits: int) -> bool:
    r = nbits % 8
    return r == 0 or (data[-1] >> r) == 0


# --------------------------------------------------------------------------- the container

_CONTAINER_NAMES = ("MAGIC", "CONTAINER_VERSION", "encode_tensors", "decode_tensors", "write_artifact", "read_artifact")


def __getattr__(name: str) -> Any:
    """The container that stores these payloads is :mod:`mergebench.container`; its names stay
    importable from here, looked up on first use because that module imports this one."""
    if name in _CONTAINER_NAMES:
        from mergebench import container

        return getattr(container, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
