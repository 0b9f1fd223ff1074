"""Suite-wide setup: one thread per process, a private cache, offline hub, fixed random state, and
the seed sweep.

Every test is deterministic by default. Tests that draw random inputs take the `seed` fixture
(seed 0 unless asked otherwise) and seed a local generator with it; every test also starts from
the same global random state (torch, numpy, random reseeded to 0 before it runs), so a test's
inputs never depend on which tests ran before it in the same worker (the suite runs with -n 2).

Randomized testing is an explicit sweep:
    REFL_TEST_SEEDS=50 pytest tests/...      (or --seed-sweep 50)   seed-taking tests run over seeds 0..49
    REFL_TEST_SEED=17 pytest tests/...       (or --test-seed 17)    one seed, to reproduce a failure
A failing seed-taking test prints its seed and the command that reruns it. --tolerance-report
prints, per test, the worst error / tolerance ratio the tests/numerics.py checks measured.
"""
import os
import random
import re

# Set before anything imports huggingface_hub (it reads these once, at import): no test reaches the
# hub, whichever test directory is collected first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import numerics  # noqa: E402

# Keep each test process to one thread: the suite runs with -n 2 on 2 cores.
torch.set_num_threads(1)

DEFAULT_SEED = 0


def pytest_addoption(parser):
    group = parser.getgroup("refl-engine seeds")
    group.addoption("--seed-sweep", type=int, default=None, metavar="N",
                    help="run every seed-taking test over seeds 0..N-1 (env REFL_TEST_SEEDS)")
    group.addoption("--test-seed", type=int, default=None, metavar="K",
                    help="run every seed-taking test with seed K only (env REFL_TEST_SEED)")
    group.addoption("--tolerance-report", action="store_true",
                    help="print each test's worst error / tolerance ratio (tests/numerics.py checks)")


def _env_int(name):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{name}={value!r} is not an integer") from None


def _sweep(config) -> int | None:
    n = config.getoption("seed_sweep")
    n = _env_int("REFL_TEST_SEEDS") if n is None else n
    if n is not None and n < 1:
        raise pytest.UsageError(f"the seed sweep needs at least one seed, got {n}")
    return n


def _single_seed(config) -> int:
    k = config.getoption("test_seed")
    k = _env_int("REFL_TEST_SEED") if k is None else k
    return DEFAULT_SEED if k is None else k


def pytest_configure(config):
    n, k = _sweep(config), config.getoption("test_seed")
    if n is not None and (k is not None or _env_int("REFL_TEST_SEED") is not None):
        raise pytest.UsageError("choose a seed sweep (REFL_TEST_SEEDS / --seed-sweep) or one seed "
                                "(REFL_TEST_SEED / --test-seed), not both")
    # in the environment too, so that tests rerun in a subprocess (the Triton interpreter ones)
    # collect the same seed-parametrized ids
    if n is not None:
        os.environ["REFL_TEST_SEEDS"] = str(n)
    if k is not None:
        os.environ["REFL_TEST_SEED"] = str(k)


def pytest_generate_tests(metafunc):
    # Only a sweep parametrizes: by default the `seed` fixture below gives one seed, so test ids
    # stay as they are.
    n = _sweep(metafunc.config)
    if n is not None and "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", range(n), ids=[f"seed{s}" for s in range(n)])


@pytest.fixture
def seed(request):
    """The seed of a randomized test: DEFAULT_SEED, REFL_TEST_SEED, or one of the sweep's seeds."""
    return _single_seed(request.config)


@pytest.fixture(autouse=True)
def _fixed_global_random_state():
    """The same global random state at the start of every test, whatever ran before it."""
    torch.manual_seed(DEFAULT_SEED)
    random.seed(DEFAULT_SEED)
    np.random.seed(DEFAULT_SEED)
    yield


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The engine's cache (tiny preset, planner traces) in a fresh directory per test process, so
    the suite tests the code as it is, not traces cached by an older version in ~/.cache, and never
    shares a directory with a concurrent run. An explicitly set REFL_ENGINE_CACHE is kept (a warm
    cache makes the planner CLI tests ~50 s faster)."""
    if os.environ.get("REFL_ENGINE_CACHE"):
        yield os.environ["REFL_ENGINE_CACHE"]
        return
    path = str(tmp_path_factory.mktemp("refl-engine-cache"))
    os.environ["REFL_ENGINE_CACHE"] = path
    yield path
    os.environ.pop("REFL_ENGINE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_sd_dir(_private_cache):
    """The tiny preset, built once per test process in the private cache."""
    from refl_engine.models.load import tiny_sd_path

    return str(tiny_sd_path())


# ---------------------------------------------------------------- failure messages and the report

_REPORT: dict[str, list] = {}  # nodeid -> [(label, ratio)], filled on the controller under xdist


def _without_seed(nodeid: str) -> str:
    """`test_x[seed3-a-b]` -> `test_x[a-b]`, `test_x[seed3]` -> `test_x`: the test across a sweep."""
    return re.sub(r"\[seed\d+\]$|(?<=\[)seed\d+-|-seed\d+(?=[-\]])", "", nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    numerics.RATIOS.clear()
    yield
    for label, ratio in numerics.RATIOS:
        item.user_properties.append(("tolerance_ratio", (label, ratio)))
    numerics.RATIOS.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "seed" in getattr(item, "funcargs", {}):
        s = item.funcargs["seed"]
        report.sections.append(("seed", f"failed with seed {s}; rerun: REFL_TEST_SEED={s} pytest '{_without_seed(item.nodeid)}'"))


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    ratios = [v for k, v in report.user_properties if k == "tolerance_ratio"]
    if ratios:
        _REPORT.setdefault(report.nodeid, []).extend(ratios)


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("tolerance_report") or not _REPORT:
        return
    worst: dict[str, tuple[float, str, str]] = {}
    for nodeid, ratios in _REPORT.items():
        label, ratio = max(ratios, key=lambda lr: lr[1])
        test = _without_seed(nodeid)
        if test not in worst or ratio > worst[test][0]:
            worst[test] = (ratio, label, nodeid)
    terminalreporter.section("worst error / tolerance ratio per test (1.0 = at the tolerance)")
    for test, (ratio, label, nodeid) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{ratio:7.3f}  {nodeid}  ({label})")
