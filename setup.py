"""Thin shim: CMakeLists.txt holds the build; this only runs CMake for pyasgd._C (pybind11's
cmake_example pattern). `pip install -e .` builds the extension in place."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        version = self.distribution.get_version()
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYASGD_VERSION={version}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        cfg += os.environ.get("CMAKE_ARGS", "").split()
        subprocess.run(["cmake", str(ROOT), *cfg], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("pyasgd._C")], cmdclass={"build_ext": CMakeBuild})
