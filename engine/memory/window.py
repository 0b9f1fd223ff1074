"""The gradient window's memory plan: what each grad-carrying UNet call keeps, chosen under a byte
budget with the least recomputation. Runtime code (`--recompute auto` plans every window with it)
and the offline planner share it; it imports nothing else from the engine.

A call is summarised by a `CallProfile` (bytes, measured by `measure.profile_call` on real tensors
or traced on the meta device by the planner):

    retained   bytes the call leaves alive for backward (its output excluded)
    fwd_peak   peak above the bytes live before the call, during its forward
    bwd_peak   peak above the bytes live before the call, during its backward (recompute included)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Recompute cost of one window step under each kind, in UNet forwards. `lean` re-runs normalisation
# and elementwise ops only (memory-bound; 1.06-1.07x `none`'s time on CPU); `selective` is a
# `full` checkpoint plus that; `nested` recomputes every UNet block but the last once more on top
# of `selective` (0.75 of a forward's FLOPs on SD1.5, 0.95 on SDXL, 0.62 on tiny-sd: 0.85).
RECOMPUTE_COST = {"none": 0.0, "lean": 0.05, "full": 1.0, "selective": 1.05, "nested": 1.9}
WINDOW_KINDS = ("none", "lean", "full", "selective", "nested")


@dataclass
class CallProfile:
    retained: int
    fwd_peak: int
    bwd_peak: int
    saved: int = 0  # saved-for-backward bytes (autograd's own, `none` only), params excluded
    # CPU only, `none` only, 0.0 = not measured: the resident memory (RSS) the forward added, with
    # glibc's heap trimmed before it, over the tensor bytes it left live (`measure.profile_call`)
    rss_factor: float = 0.0

    def scaled(self, factor: float) -> "CallProfile":
        """The profile at `factor` times the traced batch: activations are proportional to the
        batch (weights are excluded; batch-independent bytes are a few hundred at most)."""
        return CallProfile(*(int(round(v * factor)) for v in (self.retained, self.fwd_peak, self.bwd_peak, self.saved)),
                           rss_factor=self.rss_factor)


@dataclass
class WindowPlan:
    kinds: list[str]  # per window position
    peak: int  # bytes above the live bytes at window start, including `after`
    window_kept: int  # bytes kept for backward at the end of the window forward
    phase: str  # which phase sets the peak
    recompute_cost: float  # UNet forwards of recomputation
    fits: bool

    @property
    def counts(self) -> dict[str, int]:
        return {k: self.kinds.count(k) for k in dict.fromkeys(self.kinds)}


def _window_peak(blocks: list[tuple[str, int]], profiles: dict[str, CallProfile], latent_bytes: int,
                 after: int) -> tuple[int, int, str]:
    """Peak of a window whose positions run `blocks` [(kind, count), ...] in order, then `after`
    (decode + reward peak) on top of everything kept. Returns (peak, kept, phase)."""
    kept = latent_bytes  # x_T's successor chain: each step's input latent stays referenced
    best, phase = 0, ""
    for kind, n in blocks:
        if n == 0:
            continue
        p = profiles[kind]
        per_step = p.retained + latent_bytes
        before_last = kept + per_step * (n - 1)
        for value, name in ((before_last + p.fwd_peak, f"forward of a '{kind}' step"),
                            (before_last + p.bwd_peak, f"backward of a '{kind}' step")):
            if value > best:
                best, phase = value, name
        kept = before_last + per_step
    if kept + after > best:
        best, phase = kept + after, "VAE decode / reward"
    return best, kept, phase


def plan_window(window_size: int, profiles: dict[str, CallProfile], available: int, after: int = 0,
                latent_bytes: int = 0, kinds: Sequence[str] | None = None) -> WindowPlan:
    """Choose per window position what to keep so the step fits in `available` bytes (above those
    live at window start) with the least recomputation; exact over every choice of kinds.

    Step j's forward and its backward both peak at P_j + c_j, where P_j is what the steps before
    it keep (each keeps s = retained + one latent) and c = max(fwd_peak, bwd_peak): backward visits
    the last step first and frees its activations before it reaches the earlier ones. For a given
    count of each kind the order that minimises max_j(P_j + c_j) puts the kinds in decreasing
    c - s (swap two neighbours that break this order and neither of their peaks rises), so
    every count vector (n_k per kind) is evaluated once in that order: C(W + 4, 4) vectors with the
    five kinds, 316,251 at W = 50. The cheapest that fits wins, ties to the lower peak;
    if nothing fits, the lowest-peak plan is returned with fits=False.
    """
    W = int(window_size)
    if W == 0:
        return WindowPlan([], after, 0, "VAE decode / reward", 0.0, after <= available)
    names = [k for k in (kinds or profiles) if k in profiles and k in WINDOW_KINDS]
    # decreasing c - s; ties keep the kinds that recompute more first
    order = sorted(names, key=lambda k: (-(max(profiles[k].fwd_peak, profiles[k].bwd_peak)
                                           - profiles[k].retained - latent_bytes), -RECOMPUTE_COST[k]))
    # Every count vector, in numpy: per count of the first kind, all vectors of the others at once
    # (C(W + 4, 4) = 316,251 vectors at W = 50 with five kinds; exact int64 bytes, costs in
    # thousandths, exact for RECOMPUTE_COST's values). numpy, not torch: `--recompute auto` plans
    # while the CPU byte tracker may be counting torch's allocations.
    per = [(profiles[k].retained + latent_bytes, max(profiles[k].fwd_peak, profiles[k].bwd_peak),
            round(1000 * RECOMPUTE_COST[k])) for k in order]
    (s0, c0, u0), rest = per[0], per[1:]
    best = lowest = None  # (cost, peak, counts)
    cheapest = min((u for _, _, u in rest), default=0)
    for n0 in range(W + 1):
        if best is not None and n0 * u0 + (W - n0) * cheapest > best[0]:
            continue  # nothing in this block is as cheap as the plan in hand
        ns = _count_vectors(W - n0, len(rest))  # (kinds, vectors): one contiguous row per kind
        width = ns.shape[1]
        if not width:
            continue
        kept = np.full(width, latent_bytes + n0 * s0, dtype=np.int64)  # P_j, then everything kept
        peak = np.full(width, latent_bytes + (n0 - 1) * s0 + c0 if n0 else 0, dtype=np.int64)
        cost = np.full(width, n0 * u0, dtype=np.int64)
        for n, (s, c, u) in zip(ns, rest):
            kept += n * s
            peak = np.maximum(peak, np.where(n > 0, kept - s + c, 0))  # this block's last step: P_j + c_j
            cost += n * u
        peak = np.maximum(peak, kept + after)
        fits = peak <= available
        if fits.any():  # the cheapest that fits, ties to the lower peak, then the first
            cand = fits & (cost == cost[fits].min())
            i = int(np.argmax(cand & (peak == peak[cand].min())))
            if best is None or (cost[i], peak[i]) < best[:2]:
                best = (cost[i], peak[i], [n0, *ns[:, i].tolist()])
        if best is None:  # the lowest peak, ties to the cheaper
            cand = peak == peak.min()
            i = int(np.argmax(cand & (cost == cost[cand].min())))
            if lowest is None or (peak[i], cost[i]) < lowest[:2]:
                lowest = (peak[i], cost[i], [n0, *ns[:, i].tolist()])
    counts = (best or lowest)[2]
    blocks = list(zip(order, counts))
    peak, kept, phase = _window_peak(blocks, profiles, latent_bytes, after)
    kinds_out = [k for k, n in blocks for _ in range(n)]
    return WindowPlan(kinds_out, peak, kept, phase, sum(RECOMPUTE_COST[k] * n for k, n in blocks), best is not None)


_VECTORS: dict[tuple[int, int], np.ndarray] = {}


def _count_vectors(total: int, k: int) -> np.ndarray:
    """Every (n_1, ..., n_k) of non-negative integers summing to `total`, as the columns of a
    read-only (k, C(total + k - 1, k - 1)) array (small ones remembered)."""
    if (total, k) in _VECTORS:
        return _VECTORS[total, k]
    rows = np.zeros((0, 1 if k or not total else 0), dtype=np.int64)  # no kinds: only a total of 0
    for _ in range(k - 1):  # add a kind: each vector extended by 0 .. what is left of `total`
        reps = total - rows.sum(axis=0) + 1
        col = np.arange(reps.sum(), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
        rows = np.concatenate([np.repeat(rows, reps, axis=1), col[None]], axis=0)
    if k:
        rows = np.concatenate([rows, (total - rows.sum(axis=0))[None]], axis=0)
    rows = np.ascontiguousarray(rows)
    rows.setflags(write=False)
    if rows.size <= 1 << 20:
        _VECTORS[total, k] = rows
    return rows
