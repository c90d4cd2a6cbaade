"""One-pass (flash-attention style) softmax-weighted mean for one group of queries.

A score machine is attention (Kamb & Ganguli 2412.20292, Eq. 6-9; see
:mod:`patchmosaic.engine`): queries are noisy patches ``x_b``, keys are
training patches ``k_m``, values their centre pixels ``v_m``, and

    logit[b, m] = scale_b <x_b, k_m> + bias_b |k_m|^2 (+ log c_m),
    scale_b = a / s2,  bias_b = -a^2 / (2 s2),  a = sqrt(abar_b),  s2 = 1 - abar_b,

with the optional multiplicity ``c_m`` of a collapsed candidate. The engine
forms each logit block in memory and makes three passes over it (clamp, exp,
weighted sum). The Triton kernel here streams tiles of keys past a tile of
queries and keeps, per query row, the running maximum ``m``, the rescaled
normaliser ``l = sum exp(logit - m)`` and the rescaled weighted sum
``acc = sum exp(logit - m) v``; when a key tile raises ``m`` to ``m'`` both
are multiplied by ``exp(m - m')`` (Milakov & Gimelshein 2018; Dao et al. 2022).
No logit block is written to memory. When the query tiles alone would not
fill the GPU, the keys are also split into ``splits`` contiguous ranges, one
program each (as in flash-decoding), and the per-range states are merged
afterwards, exactly as :meth:`SoftmaxMean.merge` does.

The products ``<x, k>`` (and ``p @ v`` when a candidate has more than
``SUM_VALUES`` values; fewer, i.e. a grey centre pixel, are summed with
float32 multiply-adds instead of a ``tl.dot`` padded to 16 columns) use ``tl.dot`` with
``input_precision="tf32x3"`` (``precision=``, the default): each float32
operand is split into a TF32 high part and a TF32 remainder and the three
larger cross products run on tensor cores, about float32's accuracy (the
dropped low x low term is ~2^-22 relative) at tensor-core speed; or with
``"ieee"`` (IEEE float32 multiply-adds on CUDA cores). Both errors are measured
against float64 in ``benchmarks/gpu_check_fused.py``: on one H200 both stay
within the float32 CPU engine's (README, "Fused GPU kernel"), and tf32x3 is
2.5x faster than ieee over a 20-step sample. TF32 alone (10 mantissa bits) is refused:
at ``abar = 0.999`` (``scale = 1000``) its 1e-3 relative error in ``<x, k>``
moves logits by far more than 1.

The result is a partial state of :class:`patchmosaic.engine.SoftmaxMean` for
the given keys: ``ref = m + log l`` (the log-sum-exp) and
``acc[..., :V] = acc / l``, ``acc[..., V] = 1`` (rows with no candidate:
``ref = -inf``, ``acc = 0``), so it merges exactly with
:meth:`SoftmaxMean.merge` or with another chunk's partial state.

Without Triton (or for float64, or CPU tensors outside the Triton
interpreter) the same state is computed by :class:`SoftmaxMean` itself.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) must be switched on before
``triton`` is first imported: ``triton.language`` builds its own helpers
(``tl.sum``, ``tl.max``) for the interpreter or for the compiler at import.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional extra "gpu"
    triton = tl = None

from patchmosaic.engine import SoftmaxMean, augment_values, exact_float32_matmul

__all__ = ["BACKENDS", "PRECISIONS", "TILES", "TRITON_AVAILABLE", "fused_softmax_mean", "triton_usable"]

TRITON_AVAILABLE = triton is not None
# Whether the imported triton.language was built for the CPU interpreter (fixed at its import).
TRITON_INTERPRETED = TRITON_AVAILABLE and type(tl.sum).__name__ == "InterpretedFunction"
BACKENDS = ("auto", "triton", "torch")

# Products of the kernel: IEEE float32, or split-precision TF32 on tensor cores (module docstring).
PRECISIONS = ("ieee", "tf32x3")


class Tiles(NamedTuple):
    """Launch configuration: query rows x key columns per step, the feature (D) step of the
    ``<x, k>`` product (``tl.dot`` needs every dimension >= 16), warps per program and
    software-pipelining stages."""

    block_q: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int


# Default tiles per precision (used where a call does not name them): the fastest candidates of
# benchmarks/gpu_check_fused.py on one H200 (2026-11-30, docs/gpu/2026-11-30-h200-run2.log; the
# next-best were within 0.5%).
TILES = {"ieee": Tiles(128, 128, 32, 8, 3), "tf32x3": Tiles(128, 128, 64, 8, 2)}
MIN_BLOCK = 16
# Up to this many values per candidate (C channels of a centre pixel) the weighted sum is formed
# with CUDA-core multiply-adds; beyond, with tl.dot (whose operands are padded to 16 columns).
# Grey pixels only: that is the case the H200 run timed (docs/gpu/); for colour the [BQ, BM, C]
# products would hold C times the registers, untimed.
SUM_VALUES = 1


def _interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel can run for tensors of this device and dtype.

    It needs Triton, float32, and CUDA tensors, or CPU tensors with Triton
    imported under ``TRITON_INTERPRET=1``.
    """
    if not TRITON_AVAILABLE or dtype != torch.float32:
        return False
    return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)


