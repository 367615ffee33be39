"""The build report and the console script, run as a user runs them."""
import shutil
import subprocess
import sys


def test_info_reports_build():
    r = subprocess.run([sys.executable, "-m", "pyasgd.info"], capture_output=True, text=True, check=True)
    for key in ("cpu_simd", "cpu_threads", "cuda_built", "cuda_archs", "torch", "extension_version"):
        assert key in r.stdout, r.stdout
    simd = next(line for line in r.stdout.splitlines() if "cpu_simd" in line).split(":")[1].strip()
    assert simd in ("avx512", "avx2", "scalar")


def test_console_script_help():
    exe = shutil.which("pyasgd-train")
    assert exe, "pyasgd-train is not on PATH: install with `pip install -e .`"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: pyasgd-train" in r.stdout


def test_type_stub_matches_the_compiled_module():
    import ast
    import os

    import pyasgd._C as C

    with open(os.path.join(os.path.dirname(C.__file__), "_C.pyi")) as f:
        tree = ast.parse(f.read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    public = {n for n in dir(C) if not n.startswith("_")} | {"__version__"}
    assert names == public, (names ^ public)
    region = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Region")
    stubbed = {n.name for n in region.body if isinstance(n, ast.FunctionDef)}
    stubbed |= {n.target.id for n in region.body if isinstance(n, ast.AnnAssign)}
    assert stubbed == {n for n in dir(C.Region) if not n.startswith("_")}
