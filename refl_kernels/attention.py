"""Fused attention (FlashAttention-2 style), forward and backward, in Triton.

`attention(q, k, v, scale=None)` with q (B, H, Nq, D), k and v (B, H, Nk, D) returns
softmax(q k^T * scale) v without ever materialising the (Nq, Nk) score matrix, in forward or
backward.

Shapes. Any Nq, Nk >= 1: query rows and key columns past the end of the last block are masked
(loads return 0, scores of missing keys are -inf, stores are masked). Any D from 8 to 256: the
head dim runs as BLOCK_D = next power of two >= max(D, 32) with the extra columns masked to
zero. Padding cost: the two matmuls (and the loads, which are masked, not fetched) run over
BLOCK_D columns, so D=40 -> 64, 80 -> 128 and 160 -> 256 do 1.6x the tensor-core work of the
real D and hold 1.6x the registers/shared memory for the q/k/v/acc tiles; D=8 runs as 32 (4x)
and D=16 as 32 (2x). D=64 (SDXL) and the other powers of two pay nothing. The alternative (splitting D=40 into
32 + 8 column pieces) trades that for extra instructions and is not done.

Precision. fp32, fp16 and bf16 inputs; all softmax statistics and the accumulators are fp32;
the probabilities are cast to the input dtype before the P @ V (and dS @ K, dS^T @ Q) matmuls as
in FlashAttention. On CUDA, fp32 inputs use TF32 tensor-core dots (Triton's default,
like torch with allow_tf32=True): fp32 storage and accumulation, 10-bit-mantissa products. Full
fp32 products ("ieee" or 3xTF32) took 3-10x longer to compile and spilled registers in several
configurations; use bf16 for speed, or the "sdpa" backend when fp32-exact GPU attention matters. The interpreter
computes fp32 dots exactly, which is what the CPU tests check.

Forward saves: q, k, v, O and the log-sum-exp L (fp32, (B, H, Nq), natural log).

Backward (FlashAttention-2). With S = scale * q k^T, P = exp(S - L) (recomputed tile by tile from
q, k and the saved L, so it is exact softmax without a second max pass), dO the incoming
gradient:
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id   (rowsum(dO * O))
    dQ = scale * dS K,   dK = scale * dS^T Q
delta is computed once by a small preprocessing kernel from dO and the saved O (that is why O
is saved: it replaces a reduction over Nk with one over D). dK/dV are accumulated by one
program per key block looping over all query blocks, dQ by one program per query block looping
over all key blocks, so no atomics are needed; the price is computing P twice.

Launch configurations: fixed ones under the Triton interpreter (TRITON_INTERPRET=1 on CPU,
where the autotuner's benchmarking cannot run), autotuned over `gpu_configs(...)` on CUDA.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V,            # inputs; last dim contiguous (stride 1), other strides below
    O,                  # output, same strides convention as Q
    LSE,                # (B*H, Nq) fp32 contiguous: log-sum-exp per query row, natural log
    stride_qb, stride_qh, stride_qm,  # Q strides over batch, head, query row
    stride_kb, stride_kh, stride_kn,  # K strides over batch, head, key row
    stride_vb, stride_vh, stride_vn,  # V strides over batch, head, key row
    stride_ob, stride_oh, stride_om,  # O strides over batch, head, query row
    H, Nq, Nk, D,       # heads, query rows, key rows, real head dim (<= BLOCK_D)
    qk_scale,           # scale * log2(e): scores are kept in base-2 units so exp2 can be used
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Nq
    d_valid = offs_d < D  # padded head-dim columns load as 0 and contribute nothing to q k^T

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < Nk
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + kn[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        # keys past Nk get -inf so they vanish from max and sum; every block holds >= 1 real key
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,              # forward output and its gradient, last dim contiguous
    DELTA,              # (B*H, Nq) fp32 contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om,    # O strides over batch, head, query row
    stride_dob, stride_doh, stride_dom,  # dO strides over batch, head, query row
    H, Nq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Nq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,        # inputs and output gradient, last dim contiguous
    DK, DV,             # outputs, contiguous (B, H, Nk, D)
    LSE, DELTA,         # (B*H, Nq) fp32 contiguous, from forward / the delta kernel
    stride_qb, stride_qh, stride_qm,    # Q strides over batch, head, query row
    stride_kb, stride_kh, stride_kn,    # K strides
    stride_vb, stride_vh, stride_vn,    # V strides
    stride_dob, stride_doh, stride_dom,  # dO strides
    stride_dkb, stride_dkh, stride_dkn,  # dK and dV strides (both contiguous, same shape)
    H, Nq, Nk, D,
    sm_scale,           # softmax scale (natural units), applied to dK at the end
    qk_scale,           # sm_scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Nk
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        qm = start_m + offs_m
        m_valid = qm < Nq
        qd_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + qm[:, None] * stride_qm + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + qm[:, None] * stride_dom + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + pid_bh * Nq + qm, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + pid_bh * Nq + qm, mask=m_valid, other=0.0)
        # P^T tile (BLOCK_N, BLOCK_M); zero where the query row or the key row does not exist
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
        p_t = tl.where(n_valid[:, None] & m_valid[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * sm_scale

    out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,        # inputs and output gradient, last dim contiguous
    DQ,                 # output, contiguous (B, H, Nq, D)
    LSE, DELTA,         # (B*H, Nq) fp32 contiguous
    stride_qb, stride_qh, stride_qm,    # Q strides
    stride_kb, stride_kh, stride_kn,    # K strides
    stride_vb, stride_vh, stride_vn,    # V strides
    stride_dob, stride_doh, stride_dom,  # dO strides
    stride_dqb, stride_dqh, stride_dqm,  # dQ strides
    H, Nq, Nk, D,
    sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Nq
    d_valid = offs_d < D
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * Nq + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < Nk
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + kn[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kn[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


KERNELS = {
    "attn_fwd": _attn_fwd_kernel,
    "attn_bwd_delta": _attn_bwd_delta_kernel,
    "attn_bwd_dkdv": _attn_bwd_dkdv_kernel,
    "attn_bwd_dq": _attn_bwd_dq_kernel,
}


def _empty(*args, **kwargs) -> torch.Tensor:
    """Allocation of every kernel output; tests swap it for a NaN-filled one to catch elements a
    kernel fails to write."""
    return torch.empty(*args, **kwargs)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return _empty(t.shape, device=t.device, dtype=t.dtype)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

BLOCK_DS = (32, 64, 128, 256)


def block_d_for(head_dim: int) -> int:
    """The padded head-dim block: next power of two, at least 32 (tl.dot needs 16; 32 halves the
    number of configurations to compile, at the price of 2-4x padding for D < 32, which no
    production UNet uses)."""
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head dim {head_dim} is outside 1..256 supported by the fused attention kernel")
    return max(32, triton.next_power_of_2(head_dim))


# Fixed configurations under the interpreter: big enough to keep the interpreted loop short.
# Whether the kernels run in the Triton interpreter. Triton decides at decoration time, for its own
# standard library (tl.sum, tl.max ...) when triton is imported and for ours when this module is,
# so TRITON_INTERPRET=1 must be set before triton is first imported; it is fixed for the process.
INTERPRETED = isinstance(_attn_fwd_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)
INTERPRETER_MISMATCH = isinstance(_attn_fwd_kernel, InterpretedFunction) != isinstance(tl.sum, InterpretedFunction)

_INTERP_BLOCKS = {"attn_fwd": (32, 32), "attn_bwd_dkdv": (32, 32), "attn_bwd_dq": (32, 32), "attn_bwd_delta": (32, 0)}


def gpu_configs(kernel: str, block_d: int, dtype: torch.dtype) -> list[triton.Config]:
    """Every configuration the CUDA path may launch for `kernel` at this BLOCK_D and dtype.

    The forward is autotuned between two candidates at the head dims SD1.5/SDXL use (BLOCK_D 64
    and 128); elsewhere, and for the backward kernels, one configuration each: the best tile is
    bounded by register pressure, which these lists already decide, and every candidate costs
    seconds of compile time. Tiles shrink as BLOCK_D grows so the fp32 accumulators
    (BLOCK x BLOCK_D per program) stay in registers; fp32 inputs get their own single-candidate
    table (their tiles need twice the shared memory). Every entry compiles for sm_80 and sm_90 without register spills (tests/kernels).
    """
    half = dtype != torch.float32
    if kernel == "attn_bwd_delta":
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    table = {  # (BLOCK_M, BLOCK_N, warps, stages) per BLOCK_D for 16-bit inputs
        "attn_fwd": {
            32: [(128, 64, 8, 3)],
            64: [(128, 64, 8, 3), (64, 32, 4, 3)],
            128: [(128, 32, 8, 2), (64, 32, 4, 2)],
            256: [(64, 32, 8, 2)],
        },
        # BLOCK_N is the resident key block (dK and dV accumulators), BLOCK_M the streamed queries
        "attn_bwd_dkdv": {32: [(32, 64, 4, 2)], 64: [(32, 64, 4, 2)], 128: [(32, 64, 8, 2)], 256: [(16, 32, 8, 1)]},
        # BLOCK_M is the resident query block (dQ accumulator), BLOCK_N the streamed keys
        "attn_bwd_dq": {32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)], 128: [(64, 32, 8, 2)], 256: [(32, 16, 8, 1)]},
    }
    table_fp32 = {  # one candidate each; 4-byte tiles need twice the shared memory and registers
        "attn_fwd": {32: [(128, 64, 8, 2)], 64: [(128, 64, 8, 2)], 128: [(128, 32, 8, 2)], 256: [(64, 16, 8, 1)]},
        "attn_bwd_dkdv": {32: [(32, 64, 4, 2)], 64: [(32, 32, 4, 2)], 128: [(32, 32, 8, 2)], 256: [(16, 32, 8, 1)]},
        # (64, 32) at BLOCK_D 128 sits at 252-255 registers and spills 8 B on sm_90 with triton 3.9
        "attn_bwd_dq": {32: [(64, 32, 4, 2)], 64: [(64, 32, 4, 2)], 128: [(32, 32, 8, 2)], 256: [(32, 16, 8, 1)]},
    }
    cands = (table if half else table_fp32)[kernel][block_d]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in cands]


def gpu_compile_specs():
    """(kernel name, JIT function, signature, constexprs, num_warps, num_stages) for every
    configuration the CUDA path can launch: the input to the GPU-readiness compile check."""
    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    for name, fn in KERNELS.items():
        for dtype, ptr in ((torch.float32, "*fp32"), (torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
            for block_d in BLOCK_DS:
                for cfg in gpu_configs(name, block_d, dtype):
                    sig, const = {}, dict(cfg.kwargs, BLOCK_D=block_d)
                    for arg in fn.arg_names:
                        if arg in pointers:
                            sig[arg] = ptr
                        elif arg in ("LSE", "DELTA"):
                            sig[arg] = "*fp32"
                        elif arg in ("qk_scale", "sm_scale"):
                            sig[arg] = "fp32"
                        elif arg in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
                            sig[arg] = "constexpr"
                        else:
                            sig[arg] = "i32"
                    yield name, fn, sig, const, cfg.num_warps, cfg.num_stages


_TUNERS: dict = {}


def _launcher(kernel: str, device: torch.device, block_d: int, dtype: torch.dtype):
    """(callable kernel, fixed meta-parameters) for this device: interpreter on CPU, autotuned JIT on CUDA."""
    if INTERPRETER_MISMATCH:
        raise RuntimeError("TRITON_INTERPRET was set after triton was imported but before refl_kernels was: "
                           "set it before anything imports triton")
    if INTERPRETED:
        bm, bn = _INTERP_BLOCKS[kernel]
        meta = {"BLOCK_M": bm} if kernel == "attn_bwd_delta" else {"BLOCK_M": bm, "BLOCK_N": bn}
        return KERNELS[kernel], meta
    if device.type != "cuda":
        raise RuntimeError("the Triton attention kernels run on CUDA, or on CPU only when TRITON_INTERPRET=1 "
                           "was set before triton was imported")
    key = (kernel, block_d, dtype)
    if key not in _TUNERS:
        # DK/DV/DQ are written in full by every config, so re-running during tuning is harmless.
        _TUNERS[key] = triton.autotune(configs=gpu_configs(kernel, block_d, dtype), key=["Nq", "Nk", "D"])(KERNELS[kernel])
    return _TUNERS[key], {}


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (B, H, N, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape != k.shape or k.shape[-1] != D:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError("attention needs at least one query and one key")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention needs q, k, v of one dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides but need the head dim contiguous. The CPU
    interpreter reads strided tensors unreliably, so there everything is made contiguous."""
    if t.device.type == "cpu" or t.stride(-1) != 1:
        return t.contiguous()
    return t


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Launch the forward kernel; returns (O, LSE) with O like q (contiguous) and LSE (B, H, Nq) fp32."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = _empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = _empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if q.device.type == "meta":  # shape/byte accounting only
        return o, lse
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    block_d = block_d_for(D)
    fn, meta = _launcher("attn_fwd", q.device, block_d, q.dtype)
    grid = lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)  # noqa: E731
    fn[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, Nq, Nk, D, scale * LOG2E,
        BLOCK_D=block_d, **meta,
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, scale: float):
    """Launch the three backward kernels; returns (dQ, dK, dV), contiguous, in the input dtype."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq = _empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    dk = _empty((B, H, Nk, D), device=q.device, dtype=q.dtype)
    dv = _empty((B, H, Nk, D), device=q.device, dtype=q.dtype)
    if q.device.type == "meta":
        return dq, dk, dv
    do = _prepare(do)
    q, k, v, o = _prepare(q), _prepare(k), _prepare(v), _prepare(o)
    block_d = block_d_for(D)
    delta = _empty((B, H, Nq), device=q.device, dtype=torch.float32)

    fn, meta = _launcher("attn_bwd_delta", q.device, block_d, q.dtype)
    fn[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, Nq, D, BLOCK_D=block_d, **meta,
    )
    strides_in = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
    )
    fn, meta = _launcher("attn_bwd_dkdv", q.device, block_d, q.dtype)
    fn[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *strides_in,
        dk.stride(0), dk.stride(1), dk.stride(2),
        H, Nq, Nk, D, scale, scale * LOG2E,
        BLOCK_D=block_d, **meta,
    )
    fn, meta = _launcher("attn_bwd_dq", q.device, block_d, q.dtype)
    fn[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *strides_in,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Nq, Nk, D, scale, scale * LOG2E,
        BLOCK_D=block_d, **meta,
    )
    return dq, dk, dv


class FusedAttention(torch.autograd.Function):
    """Saves q, k, v, O and the fp32 log-sum-exp; never the (Nq, Nk) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Fused softmax(q k^T * scale) v with the Triton kernels (CUDA, or the interpreter on CPU)."""
    _check_inputs(q, k, v)
    block_d_for(q.shape[-1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return FusedAttention.apply(q, k, v, float(scale))
