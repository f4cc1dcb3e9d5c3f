"""LoRA linear: y = x W^T + s (x A^T) B^T with W frozen. x [M, K], W [N, K], A [R, K], B [N, R], R << K, N.

Forward, one program per (M-block, N-block) tile: the K loop that accumulates x W^T also accumulates
xa = x A^T [BM, R] from the same x tile, and the epilogue adds s * xa B^T before the single store of y. So x is
read and y written exactly as by a plain matmul; xa (the only activation the backward needs besides x) is stored
by the N-block-0 programs. Every N-block recomputes its xa (R / BN extra FLOPs over the base matmul) rather than
reading x a second time.

Backward, with dxa = s dy B [M, R]:
    dx = dy W + dxa A      dA = dxa^T x      dB = s dy^T xa      (dW = dy^T x only when W.requires_grad)
one program per (M-group, K-block): its N loop accumulates dy W and dy B from the same dy tile (and, in the
K-block-0 programs, the dB partial dy^T xa), the epilogue adds dxa A and folds dxa^T x into the dA partial from
the one x tile it reads. Partials are per M-group (deterministic, no atomics) and summed afterwards. Each K-block
program recomputes dy B for its rows (R / BK extra FLOPs). When x needs no gradient (layer 0 over a frozen
embedding) there is no dy W to fuse with, and dA, dB are three thin torch matmuls; an unfrozen W's dW is a torch
matmul too.

On CUDA, `ops.lora_linear(s)` takes the torch side by default (cuBLAS matmuls and an in-place addmm_): without a
GPU measurement showing this kernel faster at real shapes and ranks 8-128, cuBLAS is the safer bet (this kernel
has no grouped tile order and recomputes x A^T per N block). HIPPO_KERNELS=triton selects it.
"""
import torch
import triton
import triton.language as tl


def lora_linear_reference(x, weight, lora_a, lora_b, scale):
    return x @ weight.T + scale * ((x @ lora_a.T) @ lora_b.T)


def lora_linears_reference(x, projections, scales):
    return tuple(lora_linear_reference(x, *projection, scale) for projection, scale in zip(projections, scales))


@triton.jit
def _lora_forward_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, scale, M, N, K, R,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    xa = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # [BM, BN]
        xa = tl.dot(x, tl.trans(a), xa, input_precision=PRECISION)  # [BM, BR]
    xa_low = xa.to(x_ptr.dtype.element_ty)  # rounded as the reference's x @ A^T
    b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    acc += scale * tl.dot(xa_low, tl.trans(b), input_precision=PRECISION)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if pid_n == 0:
        tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa_low, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _lora_backward_kernel(dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, dx_ptr, da_partial_ptr, db_partial_ptr,
                          scale, M, N, K, R, n_groups,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                          COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr,
                          PRECISION: tl.constexpr):
    pid_g, pid_k = tl.program_id(0), tl.program_id(1)
    rk = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    rr = tl.arange(0, BR)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    da_acc = tl.zeros((BR, BK), dtype=tl.float32)
    for m_block in range(pid_g, tl.cdiv(M, BM), n_groups):
        rm = (m_block * BM + tl.arange(0, BM)).to(tl.int64)
        m_mask = rm[:, None] < M
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=m_mask & (rr[None, :] < R), other=0.0)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        dxa = tl.zeros((BM, BR), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=m_mask & (rn[None, :] < N), other=0.0)
            b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)  # [BM, BK]
            dxa = tl.dot(dy, b, dxa, input_precision=PRECISION)  # [BM, BR]
            if COMPUTE_DB:
                if pid_k == 0:
                    db_ptrs = db_partial_ptr + (pid_g * N + rn[:, None]) * BR + rr[None, :]
                    db = tl.load(db_ptrs, mask=rn[:, None] < N, other=0.0)
                    db = tl.dot(tl.trans(dy), xa, db, input_precision=PRECISION)  # [BN, BR]
                    tl.store(db_ptrs, db, mask=rn[:, None] < N)
        dxa_low = (dxa * scale).to(dy_ptr.dtype.element_ty)
        acc = tl.dot(dxa_low, a, acc, input_precision=PRECISION)
        tl.store(dx_ptr + rm[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=m_mask & (rk[None, :] < K))
        if COMPUTE_DA:
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_mask & (rk[None, :] < K), other=0.0)
            da_acc = tl.dot(tl.trans(dxa_low), x, da_acc, input_precision=PRECISION)  # [BR, BK]
    if COMPUTE_DA:
        tl.store(da_partial_ptr + (pid_g * BR + rr[:, None]) * K + rk[None, :], da_acc, mask=rk[None, :] < K)


# GPU tiles per padded rank (BM, BN, BK, num_warps, num_stages): the rank tile BR is at most 128 and the M/N/K tiles
# shrink as it grows, so the backward's x, W, dy, B, A tiles and its [BM, BR], [BR, BK] accumulators stay under the
# sm_90 shared-memory and register limits (benchmarks/compile_check.py checks every rank).
_GPU_TILES = {16: (64, 128, 64, 4, 3), 32: (64, 64, 32, 4, 3), 64: (64, 64, 32, 4, 3), 128: (64, 64, 32, 8, 2)}
MAX_RANK = 128
# Set by tests: the interpreter runs the GPU tiles instead of its small ones.
GPU_TILES_ON_CPU = False


