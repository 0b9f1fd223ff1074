"""Fused GroupNorm (+ SiLU), forward and backward, in Triton.

`group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None | "silu")` for x of
shape (N, C, *spatial). Statistics are fp32 whatever the input dtype (fp32, fp16, bf16).

Layout. The kernels read x as N*C rows of HW = prod(spatial) contiguous elements (NCHW). Other
layouts (channels_last, strided views) are copied to contiguous NCHW at the boundary: one extra
read+write of x, which a channels_last kernel would avoid; not done (the UNet runs NCHW).

Work split. One program handles one channel row of one sample, or a chunk of it: rows whose
HW is large are split into SPLIT chunks so that even batch 1 launches enough programs to fill
the GPU (SDXL at 128x128 latents: a group is 40 channels x 16384 positions; it becomes 40 rows
x SPLIT chunks instead of one program per (sample, group)).

Forward, three launches:
  1. stats:   per (row, chunk) the count, mean and M2 (sum of squared deviations) of the chunk,
              accumulated tile by tile with Chan's parallel update (no E[x^2]-E[x]^2
              cancellation);
  2. combine: per (sample, group) Chan's combination of its Cg*SPLIT partials -> mean, rstd;
  3. apply:   y = act((x - mean) * rstd * w[c] + b[c]).
Saved for backward: x, and mean and rstd per (sample, group) (fp32), plus the weight and bias
(parameters, alive anyway). Not the normalised tensor and not the pre-activation.

Backward. With xhat = (x - mean) * rstd, z = w xhat + b, y = silu(z) = z sigmoid(z) (or y = z):
    dz     = dy * sigmoid(z) * (1 + z (1 - sigmoid(z)))        (= dy without activation)
    db[c]  = sum_{n, hw} dz,   dw[c] = sum_{n, hw} dz xhat
    dx     = rstd * (w dz - mean_g(w dz) - xhat * mean_g(w dz xhat))
where mean_g averages over the Cg*HW elements of the sample's group. Both group means follow
from the per-(n, c) sums A = sum_hw dz and Bs = sum_hw dz xhat: mean_g(w dz) = sum_c w_c A_nc / L.
So: 4. reduce: per (row, chunk) partial A and Bs, recomputing xhat, z and sigmoid from x and
the saved statistics; 5. combine per (sample, group) -> the two group means; dw, db are the
channel sums of the partials (a torch sum over a (N, C, SPLIT) array); 6. dx, elementwise,
recomputing xhat, z, sigmoid once more. Recomputing is cheaper than storing: the op is memory
bound and the recompute is a few FLOPs per element.

Bytes moved (what the op must move is 2 elements/element forward, x in and y out, and 3 for
backward, x and dy in and dx out): forward reads x twice (stats, apply) and backward reads x
and dy twice; the second read of a chunk hits L2 only when the tensor is small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _gn_fwd_stats_kernel(
    X,                  # (N*C, HW) contiguous input rows
    PMEAN, PM2,         # (N*C*SPLIT,) fp32 partial mean and M2 per (row, chunk)
    HW, CHUNK, SPLIT,   # positions per row, positions per chunk (multiple of BLOCK), chunks per row
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    base = X + row * HW
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end  # the chunk's (and row's) last tile is partial
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(end - off, BLOCK).to(tl.float32)
        mean_t = tl.sum(x, 0) / n_t
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(d * d, 0)
        # Chan et al.: merge (count, mean, m2) with the tile's statistics
        tot = count + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / tot)
        m2 = m2 + m2_t + delta * delta * (count * n_t / tot)
        count = tot
    out = row * SPLIT + chunk
    tl.store(PMEAN + out, mean)
    tl.store(PM2 + out, m2)


@triton.jit
def _gn_fwd_combine_kernel(
    PMEAN, PM2,         # (N*C*SPLIT,) fp32 partials; a (sample, group) owns Cg*SPLIT consecutive ones
    MEAN, RSTD,         # (N*G,) fp32 outputs
    HW, CHUNK, SPLIT, CG, eps,
    BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    n_part = CG * SPLIT
    base = ng * n_part
    offs = tl.arange(0, BLOCK_P)
    total = CG * HW * 1.0
    # pass 1: group mean = sum(count_i * mean_i) / total
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        i = p0 + offs
        mask = i < n_part
        cnt = tl.minimum(HW - (i % SPLIT) * CHUNK, CHUNK).to(tl.float32)  # last chunk of a row is short
        acc += tl.where(mask, cnt * tl.load(PMEAN + base + i, mask=mask, other=0.0), 0.0)
    mean = tl.sum(acc, 0) / total
    # pass 2: M2 = sum(m2_i + count_i * (mean_i - mean)^2)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        i = p0 + offs
        mask = i < n_part
        cnt = tl.minimum(HW - (i % SPLIT) * CHUNK, CHUNK).to(tl.float32)
        d = tl.load(PMEAN + base + i, mask=mask, other=0.0) - mean
        acc += tl.where(mask, tl.load(PM2 + base + i, mask=mask, other=0.0) + cnt * d * d, 0.0)
    var = tl.sum(acc, 0) / total
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_fwd_apply_kernel(
    X, Y,               # (N*C, HW) contiguous input and output rows
    W, B,               # (C,) weight and bias (any float dtype; ones/zeros when absent)
    MEAN, RSTD,         # (N*G,) fp32
    C, CG, HW, CHUNK,
    BLOCK: tl.constexpr, SILU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = row % C
    ng = (row // C) * (C // CG) + c // CG
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    # (x - mean) first: folding mean into a shift (x*scale + shift) cancels catastrophically
    # when |mean| >> std, e.g. a one-element group where rstd = eps**-0.5
    w = tl.load(W + c).to(tl.float32) * rstd
    b = tl.load(B + c).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        x = tl.load(X + row * HW + idx, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * w + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + row * HW + idx, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_reduce_kernel(
    X, DY,              # (N*C, HW) contiguous input and output gradient
    W, B,               # (C,)
    MEAN, RSTD,         # (N*G,) fp32 saved statistics
    PA, PB,             # (N*C*SPLIT,) fp32 partial sums of dz and dz * xhat per (row, chunk)
    C, CG, HW, CHUNK, SPLIT,
    BLOCK: tl.constexpr, SILU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = row % C
    ng = (row // C) * (C // CG) + c // CG
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    w = tl.load(W + c).to(tl.float32)
    b = tl.load(B + c).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end  # masked lanes load x = dy = 0, so dz = 0 there
        x = tl.load(X + row * HW + idx, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + row * HW + idx, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:
            z = xhat * w + b
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        acc_a += dz
        acc_b += dz * xhat
    out = row * SPLIT + chunk
    tl.store(PA + out, tl.sum(acc_a, 0))
    tl.store(PB + out, tl.sum(acc_b, 0))


@triton.jit
def _gn_bwd_combine_kernel(
    PA, PB,             # (N*C*SPLIT,) fp32 partials; a (sample, group) owns Cg*SPLIT consecutive ones
    W,                  # (C,)
    C1, C2,             # (N*G,) fp32 outputs: mean_g(w dz) and mean_g(w dz xhat)
    C, CG, HW, SPLIT,
    BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    g = ng % (C // CG)
    n_part = CG * SPLIT
    base = ng * n_part
    offs = tl.arange(0, BLOCK_P)
    acc1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        i = p0 + offs
        mask = i < n_part
        w = tl.load(W + g * CG + i // SPLIT, mask=mask, other=0.0).to(tl.float32)  # channel of partial i
        acc1 += w * tl.load(PA + base + i, mask=mask, other=0.0)
        acc2 += w * tl.load(PB + base + i, mask=mask, other=0.0)
    inv = 1.0 / (CG * HW * 1.0)
    tl.store(C1 + ng, tl.sum(acc1, 0) * inv)
    tl.store(C2 + ng, tl.sum(acc2, 0) * inv)


@triton.jit
def _gn_bwd_dx_kernel(
    X, DY, DX,          # (N*C, HW) contiguous input, output gradient, input gradient
    W, B,               # (C,)
    MEAN, RSTD, C1, C2,  # (N*G,) fp32
    C, CG, HW, CHUNK,
    BLOCK: tl.constexpr, SILU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = row % C
    ng = (row // C) * (C // CG) + c // CG
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    c1 = tl.load(C1 + ng)
    c2 = tl.load(C2 + ng)
    w = tl.load(W + c).to(tl.float32)
    b = tl.load(B + c).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        x = tl.load(X + row * HW + idx, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + row * HW + idx, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:
            z = xhat * w + b
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        dx = rstd * (w * dz - c1 - xhat * c2)
        tl.store(DX + row * HW + idx, dx.to(DX.dtype.element_ty), mask=mask)


KERNELS = {
    "gn_fwd_stats": _gn_fwd_stats_kernel,
    "gn_fwd_combine": _gn_fwd_combine_kernel,
    "gn_fwd_apply": _gn_fwd_apply_kernel,
    "gn_bwd_reduce": _gn_bwd_reduce_kernel,
    "gn_bwd_combine": _gn_bwd_combine_kernel,
    "gn_bwd_dx": _gn_bwd_dx_kernel,
}
# See attention.py: triton fixes interpreter mode at decoration time.
INTERPRETED = isinstance(_gn_fwd_stats_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)
INTERPRETER_MISMATCH = isinstance(_gn_fwd_stats_kernel, InterpretedFunction) != isinstance(tl.sum, InterpretedFunction)

def _empty(*args, **kwargs) -> torch.Tensor:
    """Allocation of every kernel output; tests swap it for a NaN-filled one to catch elements a
    kernel fails to write."""
    return torch.empty(*args, **kwargs)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return _empty(t.shape, device=t.device, dtype=t.dtype)


# ----------------------------------------------------------------------------------------------
# Launch configurations: no autotuning (the op is memory bound; the tile only has to be wide
# enough), so these are also exactly the configurations the GPU-readiness check compiles.
# ----------------------------------------------------------------------------------------------
GPU_BLOCKS = (128, 1024)   # tile of positions: 128 for rows up to 1024 positions, else 1024
BLOCK_P = 256              # partials per combine iteration
GPU_TARGET_PROGRAMS = 1024  # enough programs for ~8 per SM on an H100 (132 SMs)
INTERP_BLOCK = 256
INTERP_TARGET_PROGRAMS = 8  # small, so tests exercise SPLIT > 1 on modest sizes


def _tile_and_split(rows: int, hw: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, SPLIT): positions per tile, per chunk (a multiple of BLOCK), chunks per row."""
    if INTERPRETED:
        block, target = INTERP_BLOCK, INTERP_TARGET_PROGRAMS
    else:
        block, target = (GPU_BLOCKS[0] if hw <= 1024 else GPU_BLOCKS[1]), GPU_TARGET_PROGRAMS
    tiles = triton.cdiv(hw, block)
    split = max(1, min(tiles, triton.cdiv(target, rows)))
    chunk = triton.cdiv(tiles, split) * block
    split = triton.cdiv(hw, chunk)
    return block, chunk, split


