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

import itertools
from dataclasses import dataclass
from typing import Sequence

# Recompute cost of one window step under each kind, in UNet forwards. `lean` re-runs normalisation
# and elementwise ops only (memory-bound; 1.06-1.07x `none`'s time on CPU); `selective` is a
# `full` checkpoint plus that.
RECOMPUTE_COST = {"none": 0.0, "lean": 0.05, "full": 1.0, "selective": 1.05}
WINDOW_KINDS = ("none", "lean", "full", "selective")


@dataclass
class CallProfile:
    retained: int
    fwd_peak: int
    bwd_peak: int
    saved: int = 0  # saved-for-backward bytes (autograd's own, `none` only), params excluded

    def scaled(self, factor: float) -> "CallProfile":
        """The profile at `factor` times the traced batch: activations are proportional to the
        batch (weights are excluded; batch-independent bytes are a few hundred at most)."""
        return CallProfile(*(int(round(v * factor)) for v in (self.retained, self.fwd_peak, self.bwd_peak, self.saved)))


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
    every count vector (n_full, n_selective, n_lean, n_none) is evaluated once in that order:
    C(W + 3, 3) vectors, 23,426 at W = 50. The cheapest that fits wins, ties to the lower peak;
    if nothing fits, the lowest-peak plan is returned with fits=False.
    """
    W = int(window_size)
    if W == 0:
        return WindowPlan([], after, 0, "VAE decode / reward", 0.0, after <= available)
    names = [k for k in (kinds or profiles) if k in profiles and k in WINDOW_KINDS]
    # decreasing c - s; ties keep the kinds that recompute more first
    order = sorted(names, key=lambda k: (-(max(profiles[k].fwd_peak, profiles[k].bwd_peak)
                                           - profiles[k].retained - latent_bytes), -RECOMPUTE_COST[k]))
    step_kept = [profiles[k].retained + latent_bytes for k in order]
    step_peak = [max(profiles[k].fwd_peak, profiles[k].bwd_peak) for k in order]
    step_cost = [RECOMPUTE_COST[k] for k in order]
    best = lowest = None  # (cost, peak, counts)

    def counts():  # every (n_1, ..., n_k) summing to W: stars and bars over k - 1 bar positions
        k = len(order)
        for bars in itertools.combinations(range(W + k - 1), k - 1):
            edges = (-1,) + bars + (W + k - 1,)
            yield tuple(edges[i + 1] - edges[i] - 1 for i in range(k))

    for ns in counts():
        cost = sum(c * n for c, n in zip(step_cost, ns))
        if best is not None and cost > best[0]:
            continue
        kept, peak = latent_bytes, 0
        for s, c, n in zip(step_kept, step_peak, ns):
            if n:
                peak = max(peak, kept + s * (n - 1) + c)
                kept += s * n
        peak = max(peak, kept + after)
        if lowest is None or (peak, cost) < (lowest[1], lowest[0]):
            lowest = (cost, peak, ns)
        if peak <= available and (best is None or (cost, peak) < (best[0], best[1])):
            best = (cost, peak, ns)
    cost, _, ns = best or lowest
    blocks = list(zip(order, ns))
    peak, kept, phase = _window_peak(blocks, profiles, latent_bytes, after)
    kinds_out = [k for k, n in blocks for _ in range(n)]
    return WindowPlan(kinds_out, peak, kept, phase, cost, best is not None)