def _blocks(dtype, rank, gpu):
    """Tile sizes (R padded to a tl.dot-able 16+) and launch options. fp32: IEEE dots under the interpreter (exact
    tests), tf32 on a GPU (IEEE dots there run on CUDA cores)."""
    br = max(16, triton.next_power_of_2(rank))
    precision = "ieee" if dtype == torch.float32 and not gpu else "tf32"
    if gpu:
        bm, bn, bk, warps, stages = _GPU_TILES[br]
        return dict(BM=bm, BN=bn, BK=bk, BR=br, PRECISION=precision), dict(num_warps=warps, num_stages=stages)
    return dict(BM=32, BN=32, BK=32, BR=br, PRECISION=precision), {}


def forward_launch(x2, weight, lora_a, lora_b, y, xa, scale, gpu):
    """(kernel, grid, args, options) of the forward; the compile check builds the same launch."""
    m, k = x2.shape
    n, r = lora_b.shape
    blocks, launch = _blocks(x2.dtype, r, gpu)
    grid = (triton.cdiv(m, blocks["BM"]), triton.cdiv(n, blocks["BN"]))
    return _lora_forward_kernel, grid, (x2, weight, lora_a, lora_b, y, xa, float(scale), m, n, k, r), \
        dict(blocks, **launch)


