"""Images for ``docker_jobs``: the pull policy, and workspace builds on the local daemon.

Nothing here pulls an image that is present locally unless ``pull_policy=always``; workspace builds
run with ``pull=False`` (TorchX's ``local_docker`` tries a pull before every run and every build).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from typing import Any, Mapping

from torchx.workspace.api import walk_workspace

from torchx_ext.errors import BackendError, InvalidAppError
from torchx_ext.progress import Progress
from torchx_ext.schedulers.docker_jobs import daemon as w

TORCHX_DOCKERFILE = "Dockerfile.torchx"
DEFAULT_DOCKERFILE = b"ARG IMAGE\nFROM $IMAGE\n\nCOPY . .\n"


def build_context(workspace: str) -> Any:
    """A tar of ``workspace`` (minus ``.dockerignore`` matches) with a Dockerfile.torchx in it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(workspace)
    f = tempfile.TemporaryFile(prefix="torchx-ext-context-", suffix=".tar")
    with tarfile.open(fileobj=f, mode="w") as tf:
        for dirpath, _dirs, files in walk_workspace(fs, root, ".dockerignore"):
            rel = os.path.relpath(dirpath, root)
            for name, meta in files.items():
                info: Mapping[str, Any] = meta  # fsspec's info(): values typed by the filesystem
                if info.get("type") != "file":
                    continue
                ti = tarfile.TarInfo(name if rel == "." else f"{rel}/{name}")
                ti.size = int(info["size"])
                if info.get("mode") is not None:
                    ti.mode = info["mode"] & 0o777
                with fs.open(info["name"], "rb") as src:
                    tf.addfile(ti, src)
        if TORCHX_DOCKERFILE not in tf.getnames():
            ti = tarfile.TarInfo(TORCHX_DOCKERFILE)
            ti.size = len(DEFAULT_DOCKERFILE)
            tf.addfile(ti, io.BytesIO(DEFAULT_DOCKERFILE))
    f.seek(0)
    return f


def ensure_image(api: Any, image: str, policy: str) -> None:
    """Makes ``image`` available by ``policy``; never pulls a local image unless 'always'."""
    import docker

    if policy != "always" or image.startswith("sha256:"):
        try:
            api.inspect_image(image)
            return
        except docker.errors.NotFound:
            if policy == "never" or image.startswith("sha256:"):
                raise InvalidAppError(f"image '{image}' is not present locally and pull_policy={policy}; build or "
                                      "load it first, or use pull_policy=if-not-present") from None
    repo, tag = docker.utils.parse_repository_tag(image)
    try:
        api.pull(repo, tag=tag or "latest")
    except docker.errors.APIError as e:
        raise BackendError(f"could not pull image '{image}' (pull_policy={policy}): {w.explain(e)}") from e


def build_workspace(api: Any, image: str, workspace: str) -> str:
    """Builds ``image`` plus ``workspace`` (TorchX's conventions) and returns the new image's id.

    A ``Dockerfile.torchx`` in the workspace is used (build args ``IMAGE`` and ``WORKSPACE``),
    else ``FROM $IMAGE`` + ``COPY . .``; ``.dockerignore`` is honoured; the build never pulls.
    """
    context = build_context(workspace)
    image_id, log = None, []
    try:
        with Progress(f"building the workspace {workspace} into an image") as progress:
            for event in api.build(
                fileobj=context, custom_context=True, dockerfile=TORCHX_DOCKERFILE,
                buildargs={"IMAGE": image, "WORKSPACE": workspace}, pull=False, rm=True,
                forcerm=True, decode=True, labels={w.L_SCHEDULER: w.SCHEDULER, w.P + "workspace": workspace},
            ):
                line = str(event.get("stream") or "").rstrip()
                log.append(line)
                if line.startswith("Step "):  # "Step 2/3 : COPY . ." is the build's own progress
                    progress.update(line)
                if "error" in event:
                    tail = "\n".join(x for x in log[-15:] if x)
                    raise BackendError(
                        f"building workspace '{workspace}' on '{image}' failed: {event['error']}\n{tail}")
                if event.get("aux", {}).get("ID"):
                    image_id = event["aux"]["ID"]
    finally:
        context.close()
    if not image_id:
        raise BackendError(f"building workspace '{workspace}' on '{image}' returned no image id")
    return str(image_id)
