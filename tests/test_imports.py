"""The package imports cleanly: every module on its own in a fresh interpreter, no import cycle
between modules (imports inside functions count: they are dependencies too), every benchmark's
--help runs from the repository root, and no file of the repository takes the name of an
importable module (a benchmark named `kernels.py` once shadowed the package bitsandbytes imports)."""
import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hang import hang_timeout

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"refl_engine": ROOT / "engine", "refl_kernels": ROOT / "refl_kernels"}


def _modules() -> dict[str, Path]:
    """Importable module name -> file, for every .py of the packages (not their data folders)."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if any(not (root / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
                continue  # not inside a package (e.g. a script folder without __init__.py)
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join((pkg, *parts))] = path
    return out


MODULES = _modules()


def _is_type_checking(node) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """The package modules `module` imports anywhere in its file (module level or in functions);
    `if TYPE_CHECKING:` blocks are not imports at run time."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for child in node.body for n in ast.walk(child)}
    found = set()

    def add(name):
        # the longest known module prefix of `name` (an attribute import names the module holding it)
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                add(f"{target}.{alias.name}")  # `from pkg import submodule` or `from module import name`
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: _imports(m, p) for m, p in MODULES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "refl_engine.config" in graph["refl_engine.data"]  # from .config import ConfigError
    assert "refl_engine.rewards.base" in graph["refl_engine.rewards.toy"]
    assert "refl_engine.rewards.pickscore" in graph["refl_engine.rewards.hps"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (modules that import each other, directly or through others): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


_IMPORT_EACH = r"""
import json, os, sys
# third-party libraries first (their import is most of the time), so each child imports only the
# package's own modules afresh
import numpy, torch, safetensors.torch, yaml  # noqa: E401
import diffusers, transformers  # noqa: E401
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection  # noqa: F401
from transformers import AutoTokenizer, HfArgumentParser  # noqa: F401
try:
    import peft  # noqa: F401
except ImportError:
    pass
results = {}
for name in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    results[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own():
    """Each module is imported first, in a fresh copy of an interpreter where no module of the
    package has been imported (a forked child per module)."""
    names = sorted(MODULES)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT, timeout=hang_timeout(600), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [n for n, code in results.items() if code != 0]
    assert not failed, f"modules that do not import on their own: {failed}\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------ benchmarks and shadowing

BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_help_from_the_repository_root(script):
    """As a user runs it: `python benchmarks/X.py --help` from the root (benchmarks/ goes first on
    the import path)."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=hang_timeout(600), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def _top_level_names(folders) -> list[str]:
    """Module names the files (and packages) of `folders` take when the folder is first on the
    import path (`python benchmarks/X.py` puts benchmarks/ there, pytest a test's folder)."""
    names = set()
    for folder in folders:
        names |= {p.stem for p in folder.glob("*.py")}
        names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return sorted(names - {"conftest"})


SCRIPT_FOLDERS = [ROOT / "benchmarks", ROOT / "tests",
                  *(p for p in sorted((ROOT / "tests").rglob("*")) if p.is_dir() and "__pycache__" not in p.parts)]


@functools.lru_cache(maxsize=1)
def _imported_names() -> frozenset[str]:
    """The top-level module names installed packages import somewhere (`import X`, `from X import`),
    whether or not X is installed: bitsandbytes tries `from kernels import get_kernel`, and a file
    kernels.py first on the path answers it. Import statements only, not prose ("from step 4 ...")."""
    import re
    import sysconfig

    pattern = re.compile(rb"^[ \t]*(?:from[ \t]+([A-Za-z_]\w*)(?:\.[\w.]+)?[ \t]+import\b"
                         rb"|import[ \t]+([A-Za-z_]\w*)(?:\.[\w.]+)?[ \t]*(?:$|,|#|as\b))", re.M)
    found = set()
    for dirpath, _, files in os.walk(sysconfig.get_paths()["purelib"]):
        for f in files:
            if f.endswith(".py"):
                try:
                    data = Path(dirpath, f).read_bytes()
                except OSError:
                    continue
                found.update(m.group(1) or m.group(2) for m in pattern.finditer(data))
    return frozenset(n.decode() for n in found)


def _shadowing(names: list[str]) -> list[str]:
    """The names Python can import (stdlib, site-packages) or an installed package imports."""
    code = ("import importlib.util, json, sys; names = json.loads(sys.argv[1]); "
            "print(json.dumps([n for n in names if importlib.util.find_spec(n) is not None]))")
    # -I: isolated, so neither the current folder nor PYTHONPATH is on the path; site-packages is
    proc = subprocess.run([sys.executable, "-I", "-c", code, json.dumps(names)], capture_output=True, text=True,
                          cwd="/", timeout=hang_timeout(300))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted((set(json.loads(proc.stdout)) | _imported_names()) & set(names))


def test_the_shadow_check_sees_an_optional_dependency():
    """bitsandbytes and transformers import `kernels` (installed with transformers >= 5.25, probed
    for before): the name benchmarks/kernels.py and the kernel sources' folder once had."""
    assert _shadowing(["kernels", "refl_engine_no_such_module"]) == ["kernels"]


def test_no_script_shadows_an_importable_module():
    """No file under benchmarks/ or tests/ takes the name of a module Python or an installed package
    imports (installed or not)."""
    shadowing = _shadowing(_top_level_names(SCRIPT_FOLDERS))
    assert not shadowing, f"these files take the name of a module Python or a dependency imports: {shadowing}; " \
                          "rename them"


def test_nothing_at_the_root_shadows_an_importable_module():
    """`python -m refl_engine...` from the repository root puts the root first on the path. The
    Triton/native kernel sources sat in a folder `kernels/` there, which answered `import kernels`:
    once transformers (5.25) required Hugging Face's `kernels` package and imported it whenever it
    was installed, every such command failed at its first transformers import. The folder is now
    `refl_kernels/`, its import name (the installed package is that folder: it shadows nothing)."""
    own = {name for name, folder in PACKAGES.items() if folder == ROOT / name}
    assert own == {"refl_kernels"}
    assert not _shadowing(sorted(set(_top_level_names([ROOT])) - own))