def backward_launch(dy2, x2, weight, lora_a, lora_b, xa, dx, scale, need_da, need_db, gpu, programs):
    """((kernel, grid, args, options), dA partials [G, BR, K] fp32 or None, dB partials [G, N, BR] fp32 or None)."""
    m, k = x2.shape
    n, r = lora_b.shape
    blocks, launch = _blocks(x2.dtype, r, gpu)
    br = blocks["BR"]
    m_blocks, k_blocks = triton.cdiv(m, blocks["BM"]), triton.cdiv(k, blocks["BK"])
    n_groups = max(1, min(m_blocks, programs // k_blocks))
    da_partial = torch.empty(n_groups, br, k, dtype=torch.float32, device=x2.device) if need_da else None
    db_partial = torch.zeros(n_groups, n, br, dtype=torch.float32, device=x2.device) if need_db else None
    args = (dy2, x2, weight, lora_a, lora_b, xa, dx, da_partial, db_partial, float(scale), m, n, k, r, n_groups)
    launch = (_lora_backward_kernel, (n_groups, k_blocks), args,
              dict(blocks, COMPUTE_DA=need_da, COMPUTE_DB=need_db, **launch))
    return launch, da_partial, db_partial


def _check(x, weight, lora_a, lora_b):
    k = x.shape[-1]
    n, r = lora_b.shape
    if weight.shape != (n, k) or lora_a.shape != (r, k):
        raise ValueError(f"lora_linear: x [..., {k}] needs weight [out, {k}], lora_a [r, {k}], lora_b [out, r]; got "
                         f"{tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    if not x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype:
        raise ValueError(f"lora_linear: dtypes differ: x {x.dtype}, weight {weight.dtype}, lora_a {lora_a.dtype}, "
                         f"lora_b {lora_b.dtype}")


class LoRALinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
        weight, lora_a, lora_b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
        m, k = x2.shape
        n, r = lora_b.shape
        # [..., N], row-major as the kernel's [M, N]; returned as is (not a view), so a caller may add into it
        y = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
        xa = torch.empty(m, r, dtype=x.dtype, device=x.device)
        if m and n:
            kernel, grid, args, options = forward_launch(x2, weight, lora_a, lora_b, y, xa, scale,
                                                         x.is_cuda or GPU_TILES_ON_CPU)
            kernel[grid](*args, **options)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.lead = scale, lead
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        m, k = x2.shape
        n, r = lora_b.shape
        dy2 = dy.reshape(m, n).contiguous()  # [M, N]
        need_dx, need_dw, need_da, need_db = ctx.needs_input_grad[:4]
        dw = (dy2.T @ x2) if need_dw else None  # [N, K]: a plain matmul, only for an unfrozen base weight
        if not need_dx:  # e.g. layer 0 under a frozen embedding: without dy W there is nothing to fuse into
            dxa = (dy2 @ lora_b) * ctx.scale  # [M, R]
            da = (dxa.T @ x2) if need_da else None
            db = (dy2.T @ xa) * ctx.scale if need_db else None
            return None, dw, da, db, None
        dx = torch.empty_like(x2)
        (kernel, grid, args, options), da_partial, db_partial = backward_launch(
            dy2, x2, weight, lora_a, lora_b, xa, dx, ctx.scale, need_da, need_db, x2.is_cuda or GPU_TILES_ON_CPU,
            _parallel_programs(x2.device))
        if m:
            kernel[grid](*args, **options)
        da = (da_partial[:, :r].sum(0) if m else torch.zeros_like(lora_a, dtype=torch.float32)) if need_da else None
        db = (db_partial[:, :, :r].sum(0) * ctx.scale) if need_db else None
        return (dx.view(*ctx.lead, k), dw,
                da.to(lora_a.dtype) if need_da else None, db.to(lora_b.dtype) if need_db else None, None)


def _parallel_programs(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def lora_linear_triton(x, weight, lora_a, lora_b, scale):
    _check(x, weight, lora_a, lora_b)
    if lora_a.shape[0] > MAX_RANK:
        raise ValueError(f"lora_linear: rank {lora_a.shape[0]} > {MAX_RANK} is not supported by the Triton kernel; "
                         f"HIPPO_KERNELS=torch takes the torch path")
    return LoRALinearTriton.apply(x, weight, lora_a, lora_b, scale)


class LoRALinearsTorch(torch.autograd.Function):
    """Several LoRA linears of one input x (q/k/v, gate/up): y_i = x W_i^T + s_i (x A_i^T) B_i^T.

    The adapters' A factors are stacked into one [sum r_i, K] matrix, so x meets them in one matmul forward
    (xa = x A^T [M, sum r_i]) and one backward (dA = (x^T dxa)^T), and dx sums every projection's dy_i W_i and the
    stacked dxa A in place (addmm_). Thin matmuls are the slow ones here: [16, 2048] x [2048, 576] runs at a third
    of a square matmul's rate on this CPU, the stacked [48, ...] ones at about two thirds. Keeps x and xa only, as
    the math needs (a single linear is the case of one projection)."""

    @staticmethod
    def forward(ctx, x, scales, *params):
        weights, lora_as, lora_bs = params[0::3], params[1::3], params[2::3]
        offsets = [0]
        for lora_a in lora_as:
            offsets.append(offsets[-1] + lora_a.shape[0])
        xa = x.reshape(-1, x.shape[-1]) @ _stacked(lora_as).T  # [M, R], R = sum r_i
        outputs = []
        for weight, lora_b, scale, r0, r1 in zip(weights, lora_bs, scales, offsets, offsets[1:]):
            y = x @ weight.T  # [..., N_i]
            y.view(-1, y.shape[-1]).addmm_(xa[:, r0:r1], lora_b.T, alpha=scale)  # no [..., N_i] temporary
            outputs.append(y)
        ctx.save_for_backward(x, xa, *params)
        ctx.scales, ctx.offsets = scales, offsets
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *dys):
        x, xa, *params = ctx.saved_tensors
        weights, lora_as, lora_bs = params[0::3], params[1::3], params[2::3]
        offsets, slices = ctx.offsets, list(zip(ctx.offsets, ctx.offsets[1:]))
        need_dx, param_needs = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        need_dw, need_da, need_db = param_needs[0::3], param_needs[1::3], param_needs[2::3]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        dys = [dy.reshape(x2.shape[0], -1) for dy in dys]  # [M, N_i]
        dxa = None
        if need_dx or any(need_da):
            dxa = x2.new_empty(x2.shape[0], offsets[-1])  # [M, R]: s_i dy_i B_i side by side
            for dy, lora_b, scale, (r0, r1) in zip(dys, lora_bs, ctx.scales, slices):
                torch.mm(dy, lora_b, out=dxa[:, r0:r1]).mul_(scale)
        dx = None
        if need_dx:
            for dy, weight in zip(dys, weights):
                dx = dy @ weight if dx is None else dx.addmm_(dy, weight)  # [M, K]
            dx = dx.addmm_(dxa, _stacked(lora_as)).view(x.shape)
        # x^T dxa then transposed: 1.3x the rate of dxa^T x at these shapes (a 16-row output is MKL's slow case)
        da = (x2.T @ dxa).T.contiguous() if any(need_da) else None  # [R, K]
        grads = [dx, None]
        for i, (dy, (r0, r1)) in enumerate(zip(dys, slices)):
            grads += [dy.T @ x2 if need_dw[i] else None,  # only for an unfrozen base weight
                      da[r0:r1] if need_da[i] else None,
                      (dy.T @ xa[:, r0:r1]).mul_(ctx.scales[i]) if need_db[i] else None]  # [N_i, r_i]
        return tuple(grads)


def _stacked(lora_as):
    """[sum r_i, K]: the A factors one under another (a copy only when there are several)."""
    return torch.cat(lora_as) if len(lora_as) > 1 else lora_as[0]


def lora_linears_torch(x, projections, scales):
    """x [..., K], projections [(weight [N_i, K], lora_a [r_i, K], lora_b [N_i, r_i])], scales [s_i] -> the
    tuple of y_i [..., N_i]."""
    for weight, lora_a, lora_b in projections:
        _check(x, weight, lora_a, lora_b)
    return LoRALinearsTorch.apply(x, tuple(scales), *(t for projection in projections for t in projection))


def lora_linear_torch(x, weight, lora_a, lora_b, scale):
    return lora_linears_torch(x, [(weight, lora_a, lora_b)], [scale])[0]
