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
