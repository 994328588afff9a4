"""The group engine: the rules that decide an app's fate, written once (standard library only,
Python >= 3.8, no torchx import: it runs in the host supervisor, in a Slurm allocation, in a Ray
driver and in the Docker watcher alike). See :mod:`.machine` for the protocol."""

from .machine import (
    Action,
    Begin,
    Cancel,
    Engine,
    Event,
    Exited,
    Fail,
    GroupSpec,
    Killed,
    Lost,
    Mark,
    Probe,
    Ready,
    ReplicaSpec,
    ReplicaView,
    Rerun,
    Restart,
    Start,
    Started,
    StartFailed,
    Stop,
    Tick,
    Verdict,
    Wait,
)

__all__ = ["Action", "Begin", "Cancel", "Engine", "Event", "Exited", "Fail", "GroupSpec", "Killed", "Lost",
           "Mark", "Probe", "Ready", "ReplicaSpec", "ReplicaView", "Rerun", "Restart", "Start", "StartFailed",
           "Started", "Stop", "Tick", "Verdict", "Wait"]
