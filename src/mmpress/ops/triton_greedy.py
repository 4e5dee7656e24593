"""Triton kernels for the greedy selections: one program per image walks all k steps on chip.

The PyTorch loops in ``ops.diversity`` / ``ops.coverage`` launch a handful of kernels per greedy
step, so on a GPU they are bound by launch latency (k = 576 steps: tens of milliseconds). Here a
single program per image keeps the greedy's running state in registers and loops over the k steps
itself; each step touches one row of the distance matrix (diversity), only the coverage rows the
last pick improved (coverage), or one kernel row and the Cholesky rows built so far (DPP).

Triton is optional: it is imported on first use (:func:`available`), never by ``import mmpress``.
The PyTorch loops stay the reference and the CPU path. ``MMPRESS_TRITON=0`` in the environment, or
``set_enabled(False)``, forces the reference everywhere.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

# N up to this size keeps the per-token state of one image in registers; larger N falls back to
# tiles streamed through a scratch row (diversity) or to the PyTorch loop (coverage).
MAX_BLOCK_N = 8192

_enabled = os.environ.get("MMPRESS_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(flag: bool) -> bool:
    """Allow (True) or forbid (False) the Triton kernels; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def available() -> bool:
    """True when triton imports (the import is attempted once, on first call)."""
    return _kernels() is not None


def use_triton(t: Tensor) -> bool:
    """Whether the greedy on ``t`` runs as a Triton kernel: enabled, CUDA, float32, triton present."""
    return _enabled and t.is_cuda and t.dtype == torch.float32 and available()


