"""The replicas of one ``ray_jobs`` app in the cluster: a single replica run by the driver itself
(:class:`LocalGroup`), or a gang (:class:`GangGroup`): one placement group bundle and one Ray actor
per replica, reserved all or nothing. The driver's :class:`~.driver.Launcher` performs the group
engine's actions on either. Standard library and ``ray`` only, as everything in this package.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from .replica import Line, ReplicaRunner, node_ip

Result = Tuple[List[Line], Optional[int], str]  # (lines, exit code, error)


class LocalGroup:
    """A single replica run by the driver itself (it holds the entrypoint resources)."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        self.runners = [ReplicaRunner()]

    def reserve(self) -> Optional[str]:
        return None

    def node_ips(self) -> List[str]:
        return [node_ip()]

    def prepare(self, indices: List[int]) -> Dict[int, str]:
        return {}

    def start(self, cmds: List[Tuple[List[str], Dict[str, str]]], indices: List[int]) -> List[Optional[str]]:
        return [self.runners[i].start(*cmds[i]) for i in indices]

    def poll(self) -> List[Result]:
        return [(*r.poll(), "") for r in self.runners]

    def stop(self, indices: List[int]) -> None:
        for i in indices:
            self.runners[i].stop()

    def close(self) -> None:
        pass


# How long an actor may stay unreachable (ActorUnavailableError) before its replica counts as lost
# although Ray has not declared its node dead.
UNREACHABLE_S = 90.0


class GangGroup:
    """One placement group bundle and one actor per replica."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        import ray

        self.ray = ray
        self.spec = spec
        self.bundles = [dict(role["resources"]) for role in spec["roles"] for _ in role["replicas"]]
        # log_to_driver=False: the actors print nothing; replica output comes through poll()
        ray.init(log_to_driver=False)
        self.pg: Any = None
        self.actors: List[Any] = []
        self.ips: List[str] = []
        self.lost: set[int] = set()
        self.unreachable: Dict[int, float] = {}  # replica -> when its actor first did not answer

    def reserve(self) -> Optional[str]:
        from ray.util.placement_group import placement_group

        ray = self.ray
        kwargs: Dict[str, Any] = {"strategy": self.spec.get("strategy", "PACK")}
        if self.spec.get("label_selector"):
            kwargs["bundle_label_selector"] = [self.spec["label_selector"]] * len(self.bundles)
        if self.spec.get("placement_group"):
            kwargs["name"] = self.spec["placement_group"]
        self.pg = placement_group(self.bundles, **kwargs)
        timeout = float(self.spec["placement_timeout_s"])  # always set by the submitter: its default is the one
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            return f"the group could not be placed within {timeout:g} s: {self._missing()}"
        self.actors = [self._actor(i) for i in range(len(self.bundles))]
        return None

    def _actor(self, i: int) -> Any:
        """A replica actor pinned to bundle ``i`` of the gang's placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        b = self.bundles[i]
        custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU", "memory")}
        return self.ray.remote(ReplicaRunner).options(
            num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), memory=b.get("memory"),
            resources=custom, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote()

    def _missing(self) -> str:
        ray = self.ray
        need: Dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        total, avail = ray.cluster_resources(), ray.available_resources()
        short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
        if short:
            return "the cluster has too little " + ", ".join(
                f"{k} (the group needs {_fmt(k, v)}, the cluster has {_fmt(k, t)})"
                for k, (v, t) in sorted(short.items())
            )
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for b in self.bundles:
            if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes):
                strategy = self.spec.get("strategy", "PACK")
                return f"no node can hold a replica needing {_fmt_res(b)} (strategy {strategy})"
        busy = {k: (v, avail.get(k, 0)) for k, v in need.items() if v > avail.get(k, 0)}
        return "resources are in use by other jobs: " + ", ".join(
            f"{k} (the group needs {_fmt(k, v)}, available now {_fmt(k, a)})" for k, (v, a) in sorted(busy.items())
        ) if busy else f"the group needs {_fmt_res(need)} with strategy {self.spec.get('strategy', 'PACK')}"

    def node_ips(self) -> List[str]:
        self.ips = self.ray.get([a.node_ip.remote() for a in self.actors], timeout=120)
        return list(self.ips)

    def prepare(self, indices: List[int]) -> Dict[int, str]:
        """Before a restart of ``indices``: a lost replica (its worker or node died) gets a new
        actor in its bundle, which Ray moves to a surviving node once it knows the old one is
        dead, and its node address is learnt again (``ips``), so that the restarted replicas'
        discovery variables name where it runs now. A restart of a replica that was not lost
        reuses its actor (same node). Returns the replicas that could not be placed, with why."""
        ray = self.ray
        errors: Dict[int, str] = {}
        timeout = float(self.spec["placement_timeout_s"])  # always set by the submitter: its default is the one
        for i in indices:
            if i not in self.lost:
                continue
            self.lost.discard(i)
            deadline = time.time() + timeout
            while True:
                self._replace(i)
                try:
                    self.ips[i] = ray.get(self.actors[i].node_ip.remote(), timeout=max(1.0, deadline - time.time()))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    # its bundle was still on the dead node (the new actor died with it): again
                    if time.time() >= deadline:
                        self.lost.add(i)
                        errors[i] = (f"no node took it within {timeout:g} s: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0]}")
                        break
                    time.sleep(1.0)
        return errors

    def _replace(self, i: int) -> None:
        try:  # the lost actor must not come back with its replica when its node does
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node: nothing left to kill
            pass
        self.actors[i] = self._actor(i)

    def start(self, cmds: List[Tuple[List[str], Dict[str, str]]], indices: List[int]) -> List[Optional[str]]:
        ray = self.ray
        refs = [self.actors[i].start.remote(*cmds[i]) for i in indices]
        out: List[Optional[str]] = []
        for i, ref in zip(indices, refs):
            try:
                out.append(ray.get(ref, timeout=120))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self.lost.add(i)
                out.append(f"its Ray actor was lost (node {self.ips[i]}): {type(e).__name__}: {str(e).splitlines()[0]}")
        return out

    def poll(self) -> List[Result]:
        ray = self.ray
        refs = [a.poll.remote() for a in self.actors]
        out: List[Result] = []
        now = time.time()
        for i, ref in enumerate(refs):
            try:
                lines, code = ray.get(ref, timeout=60)
                self.unreachable.pop(i, None)
                out.append((lines, code, ""))
            except ray.exceptions.ActorUnavailableError as e:
                # not lost yet: its node may be partitioned, or dead but not declared so (Ray's
                # health checks take ~15 s); a replica restarted now could run twice. Ray raises
                # ActorDiedError once it declares the node dead; a bound for an actor it never does.
                since = self.unreachable.setdefault(i, now)
                if now - since < UNREACHABLE_S:
                    out.append(([], None, ""))
                    continue
                self.lost.add(i)
                out.append(([], -1, f"its node {self.ips[i]} did not answer for {UNREACHABLE_S:g} s: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                # the node or worker died: the replica is lost (its process died with it)
                self.lost.add(i)
                self.unreachable.pop(i, None)
                out.append(([], -1, f"its Ray actor was lost (node {self.ips[i]}): "
                                    f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        return out

    def stop(self, indices: List[int]) -> None:
        refs = [self.actors[i].stop.remote() for i in indices]
        try:
            self.ray.get(refs, timeout=15)
        except Exception:  # noqa: BLE001 - best effort: the actors die with this job anyway
            pass

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - best effort: Ray removes a job's placement groups with it
                pass


def _fmt(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:g}"


def _fmt_res(res: Dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(k, v)}" for k, v in sorted(res.items())) + "}"
