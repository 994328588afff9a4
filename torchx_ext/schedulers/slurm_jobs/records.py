"""What this home keeps of each ``slurm_jobs`` app: its record (``slurm_jobs/<app id>/app.json``),
the index ``list`` reads (:mod:`torchx_ext.index`), and the token that names a submission's job
directory."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Mapping, Optional

from torchx_ext import index, state
from torchx_ext.errors import StateError
from torchx_ext.schedulers.slurm_jobs.request import SCHEDULER, record_dir, split_app_id

logger = logging.getLogger(__name__)


def read_record(app_id: str) -> Optional[dict[str, Any]]:
    """The record this home keeps of a slurm_jobs app (None: not an app id of ours, or none)."""
    if split_app_id(app_id) is None:
        return None
    return state.read_json(os.path.join(record_dir(app_id), "app.json"))


def submission_token() -> str:
    """Names a submission's job directory with its job id (``<job id>.<token>``): Slurm gives a job
    id again once its state is reset (a reinstalled or testbed cluster), and the new job must not
    append to the old one's logs or read its exit codes and verdict."""
    return uuid.uuid4().hex[:12]


def index_entry(record: Mapping[str, Any]) -> index.Entry:
    """What list needs of an app: its id, submission time, name and, remote, how to reach its cluster."""
    cluster = {k: record[k] for k in ("login", "identity_file", "ssh_config") if record.get(k)}
    return index.Entry(str(record["app_id"]), float(record.get("submitted") or 0), str(record.get("app_name", "")),
                       extra=cluster)


def entry_from_record(app_id: str) -> Optional[index.Entry]:
    try:
        record = read_record(app_id)
    except StateError as e:  # not listed (as before the index): say so, the others are listed
        logger.warning("%s; this app is not listed", e)
        return None
    if record is None:
        return None
    if not record.get("submitted"):  # written by hand or an old version: the record's time
        try:
            record = {**record, "submitted": os.path.getmtime(os.path.join(record_dir(app_id), "app.json"))}
        except OSError:
            return None
    return index_entry({**record, "app_id": app_id})


# list's index of this home's slurm_jobs apps (see torchx_ext.index)
INDEX = index.AppIndex(SCHEDULER, lambda name: split_app_id(name) is not None, entry_from_record)
