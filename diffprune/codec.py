"""Bit-level codecs of the v2 diff file: positions (Golomb-Rice gaps or a bitmap) and values (fp32,
bf16, fp16, int8 with per-block fp32 scales).

Everything here is vectorised numpy (``np.packbits``/``np.unpackbits``, ``np.flatnonzero``,
``cumsum``, shifts): there is no Python loop per entry, only loops over at most 8 bytes of a
field. Decoders validate their input against the sizes of the stored byte arrays *before*
allocating anything larger than those arrays, and raise `CodecError` on anything malformed.

Positions of one tensor (n entries, k sorted unique flat positions), one of

* ``"rice"``: the gaps ``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1`` are Golomb-Rice coded with a
  parameter R: the R low bits of every gap packed LSB-first into ``low`` (ceil(k R / 8) bytes),
  and the quotients ``g >> R`` in unary (q zeros then a one) in ``high`` (``bits`` bits). For a
  random mask of density p this is within a few hundredths of a bit per nonzero of
  log2 C(n, k) / k (the gaps are geometric, for which Golomb codes are optimal).
* ``"rice_complement"``: the same code over the n - k *zero* positions (dense tensors).
* ``"bitmap"``: n bits, LSB-first (when it is the smallest).
* ``"all"``: k == n, nothing stored.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_ENTRIES = 2**48
"""Largest number of entries of one tensor a diff file may describe (keeps every shift in int64)."""
MAX_RICE_R = 48

VALUE_DTYPES = ("fp32", "bf16", "fp16", "int8")
VALUE_ALIASES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
                 "fp16": "fp16", "half": "fp16", "int8": "int8"}
TORCH_VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
VALUE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8}
INT8_BLOCK = 4096
"""Values per fp32 scale of the int8 value encoding (symmetric absmax per block)."""


class CodecError(ValueError):
    """Malformed coded data (turned into `DiffFileError` by the file reader)."""


def position_bound_bits(n: int, k: int) -> float:
    """log2 C(n, k): the fewest bits that can name k positions out of n (0 when k is 0 or n)."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def normalize_value_dtype(value_dtype) -> str:
    if isinstance(value_dtype, torch.dtype):
        value_dtype = {v: k for k, v in TORCH_VALUE_DTYPES.items()}.get(value_dtype, str(value_dtype))
    name = VALUE_ALIASES.get(str(value_dtype).lower()) if value_dtype is not None else None
    if name is None:
        raise ValueError(f"value_dtype {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    return name


# ---- Golomb-Rice ---------------------------------------------------------------------------------
def _rice_bits(u: np.ndarray, r: int) -> int:
    return int(u.shape[0]) * (r + 1) + int((u >> r).sum())


def best_rice_parameter(u: np.ndarray) -> int:
    """The R in 0..MAX_RICE_R that codes the non-negative integers `u` in the fewest bits."""
    m = u.shape[0]
    if m == 0:
        return 0
    mean = float(u.mean())
    guess = int(math.floor(math.log2(mean * math.log(2)))) if mean > 1 else 0
    cands = range(max(0, guess - 2), min(MAX_RICE_R, guess + 3) + 1)
    return min(cands, key=lambda r: (_rice_bits(u, r), r))


def rice_encode(u: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Non-negative int64 `u` -> (low bytes, unary high bytes, number of high bits)."""
    u = np.ascontiguousarray(u, dtype=np.int64)
    m = u.shape[0]
    q = u >> r
    ones = np.cumsum(q + 1) - 1  # the terminating one of each unary quotient
    nbits = int(ones[-1]) + 1 if m else 0
    bits = np.zeros(nbits, dtype=np.uint8)
    bits[ones] = 1
    high = np.packbits(bits, bitorder="little")
    if r and m:
        low = u & ((1 << r) - 1)
        mat = ((low[:, None] >> np.arange(r, dtype=np.int64)) & 1).astype(np.uint8)
        lowb = np.packbits(mat.reshape(-1), bitorder="little")
    else:
        lowb = np.zeros(0, dtype=np.uint8)
    return lowb, high, nbits


def rice_sizes_ok(low: np.ndarray, high: np.ndarray, m: int, r: int, nbits: int) -> None:
    """Raise CodecError unless the byte arrays have exactly the sizes (m, r, nbits) imply."""
    if not (isinstance(r, int) and 0 <= r <= MAX_RICE_R):
        raise CodecError(f"Rice parameter {r!r} out of range 0..{MAX_RICE_R}")
    if not (isinstance(m, int) and isinstance(nbits, int) and 0 <= m <= nbits):
        raise CodecError(f"bad Rice counts (values {m!r}, bits {nbits!r})")
    if low.shape[0] != (m * r + 7) // 8:
        raise CodecError(f"low-bit array has {low.shape[0]} bytes, {(m * r + 7) // 8} expected")
    if high.shape[0] != (nbits + 7) // 8:
        raise CodecError(f"unary array has {high.shape[0]} bytes, {(nbits + 7) // 8} expected")


def _gather_bits(low: np.ndarray, m: int, r: int) -> np.ndarray:
    """The m r-bit fields packed LSB-first in `low`, as int64 (r <= 48)."""
    off = np.arange(m, dtype=np.int64) * r
    byte = off >> 3
    shift = (off & 7).astype(np.uint64)
    buf = np.concatenate([low, np.zeros(8, dtype=np.uint8)])
    nb = (r + 7 + 7) // 8
    acc = buf[byte].astype(np.uint64)
    for j in range(1, nb):
        acc |= buf[byte + j].astype(np.uint64) << np.uint64(8 * j)
    acc >>= shift
    acc &= np.uint64((1 << r) - 1)
    return acc.view(np.int64)


def rice_decode(low: np.ndarray, high: np.ndarray, m: int, r: int, nbits: int) -> np.ndarray:
    rice_sizes_ok(low, high, m, r, nbits)
    if m == 0:
        if high.any():
            raise CodecError("unary array has set bits but codes no value")
        return np.zeros(0, dtype=np.int64)
    ones = np.nonzero(np.unpackbits(high, bitorder="little").view(bool))[0]  # ~8x faster than on uint8
    if ones.shape[0] != m or ones[-1] != nbits - 1:
        raise CodecError(f"unary array codes {ones.shape[0]} values (or has stray bits), {m} expected")
    q = np.diff(ones, prepend=-1)
    q -= 1
    if r == 0:
        return q
    if int(q[-1] if m == 1 else q.max()) >= 1 << (62 - r):
        raise CodecError("Rice quotient overflows")
    q <<= r
    q |= _gather_bits(low, m, r)
    return q


# ---- positions ----------------------------------------------------------------------------------
def _gaps(pos: np.ndarray) -> np.ndarray:
    g = np.diff(pos, prepend=-1)
    g -= 1
    return g


def encode_positions(pos: np.ndarray, n: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Sorted unique int64 positions in [0, n) -> (header entry, {suffix: uint8 array}), smallest codec."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    k = pos.shape[0]
    if k == n:
        return {"codec": "all"}, {}
    def rice_bytes(u: np.ndarray, r: int) -> int:
        return (u.shape[0] * r + 7) // 8 + (_rice_bits(u, r) - u.shape[0] * r + 7) // 8

    g = _gaps(pos)
    r = best_rice_parameter(g)
    options = [(rice_bytes(g, r), 0, "rice", r)]
    zpos = None
    if 2 * k > n:
        keep = np.ones(n, dtype=bool)
        keep[pos] = False
        zpos = np.flatnonzero(keep)
        gz = _gaps(zpos)
        rz = best_rice_parameter(gz)
        options.append((rice_bytes(gz, rz), 1, "rice_complement", rz))
    options.append(((n + 7) // 8, 2, "bitmap", 0))
    _, _, codec, r = min(options)
    if codec == "bitmap":
        bits = np.zeros(n, dtype=np.uint8)
        bits[pos] = 1
        return {"codec": "bitmap"}, {"bitmap": np.packbits(bits, bitorder="little")}
    src = pos if codec == "rice" else zpos
    low, high, nbits = rice_encode(_gaps(src), r)
    return {"codec": codec, "r": r, "count": int(src.shape[0]), "bits": nbits}, {"low": low, "high": high}


POSITION_ARRAYS = {"all": (), "bitmap": ("bitmap",), "rice": ("low", "high"), "rice_complement": ("low", "high")}


def check_position_sizes(entry: dict, arrays: dict[str, np.ndarray], n: int, k: int) -> None:
    """Validate an entry against its arrays' sizes before decoding (no allocation)."""
    codec = entry.get("codec")
    if codec not in POSITION_ARRAYS:
        raise CodecError(f"unknown position codec {codec!r}")
    if set(arrays) != set(POSITION_ARRAYS[codec]):
        raise CodecError(f"position codec {codec!r} needs arrays {POSITION_ARRAYS[codec]}, found {sorted(arrays)}")
    if codec == "all":
        if k != n:
            raise CodecError(f"codec 'all' with {k} nonzeros of {n}")
    elif codec == "bitmap":
        if arrays["bitmap"].shape[0] != (n + 7) // 8:
            raise CodecError(f"bitmap has {arrays['bitmap'].shape[0]} bytes, {(n + 7) // 8} expected for {n} entries")
    else:
        m = entry.get("count")
        expected = k if codec == "rice" else n - k
        if m != expected or isinstance(m, bool):
            raise CodecError(f"position codec {codec!r} codes {m!r} positions, {expected} expected")
        rice_sizes_ok(arrays["low"], arrays["high"], m, entry.get("r"), entry.get("bits"))


def _positions_from_gaps(g: np.ndarray, n: int) -> np.ndarray:
    if g.shape[0] and (int(g.max()) >= n):
        raise CodecError("position gap out of range")
    g += 1
    pos = np.cumsum(g, out=g)
    pos -= 1
    if pos.shape[0] and (int(pos[-1]) >= n or int(pos[0]) < 0 or (pos.shape[0] > 1 and not (pos[1:] > pos[:-1]).all())):
        raise CodecError("positions out of range or not increasing")
    return pos


def decode_positions(entry: dict, arrays: dict[str, np.ndarray], n: int, k: int, trusted: bool = False) -> np.ndarray:
    """The int64 positions; raises CodecError on malformed input (sizes are checked first).

    ``trusted=True`` (input already validated by a full decode) skips the O(k) checks."""
    codec = entry["codec"] if trusted else None
    if not trusted:
        check_position_sizes(entry, arrays, n, k)
        codec = entry["codec"]
    if codec == "rice" and trusted:
        return _rice_positions_fast(arrays["low"], arrays["high"], k, entry["r"])
    if codec == "all":
        return np.arange(n, dtype=np.int64)
    if codec == "bitmap":
        bits = np.unpackbits(arrays["bitmap"], bitorder="little")
        if bits[n:].any():
            raise CodecError("bitmap has bits set past the tensor's end")
        pos = np.nonzero(bits[:n].view(bool))[0]
        if pos.shape[0] != k:
            raise CodecError(f"bitmap has {pos.shape[0]} set bits, {k} expected")
        return pos.astype(np.int64, copy=False)
    g = rice_decode(arrays["low"], arrays["high"], entry["count"], entry["r"], entry["bits"])
    pos = _positions_from_gaps(g, n)
    if codec == "rice":
        return pos
    keep = np.ones(n, dtype=bool)
    keep[pos] = False
    out = np.flatnonzero(keep)
    if out.shape[0] != k:
        raise CodecError("complement positions inconsistent")
    return out.astype(np.int64, copy=False)


_ARANGE = np.arange(0, dtype=np.int64)


def _arange(m: int) -> np.ndarray:
    """arange(m) as a read-only view of a shared buffer (grown to the largest m asked for)."""
    global _ARANGE
    if _ARANGE.shape[0] < m:
        _ARANGE = np.arange(max(m, 2 * _ARANGE.shape[0]), dtype=np.int64)
        _ARANGE.flags.writeable = False
    return _ARANGE[:m]


def _low_bits(low: np.ndarray, off: np.ndarray, r: int) -> np.ndarray:
    """The r-bit fields starting at bit offsets `off` of the LSB-first byte array `low` (int64; `off`
    is consumed). At most (r + 14) // 8 byte gathers, no loop per entry."""
    byte = off >> 3
    acc = np.take(low, byte, mode="clip").astype(np.int64)
    for j in range(1, (r + 14) // 8):
        byte += 1
        acc |= np.take(low, byte, mode="clip").astype(np.int64) << (8 * j)
    off &= 7
    acc >>= off
    acc &= (1 << r) - 1
    return acc


def _rice_positions_fast(low: np.ndarray, high: np.ndarray, m: int, r: int) -> np.ndarray:
    """Positions from a validated "rice" stream, in few numpy passes:
    p_i = ((ones_i - i) << r) + sum_{j<=i} low_j + i, where ones_i is the i-th set unary bit."""
    ones = np.nonzero(np.unpackbits(high, bitorder="little").view(bool))[0]  # ~8x faster than on uint8
    if ones.shape[0] != m:
        raise CodecError(f"unary array codes {ones.shape[0]} values, {m} expected")
    ar = _arange(m)
    pos = ones
    if r:
        pos -= ar
        pos <<= r
        acc = _low_bits(low, ar * r, r)
        pos += np.cumsum(acc, out=acc)
        pos += ar
    return pos


def decode_rice_batch(streams: list[tuple[np.ndarray, np.ndarray, int]], r: int) -> list[np.ndarray]:
    """Positions of several validated "rice" streams (low, high, count) with the same parameter r,
    decoded together in one set of numpy passes (per-call overhead dominates small tensors)."""
    if len(streams) == 1:
        low, high, m = streams[0]
        return [_rice_positions_fast(low, high, m, r)]
    ms = np.array([m for _, _, m in streams], dtype=np.int64)
    total = int(ms.sum())
    hbytes = np.array([h.shape[0] for _, h, _ in streams], dtype=np.int64)
    ones = np.nonzero(np.unpackbits(np.concatenate([h for _, h, _ in streams]), bitorder="little").view(bool))[0]
    if ones.shape[0] != total:
        raise CodecError(f"unary arrays code {ones.shape[0]} values, {total} expected")
    starts = np.cumsum(ms) - ms
    local = _arange(total) - np.repeat(starts, ms)  # index within its own stream
    ones -= np.repeat(8 * (np.cumsum(hbytes) - hbytes), ms)
    pos = ones
    if r:
        lbytes = np.array([lo.shape[0] for lo, _, _ in streams], dtype=np.int64)
        low = np.concatenate([lo for lo, _, _ in streams])
        pos -= local
        pos <<= r
        off = local * r
        off += np.repeat(8 * (np.cumsum(lbytes) - lbytes), ms)
        acc = _low_bits(low, off, r)
        cs = np.cumsum(acc, out=acc)
        before = np.zeros(len(streams), dtype=np.int64)
        before[1:] = cs[starts[1:] - 1]
        cs -= np.repeat(before, ms)
        pos += cs
        pos += local
    return np.split(pos, np.cumsum(ms)[:-1])


def position_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(a.shape[0]) for a in arrays.values())


# ---- values -------------------------------------------------------------------------------------
# (integer view dtype, exponent bits, mantissa bits) of the float value dtypes
_FLOAT_LAYOUT = {"fp32": (torch.int32, 8, 23), "bf16": (torch.int16, 8, 7), "fp16": (torch.int16, 5, 10)}
VALUE_ARRAYS = {"raw": ("values",), "exp_rice": ("val_sm", "val_exp_low", "val_exp_high"),
                "zigzag_rice": ("val_low", "val_high")}
"""Tensors of each value coding (int8 adds ``scales``). ``raw``: the values in their dtype.
``exp_rice`` (floats): sign and mantissa bits packed raw (``val_sm``), the exponents' differences
from a reference exponent (``eref``, their median) zigzagged and Golomb-Rice coded (diff values span few exponents: ~3.4 bits instead of 8 for
bf16). ``zigzag_rice`` (int8): the zigzagged integers Golomb-Rice coded. Lossless either way; the
smallest is written."""


def pack_fields(u: np.ndarray, w: int) -> np.ndarray:
    """Non-negative int64 values of w bits each, packed LSB-first."""
    if w == 0 or u.shape[0] == 0:
        return np.zeros(0, dtype=np.uint8)
    mat = ((u[:, None] >> np.arange(w, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(mat.reshape(-1), bitorder="little")


def _quantize_int8(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not bool(torch.isfinite(v).all()):
        raise ValueError("diff values are not finite: int8 quantisation needs finite values (use fp32)")
    k = v.numel()
    nblocks = (k + block - 1) // block
    padded = torch.zeros(nblocks * block, dtype=torch.float32)
    padded[:k] = v
    blocks = padded.view(nblocks, block)
    scales = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:k]
    return q.contiguous(), scales.contiguous()


def encode_values(values: torch.Tensor, value_dtype: str, block: int = INT8_BLOCK) -> tuple[dict, dict[str, torch.Tensor]]:
    """fp32 values -> (header entry, {suffix: tensor}), the smallest lossless coding of the values
    rounded to `value_dtype` (int8: symmetric absmax scale per `block` values, in ``scales``)."""
    v = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    k = v.numel()
    if value_dtype == "int8":
        q, scales = _quantize_int8(v, block)
        raw = {"values": q}
        qi = q.numpy().astype(np.int64)
        z = np.where(qi >= 0, 2 * qi, -2 * qi - 1)
        r = best_rice_parameter(z)
        low, high, nbits = rice_encode(z, r)
        if low.shape[0] + high.shape[0] < k:
            return ({"coding": "zigzag_rice", "r": r, "bits": nbits},
                    {"val_low": torch.from_numpy(low), "val_high": torch.from_numpy(high), "scales": scales})
        return {"coding": "raw"}, {**raw, "scales": scales}
    if value_dtype not in _FLOAT_LAYOUT:
        raise ValueError(f"value_dtype {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    out = v.to(TORCH_VALUE_DTYPES[value_dtype]).contiguous()
    if value_dtype == "fp16" and bool(torch.isfinite(v).all()) and not bool(torch.isfinite(out).all()):
        raise ValueError("diff values exceed the fp16 range (|v| > 65504): save them as bf16 or fp32")
    ity, eb, mb = _FLOAT_LAYOUT[value_dtype]
    width = 1 + eb + mb
    u = out.view(ity).numpy().astype(np.int64) & ((1 << width) - 1)
    e = (u >> mb) & ((1 << eb) - 1)
    sm = ((u >> (eb + mb)) << mb) | (u & ((1 << mb) - 1))
    # exponents relative to their median, zigzagged (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)
    eref = int(np.median(e)) if k else 0
    d = eref - e
    off = np.where(d >= 0, 2 * d, -2 * d - 1)
    r = best_rice_parameter(off)
    if k and _rice_bits(off, r) + (1 + mb) * k < width * k - 16:
        low, high, nbits = rice_encode(off, r)
        smb = pack_fields(sm, 1 + mb)
        return ({"coding": "exp_rice", "eref": eref, "r": r, "bits": nbits},
                {"val_sm": torch.from_numpy(smb), "val_exp_low": torch.from_numpy(low),
                 "val_exp_high": torch.from_numpy(high)})
    return {"coding": "raw"}, {"values": out}


def check_value_sizes(entry: dict, stored: dict[str, torch.Tensor], value_dtype: str, k: int, block: int) -> None:
    """Validate a value entry against its tensors' sizes and dtypes before decoding (no allocation)."""
    coding = entry.get("coding") if isinstance(entry, dict) else None
    allowed = ("raw", "zigzag_rice") if value_dtype == "int8" else ("raw", "exp_rice")
    if coding not in allowed:
        raise CodecError(f"value coding {coding!r} does not fit value_dtype {value_dtype!r}")
    want = set(VALUE_ARRAYS[coding]) | ({"scales"} if value_dtype == "int8" else set())
    if set(stored) != want:
        raise CodecError(f"value tensors {sorted(stored)}, expected {sorted(want)}")
    for key, t in stored.items():
        if t.dim() != 1:
            raise CodecError(f"value tensor {key!r} is not 1-D")
    if value_dtype == "int8":
        sc = stored["scales"]
        if sc.dtype != torch.float32 or sc.numel() != (k + block - 1) // block:
            raise CodecError(f"int8 scales tensor has {sc.numel()} {sc.dtype}, {(k + block - 1) // block} float32 expected")
    if coding == "raw":
        v = stored["values"]
        if v.numel() != k or v.dtype != TORCH_VALUE_DTYPES[value_dtype]:
            raise CodecError(f"values tensor ({v.numel()} {v.dtype}) does not hold {k} {value_dtype} values")
        return
    for key in VALUE_ARRAYS[coding]:
        if stored[key].dtype != torch.uint8:
            raise CodecError(f"value tensor {key!r} is not uint8")
    if coding == "exp_rice":
        _, eb, mb = _FLOAT_LAYOUT[value_dtype]
        eref = entry.get("eref")
        if not (isinstance(eref, int) and not isinstance(eref, bool) and 0 <= eref < 1 << eb):
            raise CodecError(f"bad reference exponent {eref!r}")
        if stored["val_sm"].numel() != (k * (1 + mb) + 7) // 8:
            raise CodecError("sign/mantissa array has the wrong size")
        rice_sizes_ok(stored["val_exp_low"].numpy(), stored["val_exp_high"].numpy(), k, entry.get("r"), entry.get("bits"))
    else:
        rice_sizes_ok(stored["val_low"].numpy(), stored["val_high"].numpy(), k, entry.get("r"), entry.get("bits"))


def decode_values(entry: dict, stored: dict[str, torch.Tensor], value_dtype: str, k: int, block: int) -> torch.Tensor:
    """Stored values -> fp32 tensor of k values (dequantised); CodecError on malformed input."""
    check_value_sizes(entry, stored, value_dtype, k, block)
    coding = entry["coding"]
    if coding == "raw":
        v = stored["values"]
        if value_dtype == "fp32":
            return v
        if value_dtype in ("bf16", "fp16"):
            return v.to(torch.float32)
        q = v
    elif coding == "zigzag_rice":
        z = rice_decode(stored["val_low"].numpy(), stored["val_high"].numpy(), k, entry["r"], entry["bits"])
        if k and int(z.max()) > 254:
            raise CodecError("int8 value out of range")
        q = torch.from_numpy((z >> 1) ^ -(z & 1)).to(torch.int8)
    else:
        ity, eb, mb = _FLOAT_LAYOUT[value_dtype]
        z = rice_decode(stored["val_exp_low"].numpy(), stored["val_exp_high"].numpy(), k, entry["r"], entry["bits"])
        if k and int(z.max()) >= 1 << (eb + 1):
            raise CodecError("exponent out of range")
        e = entry["eref"] - ((z >> 1) ^ -(z & 1))
        if k and (int(e.min()) < 0 or int(e.max()) >= 1 << eb):
            raise CodecError("exponent out of range")
        sm = _gather_bits(stored["val_sm"].numpy(), k, 1 + mb) if k else np.zeros(0, dtype=np.int64)
        u = ((sm >> mb) << (eb + mb)) | (e << mb) | (sm & ((1 << mb) - 1))
        width = 1 + eb + mb
        u = np.where(u >= 1 << (width - 1), u - (1 << width), u)  # two's complement of the integer view
        t = torch.from_numpy(u.astype(np.int32 if width == 32 else np.int16)).view(TORCH_VALUE_DTYPES[value_dtype])
        return t.to(torch.float32)
    scales = stored["scales"]
    if k == 0:
        return torch.zeros(0)
    nblocks = scales.numel()
    out = torch.zeros(nblocks * block, dtype=torch.float32)
    out[:k] = q.to(torch.float32)
    return out.view(nblocks, block).mul_(scales[:, None]).reshape(-1)[:k].contiguous()


def value_bytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())
