"""Every ``docker_jobs`` app on the daemon from two reads, for ``list`` and ``prune``.

:func:`.daemon.fetch` reads one app: its verdict volume, then its containers by label. The daemon
answers a label filter by scanning every container it has, so a read per app grows with the square
of the apps kept: a dry run of ``prune`` over 2,000 ended apps took 32 s, and ``list`` 24 s, then
1.37 s with only its 50 running apps read one by one (``bench/bench_prune.py``). An
:class:`Inventory` is the scheduler's verdict volumes and containers, each read once for all the
apps; the apps that are over are known from it, and a snapshot of any other is built from it as
:func:`.daemon.fetch` would build it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from torchx.specs import AppState

from torchx_ext.schedulers.docker_jobs import daemon as d


class Ended(NamedTuple):
    """An app with a verdict and no running container: its verdict volume's labels, its containers."""
    verdict: dict[str, str]
    containers: list[dict[str, Any]]

    @property
    def state(self) -> AppState:
        return AppState.__members__.get(self.verdict.get(d.L_STATE, ""), AppState.UNKNOWN)


class Inventory(NamedTuple):
    """The scheduler's verdict volumes' labels and container summaries, by app id."""
    verdicts: dict[str, dict[str, str]]
    containers: dict[str, list[dict[str, Any]]]

    @property
    def app_ids(self) -> list[str]:
        """Every app the daemon knows (containers or a verdict), the newest submission first."""
        return sorted({*self.verdicts, *self.containers} - {""}, key=lambda a: (-self.submitted(a), a))

    def submitted(self, app_id: str) -> float:
        """When the app was submitted: the label its containers were created with (the container's
        own creation time for one without it); the verdict's time if its containers were removed."""
        for c in self.containers.get(app_id, []):
            return float((c.get("Labels") or {}).get(d.L_CREATED) or c.get("Created") or 0)
        return float(self.verdicts.get(app_id, {}).get(d.L_TIME) or 0)

    def ended(self) -> dict[str, Ended]:
        """The apps that are over: a verdict, and no container running. An app that starts or ends
        between the two reads reads as not over."""
        out = {}
        for app_id, labels in self.verdicts.items():
            mine = self.containers.get(app_id, [])
            if not any(c.get("State") in d.RUNNING for c in mine):
                out[app_id] = Ended(labels, mine)
        return out

    def snapshot(self, api: Any, app_id: str) -> Optional[d.Snapshot]:
        """The app's snapshot as :func:`.daemon.fetch` builds it, from the two reads (the containers
        whose details a summary lacks are inspected)."""
        labels = self.verdicts.get(app_id)
        found = (d.verdict_of(labels), labels) if labels is not None else None
        return d.snapshot(api, app_id, found, self.containers.get(app_id, []))


def read(api: Any) -> Inventory:
    """The daemon's two reads: the verdict volumes, then the containers (the order of
    :func:`.daemon.fetch`); retried while the daemon does not answer."""
    marker = f"{d.L_SCHEDULER}={d.SCHEDULER}"
    verdicts: dict[str, dict[str, str]] = {}
    vols = d.retrying(lambda: api.volumes(filters={"label": [marker, d.L_VERDICT]}).get("Volumes") or [])
    for v in vols:
        labels = v.get("Labels") or {}
        app_id = labels.get(d.L_APP_ID, "")
        if app_id and v.get("Name") == d.verdict_volume(app_id):  # not a colliding name of someone else's
            verdicts[app_id] = labels
    containers: dict[str, list[dict[str, Any]]] = {}
    for c in d.retrying(lambda: api.containers(all=True, filters={"label": [marker]})):
        containers.setdefault((c.get("Labels") or {}).get(d.L_APP_ID, ""), []).append(c)
    return Inventory(verdicts, containers)