def fused_softmax_mean(
    queries: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    keys: torch.Tensor,
    key_sq_norms: torch.Tensor,
    values: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    backend: str = "auto",
    precision: str = "tf32x3",
    block_q: int | None = None,
    block_m: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    splits: int | None = None,
    hoist_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted mean of one chunk of keys for ``G`` groups of queries, in one pass.

    Any strides are accepted (e.g. the engine's transposed augmented keys
    ``keys_t[:, :D].transpose(1, 2)`` and ``keys_t[:, D]``, without a copy).

    Args:
        queries: ``[G, Bq, D]`` query vectors ``x_b`` (noisy patches, not augmented).
        scale: ``[Bq]`` or ``[G, Bq]`` per-row ``a / s2`` (:func:`engine.logit_coefficients`).
        bias: ``[Bq]`` or ``[G, Bq]`` per-row ``-a^2 / (2 s2)``.
        keys: ``[G, M, D]`` key vectors ``k_m`` (training patches).
        key_sq_norms: ``[G, M]`` ``|k_m|^2``.
        values: ``[G, M, V]`` values ``v_m`` (centre pixels), *not* multiplied by counts.
        counts: Optional ``[G, M]`` multiplicities ``c_m >= 0`` (0: absent candidate).
        backend: ``"triton"`` (raise if it cannot run), ``"torch"`` (:class:`SoftmaxMean`)
            or ``"auto"`` (Triton when :func:`triton_usable`, else torch).
        precision: Triton's products: ``"tf32x3"`` (split-precision tensor-core products, the
            default) or ``"ieee"`` (float32 multiply-adds); module docstring. The torch backend
            computes in the inputs' dtype.
        block_q: Query rows per tile (Triton; a power of two >= 16; default ``TILES[precision]``).
        block_m: Keys per tile (Triton; a power of two >= 16; default ``TILES[precision]``).
        block_d: Feature step of ``<x, k>`` (Triton; a power of two >= 16; default ``TILES[precision]``).
        num_warps: Warps per program (Triton; default ``TILES[precision]``).
        num_stages: Pipelining stages of the key loop (Triton; default ``TILES[precision]``).
        splits: Key ranges processed by separate programs and merged (Triton);
            default: enough to give every streaming multiprocessor ~4 programs.
        hoist_queries: Triton, patches of at most ``block_d`` features (grey patches up to
            k = 7 at the tf32x3 tiles): load each query tile once, before the key loop, instead
            of once per key tile (the key loop then holds its loads directly, for Triton's
            software pipelining). Off by default until measured on a GPU
            (``benchmarks/gpu_check_fused.py`` times both).

    Returns:
        ``ref [G, Bq]`` (log-sum-exp of the row's logits) and ``acc [G, Bq, V + 1]``
        (``[mean, 1]``; ``-inf`` and zeros for rows without candidates): the
        :class:`SoftmaxMean` state after streaming these keys.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS} (TF32 alone is too coarse)")
    chunk = _check_inputs(_Chunk(queries, scale, bias, keys, key_sq_norms, values, counts))
    use_triton = backend == "triton" or (backend == "auto" and triton_usable(queries.device, queries.dtype))
    if not use_triton:
        return _torch_partial(chunk)
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package: pip install 'patchmosaic[gpu]'")
    if not triton_usable(queries.device, queries.dtype):
        hint = ""
        if queries.device.type == "cpu" and _interpret_requested() and not TRITON_INTERPRETED:
            hint = " (TRITON_INTERPRET=1 was set after triton was imported; set it before the first import)"
        raise ValueError(
            f"the Triton kernel runs float32 CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got {queries.dtype} on {queries.device}{hint}"
        )
    given = Tiles(block_q, block_m, block_d, num_warps, num_stages)
    tiles = Tiles(*(d if v is None else v for v, d in zip(given, TILES[precision])))
    for name, b in zip(Tiles._fields[:3], tiles[:3]):
        if b < MIN_BLOCK or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {b}")
    if tiles.num_warps < 1 or tiles.num_warps & (tiles.num_warps - 1) or tiles.num_stages < 1:
        raise ValueError(
            f"num_warps must be a power of two and num_stages >= 1, got {tiles.num_warps}, {tiles.num_stages}"
        )
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    return _triton_partial(chunk, precision, tiles, splits, hoist_queries)


