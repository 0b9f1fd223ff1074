"""The CPU byte tracker against allocation patterns whose live bytes are known by construction."""
import random

import torch

from refl_engine.memory.measure import LiveBytesTracker, SavedTensorCounter, component, measure_peak


def test_tracker_exact_on_handmade_pattern(seed):
    # A random sequence of allocations and releases; the expected peak is computed from sizes alone.
    rng = random.Random(seed)
    n_ops = 200
    held: dict[int, torch.Tensor] = {}
    expected_live = expected_peak = 0
    with LiveBytesTracker(include_existing=False) as tracker:
        for i in range(n_ops):
            if held and rng.random() < 0.4:
                key = rng.choice(list(held))
                t = held.pop(key)
                expected_live -= t.untyped_storage().nbytes()
                del t
            else:
                numel = rng.randint(1, 5000)
                dtype = rng.choice([torch.float32, torch.float16, torch.int64, torch.uint8])
                held[i] = torch.empty(numel, dtype=dtype)
                expected_live += numel * held[i].element_size()
                expected_peak = max(expected_peak, expected_live)
            assert tracker.live == expected_live
        assert tracker.peak == expected_peak
        held.clear()
        assert tracker.live == 0


def test_views_share_storage_and_release_on_last_view():
    with LiveBytesTracker(include_existing=False) as tracker:
        a = torch.randn(1000)  # 4000 bytes
        v = a[100:].view(30, 30)
        w = a.view(10, 100).t()
        assert tracker.live == 4000
        del a, w
        assert tracker.live == 4000  # v keeps the storage
        del v
        assert tracker.live == 0
    assert tracker.peak == 4000


def test_transient_inside_expression_counts_in_peak():
    n = 1 << 16
    x = torch.randn(n)
    with LiveBytesTracker(include_existing=False) as tracker:
        y = (x * 2).sum()  # the n-element product lives until sum() has read it
    assert tracker.peak == 4 * n + 4
    assert tracker.live == 4  # only y survives
    del y


def test_existing_tensors_are_baseline_and_their_release_is_seen():
    big = torch.empty(12345, dtype=torch.float64)
    with LiveBytesTracker(devices={"cpu"}) as tracker:
        base = tracker.live
        assert base >= big.nbytes
        del big
        assert tracker.live == base - 12345 * 8


def test_autograd_saved_tensors_and_backward_tracked():
    # y = sum(exp(x)): exp saves its output; backward allocates grad = exp(x) * 1 and frees the
    # saved output after the graph is released.
    n = 1 << 14
    x = torch.randn(n, requires_grad=True)
    with LiveBytesTracker(include_existing=False) as tracker:
        e = torch.exp(x)
        y = e.sum()
        del e
        assert tracker.live == 4 * n + 4  # exp output kept alive by autograd, plus y
        y.backward()
        del y
    assert x.grad is not None
    # the grad of x (4n) was allocated while exp's output (4n) was still saved
    assert tracker.peak >= 8 * n
    assert tracker.live == 4 * n  # x.grad remains


def test_component_tags_at_peak():
    with LiveBytesTracker(include_existing=False) as tracker:
        with component("unet"):
            a = torch.empty(1000)
        with component("vae"):
            b = torch.empty(500)
        del a
        c = torch.empty(200)
    assert tracker.peak == 6000
    assert tracker.peak_by_tag == {"unet": 4000, "vae": 2000}
    del b, c


def test_measure_peak_cpu():
    def step():
        t = torch.empty(2048)
        u = torch.empty(1024)
        del t
        return u

    out, m = measure_peak(step)
    assert m.peak_bytes - m.baseline_bytes == 3 * 4096


def test_saved_tensor_counter_views_once_params_excluded():
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensorCounter(exclude=[w]) as c:
        h = x @ w  # saves x (and w, excluded)
        r = torch.sigmoid(h)  # saves its output r
        r2 = r[:, :32] * r[:, 32:]  # saves two views of r: same storage
    assert c.bytes == x.nbytes + r.nbytes
