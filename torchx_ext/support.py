"""What each scheduler does with every field of TorchX's ``AppDef``, ``Role`` and ``Resource``.

Each scheduler declares a *support matrix* (its ``support`` class attribute): every field is

* **honoured** — it means what TorchX says, on this engine (a note says how); a honoured field may
  still refuse values the engine cannot honour (``refuse``), saying what to do instead;
* **refused** — any value other than TorchX's default is an error before anything starts, naming
  the field, the scheduler and what to do instead;
* **ignored** — on purpose, only where it cannot change what runs (free-form metadata, or a value
  TorchX's own components always set that has no meaning here); the note says why.

:func:`check_app` enforces a matrix (the scheduler base calls it on every dry-run and submit);
:func:`markdown` renders matrices as a table (the README's: ``python -m torchx_ext.support_tables``), and a test
fails when a field of the installed TorchX is not classified by every scheduler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torchx.specs import AppDef, Resource, Role

from torchx_ext.errors import InvalidAppError

HONOURED, REFUSED, IGNORED = "honoured", "refused", "ignored"
Refusal = Callable[[Any, Role], Optional[str]]


@dataclass(frozen=True)
class Support:
    """How one scheduler treats one field."""

    kind: str
    note: str = ""
    refuse: Optional[Refusal] = None  # honoured fields: a value this engine cannot honour -> why


def honoured(note: str = "", refuse: Optional[Refusal] = None) -> Support:
    return Support(HONOURED, note, refuse)


def refused(instead: str) -> Support:
    return Support(REFUSED, instead)


def ignored(why: str) -> Support:
    return Support(IGNORED, why)


# every field of torchx 0.7.0 and of the nightly, in the order the README shows them
FIELD_ORDER = [
    "AppDef.name", "AppDef.roles", "AppDef.metadata",
    "Role.name", "Role.image", "Role.entrypoint", "Role.args", "Role.env", "Role.num_replicas",
    "Role.min_replicas", "Role.base_image", "Role.max_retries", "Role.retry_policy", "Role.resource",
    "Role.port_map", "Role.metadata", "Role.mounts", "Role.workspace", "Role.overrides",
    "Resource.cpu", "Resource.gpu", "Resource.memMB", "Resource.capabilities", "Resource.devices",
    "Resource.tags",
]


def torchx_fields() -> list[str]:
    """``Class.field`` for every field of the installed TorchX's AppDef, Role and Resource."""
    return [f"{cls.__name__}.{f.name}" for cls in (AppDef, Role, Resource) for f in dataclasses.fields(cls)]


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _min_replicas(value: Any, role: Role) -> Optional[str]:
    if value is None or value == role.num_replicas:
        return None
    return (f"min_replicas={value} with num_replicas={role.num_replicas}: groups start all or nothing; "
            "leave min_replicas unset or equal to num_replicas")


def check_retries(value: Any, role: Role) -> Optional[str]:
    return f"max_retries={value}: a number of restarts, >= 0" if not isinstance(value, int) or value < 0 else None


def _retry_policy(value: Any, role: Role) -> Optional[str]:
    from torchx_ext.engine.rules import RETRY_POLICIES, retry_policy_name

    name = retry_policy_name(value)
    if not role.max_retries or name in RETRY_POLICIES:
        return None
    return (f"retry_policy={name}: valid are {', '.join(RETRY_POLICIES)}"
            + (" (HOT_SPARE needs spare replicas, which groups started all or nothing do not keep)"
               if name == "HOT_SPARE" else ""))


RETRIES = honoured("restarts under Role.retry_policy, at most max_retries times per policy unit "
                   "(see Retries); run option retry_backoff_s", check_retries)
RETRY_POLICY = honoured("REPLICA: the failed replica alone, in its slot; ROLE: every replica of its role; "
                        "APPLICATION: the whole group. Compared by value, so ROLE works on torchx 0.7.0 too; "
                        "HOT_SPARE is refused", _retry_policy)

