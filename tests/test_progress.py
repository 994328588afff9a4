"""Progress of long work on a terminal, silence elsewhere, and a workspace over a limit refused at
once naming what is big (issue 21, point 7)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from torchx_ext.errors import InvalidAppError
from torchx_ext.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_on_a_terminal_only() -> None:
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        with Progress("copying", stream=stream, after_s=0) as p:
            p.update(files=3, nbytes=3 * 2**20, force=True)
    assert "copying: 3 files, 3.0 MiB" in tty.getvalue() and tty.getvalue().endswith("s\n")
    assert pipe.getvalue() == ""


def test_short_work_shows_nothing_and_blocking_work_ticks() -> None:
    tty = Tty()
    with Progress("quick", stream=tty) as p:
        p.update(files=1)
    assert tty.getvalue() == ""
    tty = Tty()
    with Progress("upload", stream=tty, after_s=0.1).ticking("uploading"):
        time.sleep(0.6)
    assert "upload: uploading" in tty.getvalue() and "done in" in tty.getvalue()


def test_a_workspace_over_the_limit_is_refused_at_once_naming_the_largest(tmp_path: Any) -> None:
    from torchx_ext.schedulers.workspace import copy_workspace

    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    for i in range(200):
        (ws / "data" / f"shard{i}").write_bytes(b"x" * 2**16)
    (ws / "main.py").write_text("print(1)\n")
    target = str(tmp_path / "copy")
    with pytest.raises(InvalidAppError, match=r"over 1 MiB \(largest so far: data/ 1\.\d MiB.*\.torchxignore"):
        copy_workspace(str(ws), target, max_bytes=2**20)
    assert not os.path.exists(target)


def test_rsync_progress_lines_are_shown_and_a_silent_hang_times_out() -> None:
    from torchx_ext.schedulers.slurm_jobs.transfer import run_reporting

    tty = Tty()
    script = ("import sys, time\n"
              "for n in (25, 50, 100):\n"
              "    sys.stdout.write(f'      1,{n:03d}  {n}%%    1.00MB/s    0:00:01\\r'); sys.stdout.flush()\n"
              "    time.sleep(0.1)\n"
              "print('Total transferred file size: 1,100 bytes')\n").replace("%%", "%")
    with Progress("shipping", stream=tty, after_s=0) as p:
        proc = run_reporting([sys.executable, "-c", script], 30, p)
    assert proc.returncode == 0 and "Total transferred file size: 1,100" in proc.stdout
    assert "shipping: 1,100 bytes, 100%, 1.00MB/s" in tty.getvalue()
    with Progress("hang", stream=Tty()) as p, pytest.raises(subprocess.TimeoutExpired):
        run_reporting(["sleep", "30"], 0.5, p)