def _check_device(x: torch.Tensor):
    if INTERPRETER_MISMATCH:
        raise RuntimeError("TRITON_INTERPRET was set after triton was imported but before refl_kernels was: "
                           "set it before anything imports triton")
    if not INTERPRETED and x.device.type != "cuda":
        raise RuntimeError("the Triton GroupNorm kernels run on CUDA, or on CPU only when TRITON_INTERPRET=1 "
                           "was set before triton was imported")


def group_norm_forward(x, num_groups: int, weight, bias, eps: float, silu: bool):
    """Launch the forward; x is (N, C, HW) contiguous. Returns (y, mean, rstd), mean/rstd (N, G) fp32."""
    N, C, HW = x.shape
    G = num_groups
    y = _empty_like(x)
    mean = _empty((N, G), device=x.device, dtype=torch.float32)
    rstd = _empty((N, G), device=x.device, dtype=torch.float32)
    if x.device.type == "meta":  # shape/byte accounting only
        return y, mean, rstd
    _check_device(x)
    block, chunk, split = _tile_and_split(N * C, HW, x.device)
    pmean = _empty(N * C * split, device=x.device, dtype=torch.float32)
    pm2 = _empty_like(pmean)
    _gn_fwd_stats_kernel[(N * C, split)](x, pmean, pm2, HW, chunk, split, BLOCK=block, num_warps=4)
    _gn_fwd_combine_kernel[(N * G,)](pmean, pm2, mean, rstd, HW, chunk, split, C // G, eps, BLOCK_P=BLOCK_P, num_warps=4)
    _gn_fwd_apply_kernel[(N * C, split)](x, y, weight, bias, mean, rstd, C, C // G, HW, chunk,
                                         BLOCK=block, SILU=silu, num_warps=4)
    return y, mean, rstd


def group_norm_apply(x, weight, bias, mean, rstd, silu: bool):
    """The forward's output again from its saved statistics: the apply launch alone (a caller that
    saved x, mean and rstd recomputes y in backward without the two statistics passes)."""
    N, C, HW = x.shape
    G = mean.shape[1]
    y = _empty_like(x)
    if x.device.type == "meta":
        return y
    _check_device(x)
    block, chunk, split = _tile_and_split(N * C, HW, x.device)
    _gn_fwd_apply_kernel[(N * C, split)](x, y, weight, bias, mean, rstd, C, C // G, HW, chunk,
                                         BLOCK=block, SILU=silu, num_warps=4)
    return y


def group_norm_backward(dy, x, weight, bias, mean, rstd, silu: bool):
    """Launch the backward; returns (dx, dw, db) with dw, db fp32 (C,)."""
    N, C, HW = x.shape
    G = mean.shape[1]
    dx = _empty_like(x)
    if x.device.type == "meta":
        return dx, _empty(C, device=x.device), _empty(C, device=x.device)
    dy = dy.contiguous()
    block, chunk, split = _tile_and_split(N * C, HW, x.device)
    pa = _empty(N * C * split, device=x.device, dtype=torch.float32)
    pb = _empty_like(pa)
    c1 = _empty((N, G), device=x.device, dtype=torch.float32)
    c2 = _empty_like(c1)
    _gn_bwd_reduce_kernel[(N * C, split)](x, dy, weight, bias, mean, rstd, pa, pb, C, C // G, HW, chunk, split,
                                          BLOCK=block, SILU=silu, num_warps=4)
    _gn_bwd_combine_kernel[(N * G,)](pa, pb, weight, c1, c2, C, C // G, HW, split, BLOCK_P=BLOCK_P, num_warps=4)
    _gn_bwd_dx_kernel[(N * C, split)](x, dy, dx, weight, bias, mean, rstd, c1, c2, C, C // G, HW, chunk,
                                      BLOCK=block, SILU=silu, num_warps=4)
    db = pa.view(N, C, split).sum(dim=(0, 2))
    dw = pb.view(N, C, split).sum(dim=(0, 2))
    return dx, dw, db


def gpu_compile_specs():
    """(kernel name, JIT function, signature, constexprs, num_warps, num_stages) for every
    configuration the CUDA path can launch: the input to the GPU-readiness compile check.
    Weight/bias are compiled as the input dtype (the UNet's case); fp32 parameters with 16-bit
    activations compile to the same code with a different load width."""
    ints = {"HW", "CHUNK", "SPLIT", "C", "CG"}
    for name, fn in KERNELS.items():
        per_dtype = name not in ("gn_fwd_combine",)
        for dtype in ("fp32", "fp16", "bf16") if per_dtype else ("fp32",):
            blocks = [None] if "combine" in name else GPU_BLOCKS
            for block in blocks:
                for silu in ((False, True) if "SILU" in fn.arg_names else (None,)):
                    sig, const = {}, {}
                    for arg in fn.arg_names:
                        if arg in ("X", "Y", "DY", "DX", "W", "B"):
                            sig[arg] = "*" + dtype
                        elif arg in ints:
                            sig[arg] = "i32"
                        elif arg == "eps":
                            sig[arg] = "fp32"
                        elif arg == "BLOCK":
                            sig[arg], const[arg] = "constexpr", block
                        elif arg == "BLOCK_P":
                            sig[arg], const[arg] = "constexpr", BLOCK_P
                        elif arg == "SILU":
                            sig[arg], const[arg] = "constexpr", silu
                        else:
                            sig[arg] = "*fp32"
                    yield name, fn, sig, const, 4, 3


class FusedGroupNorm(torch.autograd.Function):
    """Saves x and per-(sample, group) mean/rstd (plus the parameters); recomputes the rest."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, has_weight, has_bias):
        y, mean, rstd = group_norm_forward(x, num_groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.silu, ctx.has_weight, ctx.has_bias = silu, has_weight, has_bias
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.silu)
        dw = dw.to(weight.dtype) if ctx.has_weight else None
        db = db.to(bias.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None, None


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused GroupNorm (+ SiLU) with the Triton kernels (CUDA, or the interpreter on CPU)."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"group_norm expects (N, C, *spatial), got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the {C} channels")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm supports fp32/fp16/bf16, got {x.dtype}")
    has_weight, has_bias = weight is not None, bias is not None
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=x.dtype)
    x3 = x.reshape(N, C, -1)
    if not x3.is_contiguous():
        x3 = x3.contiguous()
    y = FusedGroupNorm.apply(x3, weight, bias, int(num_groups), float(eps), activation == "silu", has_weight, has_bias)
    return y.view(x.shape)