# what every torchx-ext scheduler does the same way; backends add or override entries
COMMON: dict[str, Support] = {
    "AppDef.name": honoured("names the app: part of its id (lowercased, non-alphanumerics as '-')"),
    "AppDef.roles": honoured("one group, started all or nothing"),
    "AppDef.metadata": ignored("free-form metadata for tools around TorchX; nothing reads it to run the app"),
    "Role.name": honoured("names the role in logs, status and TORCHX_EXT_HOSTS_<ROLE>"),
    "Role.entrypoint": honoured("the command, exactly as given (no shell)"),
    "Role.args": honoured("each argument reaches the process byte for byte (no shell)"),
    "Role.env": honoured("set for every replica of the role"),
    "Role.num_replicas": honoured("replicas of the role"),
    "Role.min_replicas": honoured("only as num_replicas: groups are all or nothing", _min_replicas),
    "Role.base_image": refused("TorchX deprecated it; put the image in Role.image"),
    "Role.max_retries": RETRIES,
    "Role.retry_policy": RETRY_POLICY,
    "Role.resource": honoured("see the Resource rows"),
    "Role.metadata": honoured("'torchx_ext/service' marks a service role; other keys are free-form and ignored"),
    "Role.port_map": honoured("a service role's ports: the other roles start once they accept connections "
                              "(run option ready_timeout_s). Nothing is mapped: replicas use their host's "
                              "(node's) network, so a port the process opens is reachable at its "
                              "TORCHX_EXT_HOSTS_<ROLE> address already"),
    "Role.workspace": honoured("(torchx-nightly) built by TorchX through the scheduler's own workspace build, "
                               "per role, as --workspace is"),
    "Role.overrides": refused("request overrides are specific to TorchX's Kubernetes scheduler"),
    "Resource.tags": ignored("free-form labels; nothing is scheduled by them"),
}


# ----------------------------------------------------------------------- per scheduler --------
# (the other schedulers' matrices are in their packages: torchx_ext/schedulers/<name>/support.py)
def check_app(app: AppDef, scheduler: str, matrix: Mapping[str, Support]) -> None:
    """Raises :class:`InvalidAppError` listing every field value ``scheduler`` cannot honour."""
    problems: list[str] = []

    def visit(obj: Any, cls: type, where: str, role: Role) -> None:
        for f in dataclasses.fields(cls):
            key = f"{cls.__name__}.{f.name}"
            support = matrix.get(key)
            value = getattr(obj, f.name)
            if support is None:
                if value != _default(cls, f.name):  # a field newer than this torchx-ext: never dropped
                    problems.append(f"{where}{key} is not known to torchx-ext's {scheduler} scheduler; "
                                    f"leave it unset or upgrade torchx-ext")
            elif support.kind == REFUSED and value != _default(cls, f.name):
                problems.append(f"{where}{scheduler} does not support {key} ({value!r}): {support.note}")
            elif support.refuse is not None:
                why = support.refuse(value, role)
                if why:
                    problems.append(f"{where}{key}: {why}")

    for role in app.roles:
        visit(role, Role, f"role '{role.name}': ", role)
        visit(role.resource, Resource, f"role '{role.name}': ", role)
    if app.roles:
        visit(app, AppDef, "", app.roles[0])
    if problems:
        raise InvalidAppError(f"app '{app.name}' cannot run on {scheduler}:\n  - " + "\n  - ".join(problems))


def markdown(matrices: Mapping[str, Mapping[str, Support]]) -> str:
    """The README's support table (a row per field, a column per scheduler), then what each means."""
    names = list(matrices)
    keys = FIELD_ORDER + [k for k in torchx_fields() if k not in FIELD_ORDER]
    lines = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    notes = []
    for key in keys:
        entries = [matrices[n].get(key) for n in names]
        lines.append(f"| `{key}` | " + " | ".join(e.kind if e else "—" for e in entries) + " |")
        said = {(e.kind, e.note) for e in entries if e and e.note}
        if len(said) == 1 and all(entries):
            notes.append(f"- `{key}`: {said.pop()[1]}")
        else:
            notes += [f"- `{key}` on `{n}`: {e.note}" for n, e in zip(names, entries, strict=True) if e and e.note]
    return ("\n".join(lines) + "\n\n" + "\n".join(notes) + "\n").replace("<ROLE>", "&lt;ROLE&gt;")
