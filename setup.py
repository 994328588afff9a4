"""Build hook: ship ``torchx_ext_builtins.pth`` at the top of site-packages, editable installs included.

Everything else is declared in setup.cfg. The .pth file is the one thing setuptools cannot declare:
it registers a finder that gives torchx 0.7.0 its built-in schedulers back, and lists ours beside
them (see torchx_ext/_builtin_entry_points.py for why). A regular wheel gets it from ``build_py``.
An editable wheel (``pip install -e .``, PEP 660) ships no build_py output, only setuptools' own
path finder: without the .pth torchx 0.7.0 would see none of our schedulers, so the file is added
to the editable wheel once setuptools has written it (with its line in the wheel's RECORD).
"""
import base64
import glob
import hashlib
import os
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "torchx_ext_builtins.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchx_ext", PTH)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


def add_to_wheel(wheel: str, name: str, data: bytes) -> None:
    """Adds a top-level file to a built wheel, and its line to the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as z:
        entries = [(info, z.read(info)) for info in z.infolist() if info.filename != name]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    line = f"{name},sha256={digest},{len(data)}\n".encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
        for info, content in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                content = line + content
            z.writestr(info, content)


class EditableWheelWithPth(editable_wheel):
    def run(self) -> None:
        super().run()
        with open(PTH_SOURCE, "rb") as f:
            data = f.read()
        for wheel in glob.glob(os.path.join(os.fspath(self.dist_dir), "*.whl")):
            add_to_wheel(wheel, PTH, data)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
