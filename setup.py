"""Build hook: ship ``torchx_ext_builtins.pth`` at the top of site-packages.

Everything else is declared in setup.cfg. The .pth file is the one thing setuptools cannot declare:
it registers a finder that gives torchx 0.7.0 its built-in schedulers back (see
torchx_ext/_builtin_entry_points.py for why).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "torchx_ext_builtins.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchx_ext", PTH)
        self.copy_file(src, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
