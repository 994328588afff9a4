"""What a ``ray_jobs`` app needs of the cluster, and the preflight: can the cluster run it at all?

One request for the Ray version and one for the nodes (state API), reused for ``CACHE_S``; an app
that no node can hold is refused before anything is submitted, saying what is missing.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Tuple

from torchx.specs import Role

from torchx_ext.errors import InvalidAppError, SchedulerUnavailable
from torchx_ext.schedulers.ray_jobs.adapter import is_unreachable, request, unreachable_message

# What the cluster offers holds for a cluster, not for a job: fetched once per dashboard and
# reused for CACHE_S by every submission of this process (and thread-safe, as the scheduler is).
# A refusal is never made on cached answers: the cluster is asked again first (a node may have
# joined since).
CACHE_S = 10.0
_cache: Dict[str, Tuple[float, Mapping[str, Any]]] = {}
_cache_lock = threading.Lock()


def _fetch(client: Any, url: str, warn: Any) -> Mapping[str, Any]:
    try:
        version = request(client, "GET", "/api/version").json()
        nodes_resp: Mapping[str, Any] = request(client, "GET", "/api/v0/nodes?detail=1&limit=10000").json()
    except Exception as e:
        if is_unreachable(e):
            raise SchedulerUnavailable(unreachable_message(url, e)) from None
        raise
    try:
        import ray

        local = ray.__version__
    except ImportError:
        local = "unknown"
    remote = version.get("ray_version", "unknown")
    if local.split(".")[:2] != str(remote).split(".")[:2]:
        warn(f"Ray client {local} and cluster {remote} differ; the Jobs API is compatible across "
             "versions, but the driver runs with the cluster's Ray")
    with _cache_lock:
        _cache[url] = (time.monotonic(), nodes_resp)
    return nodes_resp


def preflight(client: Any, url: str, needs: Iterable[Mapping[str, float]],
              label_selector: Mapping[str, str], warn: Any) -> None:
    """Checks the cluster can run the app: versions, and a node for every bundle.

    ``needs``: the resources of each unit that must fit on one node (the driver's entrypoint
    resources, or one bundle per replica). Raises :class:`InvalidAppError` naming what is missing.
    """
    with _cache_lock:
        cached = _cache.get(url)
    if cached is not None and time.monotonic() - cached[0] < CACHE_S:
        try:
            _check(url, cached[1], list(needs), label_selector)
            return
        except InvalidAppError:
            pass  # decided on fresh answers only
    _check(url, _fetch(client, url, warn), list(needs), label_selector)


def _check(url: str, nodes_resp: Mapping[str, Any], needs: List[Mapping[str, float]],
           label_selector: Mapping[str, str]) -> None:
    nodes = [n for n in nodes_resp.get("data", {}).get("result", {}).get("result", []) if n.get("state") == "ALIVE"]
    if label_selector:
        nodes = [n for n in nodes if _labels_match(n.get("labels") or {}, label_selector)]
        if not nodes:
            raise InvalidAppError(
                f"no alive node of the cluster at {url} has the labels {dict(label_selector)}; "
                f"labels seen: {_labels_seen(nodes_resp)}"
            )
    for need in needs:
        need = {k: v for k, v in need.items() if v > 0}
        if not any(all(n.get("resources_total", {}).get(k, 0) >= v for k, v in need.items()) for n in nodes):
            total: Dict[str, float] = {}
            for n in nodes:
                for k, v in n.get("resources_total", {}).items():
                    total[k] = max(total.get(k, 0), v)
            missing = {k: v for k, v in need.items() if total.get(k, 0) < v}
            raise InvalidAppError(
                f"no node of the cluster at {url} can hold {_fmt(need)}"
                + (f" (labels {dict(label_selector)})" if label_selector else "")
                + f": missing {_fmt(missing) if missing else 'a single node with all of them'}; "
                f"largest node offers {_fmt({k: total.get(k, 0) for k in need})}. "
                "Use smaller resources, or preflight=False to submit anyway and wait for the autoscaler"
            )


def _labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    for key, want in selector.items():
        have = labels.get(key)
        if want.startswith("!"):
            if have is not None and have in want[1:].split(","):
                return False
        elif want.startswith("in(") and want.endswith(")"):
            if have not in want[3:-1].split(","):
                return False
        elif have != want:
            return False
    return True


def _labels_seen(nodes_resp: Mapping[str, Any]) -> str:
    seen: set[str] = set()
    for n in nodes_resp.get("data", {}).get("result", {}).get("result", []):
        seen.update(f"{k}={v}" for k, v in (n.get("labels") or {}).items() if not k.startswith("ray.io/"))
    return ", ".join(sorted(seen)) or "none"


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(
        f"{k}: {v / 2**20:.0f} MiB" if k == "memory" else f"{k}: {v:g}" for k, v in sorted(res.items())
    ) + "}"


def role_resources(role: Role) -> dict[str, float]:
    """Ray resources of one replica: CPU, GPU, memory (bytes) and numeric capabilities."""
    res = role.resource
    out: dict[str, float] = {}
    if res.cpu and res.cpu > 0:
        out["CPU"] = float(res.cpu)
    if res.gpu and res.gpu > 0:
        out["GPU"] = float(res.gpu)
    if res.memMB and res.memMB > 0:
        out["memory"] = float(int(res.memMB) * 2**20)
    for key, value in (res.capabilities or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidAppError(
                f"role '{role.name}': capability {key}={value!r} is not a number; on ray_jobs, "
                "capabilities are custom Ray resources (e.g. {'sandbox': 1}); use label_selector for node labels"
            )
        if value > 0:
            out[str(key)] = float(value)
    return out
