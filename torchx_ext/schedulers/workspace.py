"""A ``--workspace`` copied for a submission (host and slurm_jobs copy it into a private directory;
ray_jobs ships it as the job's working_dir): TorchX's ignore rules, a size limit, progress."""

from __future__ import annotations

import os
import shutil
from typing import (
    Optional,
)

from torchx_ext.errors import (
    InvalidAppError,
)


def is_current_dir(workspace: str) -> bool:
    """Is ``workspace`` (a path or ``file://`` URL) the current directory, TorchX CLI's default?"""
    local = workspace[len("file://"):] if workspace.startswith("file://") else workspace
    return "://" not in local and os.path.realpath(local) == os.path.realpath(os.getcwd())


def copy_workspace(workspace: str, target: str, ignore_file: str = ".torchxignore",
                   max_bytes: Optional[int] = None, skip_under: Optional[str] = None) -> int:
    """Copies ``workspace`` (an fsspec URL) into the new directory ``target``, minus what
    ``ignore_file`` excludes (TorchX's DirWorkspace rules); returns the bytes copied.

    Args:
        workspace: the source directory
        target: created; must not exist
        ignore_file: the ignore file's name in the workspace
        max_bytes: raise :class:`~torchx_ext.errors.InvalidAppError` (and remove ``target``) past this
        skip_under: a local directory never copied (e.g. our home inside the workspace)
    """
    import fsspec
    from torchx.workspace.api import walk_workspace

    from torchx_ext.progress import Progress, mib
    from torchx_ext.state import FILE_MODE, makedirs

    fs, root = fsspec.core.url_to_fs(workspace)
    makedirs(target, exist_ok=False)
    size = files_copied = 0
    by_entry: dict[str, int] = {}  # bytes per top-level entry: what to name when over max_bytes
    skip = os.path.realpath(skip_under) if skip_under else None
    with Progress(f"copying the workspace {workspace}") as progress:
        for dirpath, _dirs, files in walk_workspace(fs, root, ignore_file):
            rel = os.path.relpath(dirpath, root)
            if skip and os.path.realpath(os.path.join(root, rel)).startswith(skip):
                continue
            for name, info in files.items():
                if info.get("type") != "file":
                    continue
                nbytes = int(info.get("size") or 0)
                size += nbytes
                top = os.path.normpath(os.path.join(rel, name)).split(os.sep, 1)
                entry = top[0] + ("/" if len(top) > 1 else "")
                by_entry[entry] = by_entry.get(entry, 0) + nbytes
                if max_bytes is not None and size > max_bytes:
                    # refused at the first byte over the limit, not after a scan of the whole tree
                    shutil.rmtree(target, ignore_errors=True)
                    biggest = sorted(by_entry.items(), key=lambda kv: -kv[1])[:3]
                    raise InvalidAppError(
                        f"the workspace {workspace} is over {max_bytes // 2**20} MiB (largest so far: "
                        + ", ".join(f"{k} {mib(v)}" for k, v in biggest)
                        + f"); list what the job does not need (virtualenvs, data, checkpoints) in a "
                        f"{ignore_file} file in it"
                    )
                dst = os.path.normpath(os.path.join(target, rel, name))
                makedirs(os.path.dirname(dst))
                # private from creation (0600); then the source's owner bits only (a script stays
                # executable), never group/other: the copy lives in the user's private state
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                with os.fdopen(fd, "wb") as out, fs.open(info["name"], "rb") as src:
                    shutil.copyfileobj(src, out)
                if info.get("mode") is not None:
                    os.chmod(dst, info["mode"] & 0o700)
                files_copied += 1
                progress.update(files=files_copied, nbytes=size)
    return size