def _num_warps(block: int) -> int:
    # the per-step argmax is a cross-warp reduction on the critical path: few warps, but enough
    # to hold the block in registers without spilling
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def max_min_kernel(dist_ptr, first_ptr, out_ptr, N, K, stride_m, stride_r,
                       BLOCK_N: tl.constexpr):
        """DivPrune (Alvar et al., CVPR 2025), greedy MMDP steps 2..k for one image: add the
        token farthest from the picked set, argmax_j min_{s in S} d(s, j). The running minimum
        lives in registers, so a step reads one row d(pick, .) and does one min and one argmax."""
        m = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        valid = offs < N
        base = dist_ptr + m * stride_m
        # padding lanes start at -inf so they never win an argmax
        min_dist = tl.where(valid, float("inf"), float("-inf"))
        pick = tl.load(first_ptr + m).to(tl.int32)
        for i in range(K):
            tl.store(out_ptr + m * K + i, pick.to(tl.int64))
            row = tl.load(base + pick.to(tl.int64) * stride_r + offs, mask=valid, other=float("-inf"))
            # -inf on picked tokens keeps the picks unique when every remaining distance is 0
            min_dist = tl.where(offs == pick, float("-inf"), tl.minimum(min_dist, row))
            pick = tl.argmax(min_dist, axis=0, tie_break_left=True).to(tl.int32)

    @triton.jit
    def max_min_tiled_kernel(dist_ptr, first_ptr, out_ptr, scratch_ptr, N, K, stride_m, stride_r,
                             BLOCK_N: tl.constexpr):
        """As ``max_min_kernel`` for N beyond one register block: the running minimum is a
        scratch row (+inf on entry) streamed tile by tile; the argmax is merged across tiles,
        keeping the earlier tile on ties (lowest index, as torch.argmax)."""
        m = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK_N)
        base = dist_ptr + m * stride_m
        state = scratch_ptr + m * N
        pick = tl.load(first_ptr + m).to(tl.int32)
        for i in range(K):
            tl.store(out_ptr + m * K + i, pick.to(tl.int64))
            best_val = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
            best_idx = pick
            for n0 in range(0, N, BLOCK_N):
                offs = n0 + lanes
                valid = offs < N
                cur = tl.load(state + offs, mask=valid, other=float("-inf"))
                row = tl.load(base + pick.to(tl.int64) * stride_r + offs, mask=valid, other=float("-inf"))
                cur = tl.where(offs == pick, float("-inf"), tl.minimum(cur, row))
                tl.store(state + offs, cur, mask=valid)
                tile_max = tl.max(cur, axis=0)
                tile_arg = tl.argmax(cur, axis=0, tie_break_left=True).to(tl.int32) + n0
                better = tile_max > best_val
                best_idx = tl.where(better, tile_arg, best_idx)
                best_val = tl.where(better, tile_max, best_val)
            pick = best_idx

    @triton.jit
    def coverage_kernel(cover_ptr, best_ptr, list_ptr, lo_ptr, hi_ptr, out_ptr, R, N, K, stride_m, stride_r,
                        CHUNK_R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """MMTok (Dong et al., ICLR 2026), greedy maximum coverage for one image: k times add
        the candidate of largest marginal gain gain_j = sum_r max(0, cover[r, j] - best[r]),
        then raise best[r] to cover[r, pick].

        The gains stay in registers and are updated, not recomputed: a pick changes best[r]
        only on the rows it covers better (about R / i rows at step i), and on such a row the
        gain of j drops by clamp(cover[r, j], old, new) - old. So a step reads one column of
        ``cover``, lists the changed rows (a prefix sum compacts them into scratch), and reads
        only those rows, instead of all R x N entries. The gains accumulate in float64 so the
        updates do not drift from the recomputed float32 sums; ``count[j]`` (exact, integer)
        is the number of rows j still covers above best, and a gain with count 0 is exactly 0,
        as in the reference, so zero-gain ties still go to the lowest index.
        Scratch (all (M, R)): best (zeros on entry), changed rows, their old and new best."""
        m = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        base = cover_ptr + m * stride_m
        best, changed_rows, olds, news = best_ptr + m * R, list_ptr + m * R, lo_ptr + m * R, hi_ptr + m * R

        gain = tl.zeros([BLOCK_N], dtype=tl.float64)
        count = tl.zeros([BLOCK_N], dtype=tl.int32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows < R)[:, None] & col_ok[None, :]
            c = tl.load(base + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=ok, other=0.0)
            gain += tl.sum(tl.maximum(c, 0.0), axis=0).to(tl.float64)
            count += tl.sum((c > 0.0).to(tl.int32), axis=0)
        taken = cols >= N

        for i in range(K):
            score = tl.where(taken, float("-inf"), tl.where(count == 0, 0.0, gain))
            pick = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32)
            tl.store(out_ptr + m * K + i, pick.to(tl.int64))
            taken = taken | (cols == pick)
            if i + 1 < K:  # the last pick needs no update
                n_changed = tl.sum(tl.zeros([BLOCK_R], dtype=tl.int32), axis=0)
                for r0 in range(0, R, CHUNK_R):
                    rows = r0 + tl.arange(0, CHUNK_R)
                    row_ok = rows < R
                    old = tl.load(best + rows, mask=row_ok, other=0.0)
                    new = tl.load(base + rows.to(tl.int64) * stride_r + pick, mask=row_ok, other=0.0)
                    changed = row_ok & (new > old)
                    slot = n_changed + tl.cumsum(changed.to(tl.int32), axis=0) - 1
                    tl.store(changed_rows + slot, rows, mask=changed)
                    tl.store(olds + slot, old, mask=changed)
                    tl.store(news + slot, new, mask=changed)
                    tl.store(best + rows, new, mask=changed)
                    n_changed += tl.sum(changed.to(tl.int32), axis=0)
                tl.debug_barrier()  # the list is read back by other threads than wrote it
                for j0 in range(0, n_changed, BLOCK_R):
                    slot = j0 + tl.arange(0, BLOCK_R)
                    slot_ok = slot < n_changed
                    rows = tl.load(changed_rows + slot, mask=slot_ok, other=0)
                    lo = tl.load(olds + slot, mask=slot_ok, other=0.0)[:, None]
                    hi = tl.load(news + slot, mask=slot_ok, other=0.0)[:, None]
                    ok = slot_ok[:, None] & col_ok[None, :]
                    c = tl.load(base + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=ok, other=0.0)
                    drop = tl.where(ok, tl.minimum(tl.maximum(c, lo), hi) - lo, 0.0)
                    gain -= tl.sum(drop, axis=0).to(tl.float64)
                    count -= tl.sum((ok & (c > lo) & (c <= hi)).to(tl.int32), axis=0)
                tl.debug_barrier()  # the next step overwrites the list

    @triton.jit
    def dpp_kernel(kernel_ptr, factor_ptr, out_ptr, N, K, stride_m, stride_r, eps,
                   BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """Greedy MAP of a DPP for one image (Chen et al., NeurIPS 2018, Algorithm 1; CDPruner's
        selection), the steps of ``ops.dpp.greedy_dpp_map``: pick j = argmax d^2, then
        e = (L_j. - <c_j, C>) / d_j, C gains the row e, d^2 -= e^2. The residuals d^2 stay in
        registers; the Cholesky rows C (i x N at step i) live in a scratch (K, N) block and are
        read BLOCK_T rows at a time, so a step costs one kernel-row read and i factor-row reads."""
        m = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        valid = offs < N
        base = kernel_ptr + m * stride_m
        factor = factor_ptr + m * K * N
        # residual of every item given S = {}: the diagonal; padding lanes never win an argmax
        d2 = tl.load(base + offs.to(tl.int64) * stride_r + offs, mask=valid, other=float("-inf"))
        for i in range(K):
            d2_pick = tl.max(d2, axis=0)
            pick = tl.argmax(d2, axis=0, tie_break_left=True).to(tl.int32)
            tl.store(out_ptr + m * K + i, pick.to(tl.int64))
            residual = tl.load(base + pick.to(tl.int64) * stride_r + offs, mask=valid, other=0.0)
            for t0 in range(0, i, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                t_ok = ts < i
                c_pick = tl.load(factor + ts * N + pick, mask=t_ok, other=0.0)  # c_j, BLOCK_T entries
                rows = tl.load(factor + ts[:, None] * N + offs[None, :], mask=t_ok[:, None] & valid[None, :],
                               other=0.0)
                residual -= tl.sum(c_pick[:, None] * rows, axis=0)
            # rank exhausted (d^2 <= eps): the pick joins S without updating the factor
            scale = tl.where(d2_pick > eps, tl.rsqrt(tl.maximum(d2_pick, eps)), 0.0)
            e = residual * scale
            tl.store(factor + i * N + offs, e, mask=valid)
            d2 = tl.where(offs == pick, float("-inf"), d2 - e * e)
            tl.debug_barrier()  # row i of the factor is read back by other threads at the next step

    return max_min_kernel, max_min_tiled_kernel, coverage_kernel, dpp_kernel


def max_min(dist: Tensor, first: Tensor, k: int) -> Tensor:
    """Greedy max-min picks on a precomputed distance matrix: dist (M, N, N) float32, first (M,)
    -> (M, k) int64, the same picks as ``ops.diversity.greedy_max_min``."""
    max_min_kernel, max_min_tiled_kernel, _, _ = _kernels()
    m, n, _ = dist.shape
    dist = dist.contiguous()
    first = first.to(device=dist.device, dtype=torch.long).contiguous()
    out = torch.empty(m, k, dtype=torch.long, device=dist.device)
    if m == 0:
        return out
    import triton

    block = triton.next_power_of_2(n)
    if block <= MAX_BLOCK_N:
        max_min_kernel[(m,)](dist, first, out, n, k, dist.stride(0), dist.stride(1),
                             BLOCK_N=block, num_warps=_num_warps(block))
    else:
        scratch = torch.full((m, n), torch.inf, dtype=torch.float32, device=dist.device)
        max_min_tiled_kernel[(m,)](dist, first, out, scratch, n, k, dist.stride(0), dist.stride(1),
                                   BLOCK_N=MAX_BLOCK_N, num_warps=_num_warps(MAX_BLOCK_N))
    return out


def fits(t: Tensor) -> bool:
    """The coverage and DPP kernels hold one image's N gains / residuals (the last dimension of
    ``t``) in registers: N <= MAX_BLOCK_N."""
    return t.shape[-1] <= MAX_BLOCK_N


def greedy_coverage(cover: Tensor, k: int, block_r: int | None = None, num_warps: int | None = None) -> Tensor:
    """Greedy coverage picks: cover (M, R, N) float32 -> (M, k) int64, the picks of
    ``ops.coverage.greedy_coverage_torch`` up to float ties (gains are summed in another order)."""
    _, _, coverage_kernel, _ = _kernels()
    m, r, n = cover.shape
    cover = cover.contiguous()
    out = torch.empty(m, k, dtype=torch.long, device=cover.device)
    if m == 0:
        return out
    import triton

    block = triton.next_power_of_2(n)
    # a tile of block_r changed rows x BLOCK_N floats sits in registers next to the gains; few
    # rows per tile waste little work on the sparse later steps (sweep on an H100: N=576 best at
    # 8 rows / 4 warps, N=2304 at 2 rows / 16 warps)
    block_r = block_r or (8 if block <= 1024 else 4 if block <= 2048 else 2)
    num_warps = num_warps or (4 if block <= 1024 else 8 if block <= 2048 else 16)
    scratch = torch.zeros(4, m, max(r, 1), dtype=torch.float32, device=cover.device)
    best, olds, news = scratch[0], scratch[1], scratch[2]
    changed_rows = scratch[3].view(torch.int32)
    coverage_kernel[(m,)](cover, best, changed_rows, olds, news, out, r, n, k, cover.stride(0),
                          max(cover.stride(1), 1), CHUNK_R=1024, BLOCK_R=block_r, BLOCK_N=block,
                          num_warps=num_warps)
    return out


def greedy_dpp(kernel: Tensor, k: int, eps: float = 1e-10) -> Tensor:
    """Greedy DPP MAP picks: kernel (M, N, N) float32 -> (M, k) int64, the picks of
    ``ops.dpp.greedy_dpp_map`` up to float near-ties (the residuals are summed in another order)."""
    *_, dpp_kernel = _kernels()
    m, n, _ = kernel.shape
    kernel = kernel.contiguous()
    out = torch.empty(m, k, dtype=torch.long, device=kernel.device)
    if m == 0:
        return out
    import triton

    block = triton.next_power_of_2(n)
    factor = torch.empty(m, k, n, dtype=torch.float32, device=kernel.device)  # row i written at step i
    # A tile of BLOCK_T factor rows x BLOCK_N lanes (about 64 registers a thread) per load: the
    # factor loop is a chain of dependent L2 reads, so fewer, wider iterations. Cost model, not
    # yet timed on a GPU (benchmarks/greedy_gpu.py does): sum_i i / BLOCK_T iterations, about
    # 21k at N=2304 / k=576, against the reference's ~12 launches per step.
    warps = _num_warps(block)
    block_t = max(1, min(16, 2048 * warps // block))
    dpp_kernel[(m,)](kernel, factor, out, n, k, kernel.stride(0), kernel.stride(1), eps,
                     BLOCK_N=block, BLOCK_T=block_t, num_warps=warps)
    return out