class _Chunk(NamedTuple):
    """The arguments of one :func:`fused_softmax_mean` call (shapes there)."""

    queries: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    keys: torch.Tensor
    key_sq_norms: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor | None


def _check_inputs(chunk: _Chunk) -> _Chunk:
    """Validate shapes, dtypes and devices; ``scale`` and ``bias`` become ``[G, Bq]`` (views)."""
    queries, scale, bias, keys, key_sq_norms, values, counts = chunk
    if queries.ndim != 3 or keys.ndim != 3 or values.ndim != 3:
        raise ValueError(
            f"queries [G, Bq, D], keys [G, M, D] and values [G, M, V] must be 3-d, got "
            f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    G, Bq, D = queries.shape
    M = keys.shape[1]
    if keys.shape != (G, M, D) or values.shape[:2] != (G, M) or key_sq_norms.shape != (G, M):
        raise ValueError(
            f"inconsistent shapes: queries {tuple(queries.shape)}, keys {tuple(keys.shape)} (want [{G}, M, {D}]), "
            f"key_sq_norms {tuple(key_sq_norms.shape)} and values {tuple(values.shape)} (want [{G}, {M}, ...])"
        )
    if counts is not None and counts.shape != (G, M):
        raise ValueError(f"counts must have shape [{G}, {M}], got {tuple(counts.shape)}")
    rows = []
    for name, t in (("scale", scale), ("bias", bias)):
        if t.shape == (Bq,):
            t = t[None].expand(G, Bq)
        elif t.shape != (G, Bq):
            raise ValueError(f"{name} must have shape [{Bq}] or [{G}, {Bq}], got {tuple(t.shape)}")
        rows.append(t)
    tensors = [queries, *rows, keys, key_sq_norms, values] + ([counts] if counts is not None else [])
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError(
            "all inputs must share one dtype and device, got "
            f"{sorted({str(t.dtype) for t in tensors})} on {sorted({str(t.device) for t in tensors})}"
        )
    return chunk._replace(scale=rows[0], bias=rows[1])


def _torch_partial(chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """The same partial state from :class:`SoftmaxMean` (logit blocks in memory)."""
    queries, scale, bias, keys, key_sq_norms, values, counts = chunk
    G, Bq, _ = queries.shape
    aug_q = torch.cat(
        [queries * scale[..., None], bias[..., None], queries.new_zeros(G, Bq, 1)], dim=-1
    )  # [G, Bq, D + 2]
    keys_t = torch.cat(
        [keys.transpose(1, 2), key_sq_norms[:, None], torch.ones_like(key_sq_norms)[:, None]], dim=1
    )  # [G, D + 2, M]
    vals = augment_values(values)  # [G, M, V + 1]
    if counts is not None:
        vals = vals * counts[..., None]
    state = SoftmaxMean(aug_q, values.shape[-1])
    with exact_float32_matmul():
        state.update(keys_t, vals, counts=counts)
    return state.ref, state.acc


def _triton_partial(
    chunk: _Chunk, precision: str, tiles: Tiles, splits: int | None, hoist_queries: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: one program per (query tile, group x key range, value tile)."""
    queries, scale, bias, keys, key_sq_norms, values, counts = chunk
    block_q, block_m, block_d = tiles.block_q, tiles.block_m, tiles.block_d
    G, Bq, D = queries.shape
    M, V = keys.shape[1], values.shape[2]
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        if max(t.numel(), G * Bq * (V + 1)) >= 2**31:  # offsets inside a group are 32-bit in the kernel
            raise ValueError(f"{name} {tuple(t.shape)} too large for one call (2^31 elements): pass smaller chunks")
    q_tiles = triton.cdiv(Bq, block_q)
    if splits is None:
        sms = torch.cuda.get_device_properties(queries.device).multi_processor_count if queries.is_cuda else 1
        splits = triton.cdiv(4 * sms, q_tiles * G)
    splits = max(1, min(splits, triton.cdiv(M, block_m)))  # every range holds at least one key tile
    per_split = max(1, triton.cdiv(triton.cdiv(M, splits), block_m)) * block_m  # keys per range, whole tiles
    splits = max(1, triton.cdiv(M, per_split))
    ref = queries.new_empty(splits, G, Bq)
    acc = queries.new_empty(splits, G, Bq, V + 1)
    sum_v = V <= SUM_VALUES  # few values (grey pixels): weighted sums on CUDA cores, not tl.dot
    block_v = triton.next_power_of_2(max(V, 1)) if sum_v else max(MIN_BLOCK, min(64, triton.next_power_of_2(V)))
    block_d = max(MIN_BLOCK, min(block_d, triton.next_power_of_2(D)))  # small patches: no padded feature steps
    c = counts if counts is not None else key_sq_norms  # placeholder pointer when absent (never read)
    grid = (q_tiles, G * splits, triton.cdiv(V, block_v) if V else 1)
    _kernel()[grid](
        queries, scale, bias, keys, key_sq_norms, values, c, ref, acc,
        Bq, M, D, V, splits, per_split,
        *queries.stride(), *scale.stride(), *bias.stride(), *keys.stride(), *key_sq_norms.stride(),
        *values.stride(), *c.stride(), *ref.stride(), *acc.stride(),
        HAS_COUNTS=counts is not None, PRECISION=precision, SUM_V=sum_v, HOIST_Q=hoist_queries and D <= block_d,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_V=block_v,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if splits == 1:
        return ref[0], acc[0]
    return _merge_splits(ref, acc)


def _merge_splits(ref: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[S, G, Bq]`` / ``[S, G, Bq, V + 1]`` states of disjoint key ranges (as
    :meth:`SoftmaxMean.merge`), then move the reference to the log-sum-exp (``acc[..., -1] = 1``)."""
    top = ref.amax(0)  # [G, Bq]
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # rows without any candidate
    total = (acc * torch.exp(ref - shift)[..., None]).sum(0)  # [G, Bq, V + 1]
    norm = total[..., -1:]  # [G, Bq, 1]
    seen = norm > 0
    mean = torch.where(seen, total / torch.where(seen, norm, torch.ones_like(norm)), torch.zeros_like(total))
    return torch.where(seen[..., 0], shift + norm[..., 0].log(), top), mean


@functools.cache
def _kernel():
    """The jitted kernel, for the compiler or the interpreter as ``triton.language`` was imported.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so it is set
    to match for that moment (a kernel and ``tl.sum`` from different modes
    cannot run together).
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if TRITON_INTERPRETED else "0"
    try:
        return triton.jit(fused_softmax_mean_kernel)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def fused_softmax_mean_kernel(
    q_ptr, scale_ptr, bias_ptr, k_ptr, n_ptr, v_ptr, c_ptr, ref_ptr, acc_ptr,
    Bq, M, D, V, SPLITS, PER_SPLIT,
    sq_g, sq_b, sq_d, ss_g, ss_b, sb_g, sb_b, sk_g, sk_m, sk_d, sn_g, sn_m,
    sv_g, sv_m, sv_v, sc_g, sc_m, sr_s, sr_g, sr_b, sa_s, sa_g, sa_b, sa_v,
    HAS_COUNTS: tl.constexpr, PRECISION: tl.constexpr, SUM_V: tl.constexpr, HOIST_Q: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_q = tl.program_id(0)
    g = (tl.program_id(1) // SPLITS).to(tl.int64)  # group
    split = tl.program_id(1) % SPLITS  # this program's key range [lo, hi)
    lo = split * PER_SPLIT
    hi = tl.minimum(M, lo + PER_SPLIT)
    pid_v = tl.program_id(2)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ] query rows
    row_ok = rows < Bq
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV] value columns
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr + g * ss_g + rows * ss_b, mask=row_ok, other=0.0)  # [BQ]
    bias = tl.load(bias_ptr + g * sb_g + rows * sb_b, mask=row_ok, other=0.0)  # [BQ]
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_Q], tl.float32)  # sum exp(logit - m_i)
    acc = tl.zeros([BLOCK_Q, BLOCK_V], tl.float32)  # sum exp(logit - m_i) v
    if HOIST_Q:  # the whole feature range is one step: the query tile is loaded once, before the key loop
        xq = tl.load(
            q_ptr + g * sq_g + rows[:, None] * sq_b + offs_d[None, :] * sq_d,
            mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0,
        )  # [BQ, BD]
    for start_m in range(lo, hi, BLOCK_M):
        kidx = start_m + tl.arange(0, BLOCK_M)  # [BM]
        key_ok = kidx < hi
        if HOIST_Q:
            kt = tl.load(
                k_ptr + g * sk_g + kidx[None, :] * sk_m + offs_d[:, None] * sk_d,
                mask=key_ok[None, :] & (offs_d < D)[:, None], other=0.0,
            )  # [BD, BM]
            dots = tl.dot(xq, kt, input_precision=PRECISION)  # [BQ, BM] <x_b, k_m>
        else:
            dots = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)  # <x_b, k_m>
            for start_d in range(0, D, BLOCK_D):
                d = start_d + offs_d  # [BD]
                d_ok = d < D
                x = tl.load(
                    q_ptr + g * sq_g + rows[:, None] * sq_b + d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                )  # [BQ, BD]
                kt = tl.load(
                    k_ptr + g * sk_g + kidx[None, :] * sk_m + d[:, None] * sk_d,
                    mask=key_ok[None, :] & d_ok[:, None], other=0.0,
                )  # [BD, BM]
                dots = tl.dot(x, kt, dots, input_precision=PRECISION)
        norms = tl.load(n_ptr + g * sn_g + kidx * sn_m, mask=key_ok, other=0.0)  # [BM]
        logits = scale[:, None] * dots + bias[:, None] * norms[None, :]  # [BQ, BM]
        if HAS_COUNTS:
            cnt = tl.load(c_ptr + g * sc_g + kidx * sc_m, mask=key_ok, other=0.0)  # [BM]
            logits += tl.where(cnt > 0, tl.log(tl.where(cnt > 0, cnt, 1.0)), float("-inf"))[None, :]
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))  # [BQ]
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a candidate yet
        alpha = tl.exp(m_i - shift)  # [BQ] rescales the old state (0 when it was empty)
        p = tl.exp(logits - shift[:, None])  # [BQ, BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + g * sv_g + kidx[:, None] * sv_m + cols[None, :] * sv_v,
            mask=key_ok[:, None] & col_ok[None, :], other=0.0,
        )  # [BM, BV]
        if SUM_V:  # [BQ, BM, BV] products summed over the keys: exact float32 FMAs
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        else:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    norm = tl.where(seen, l_i, 1.0)
    out = acc / norm[:, None]  # [BQ, BV], the mean
    tl.store(
        acc_ptr + split * sa_s + g * sa_g + rows[:, None] * sa_b + cols[None, :] * sa_v, out,
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if pid_v == 0:
        tl.store(ref_ptr + split * sr_s + g * sr_g + rows * sr_b, tl.where(seen, m_i + tl.log(norm), float("-inf")), mask=row_ok)
        tl.store(acc_ptr + split * sa_s + g * sa_g + rows * sa_b + V * sa_v, tl.where(seen, 1.0, 0.0), mask=row_ok)

