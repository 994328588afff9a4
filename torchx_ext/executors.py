"""Typed executors and the open executor → scheduler lookup.

An *executor* is a dataclass whose fields ARE a scheduler's run options: the scheduler builds its
``runopts`` from the fields (:func:`runopts_for`), and ``executor.to_run_args()`` gives
``(scheduler_name, cfg)`` for ``get_runner().run(app, *executor.to_run_args())``. One source of
truth, no second list of option names to keep in sync.

The lookup is open (NeMo-Run's is a closed dict looked up by exact class):

* executors register through the ``torchx_ext.executors`` entry point group
  (``<scheduler name> = package.module:ExecutorClass``) or :meth:`ExecutorRegistry.register`;
* lookup of an instance or class walks its MRO, so a subclass of a registered executor resolves
  to its parent's scheduler without registering anything;
* :func:`capabilities` answers "does this scheduler run heterogeneous groups / dependencies /
  keep status across processes?" from the executor class, without creating a scheduler.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Type, Union

from torchx.specs import runopts
from torchx.util.types import to_dict

from torchx_ext.compat import as_list
from torchx_ext.engine.rules import READY_TIMEOUT_S
from torchx_ext.errors import InvalidOptionError, RegistrationError, UnknownExecutorError, UnknownOptionError

ENTRY_POINT_GROUP = "torchx_ext.executors"


@dataclass(frozen=True)
class Capabilities:
    """What a scheduler can do, declared by its executor class."""

    heterogeneous_groups: bool = False
    services: bool = False
    dependencies: bool = False
    persistent_status: bool = False
    discovery_env: bool = False


# what each of torchx-ext's own schedulers does (third-party executors declare their own)
GROUP_CAPABILITIES = Capabilities(
    heterogeneous_groups=True, services=True, dependencies=True, persistent_status=True, discovery_env=True,
)


def option(default: Any = None, help: str = "", required: bool = False) -> Any:
    """A dataclass field that is also a run option (``help`` becomes ``torchx runopts`` text)."""
    if isinstance(default, (list, dict)):
        kind = type(default)
        return field(default_factory=lambda: kind(default), metadata={"help": help, "required": required})
    return field(default=default, metadata={"help": help, "required": required})


def retry_backoff_option() -> Any:
    """The ``retry_backoff_s`` run option of every scheduler that restarts replicas."""
    return option(0.0, help="seconds before a unit's first restart (Role.max_retries), doubled for each "
                  "further restart of the same unit, capped at 60; 0 restarts at once")


def ready_timeout_option() -> Any:
    """The ``ready_timeout_s`` run option of every scheduler that runs the group engine."""
    return option(READY_TIMEOUT_S, help="seconds a service role with ports (Role.port_map) may take to accept "
                  "connections on them; the other roles start once every service does, and a service not "
                  "ready in time fails the app, naming it")


def engine_timings(executor: Any) -> tuple[float, float]:
    """``(retry_backoff_s, ready_timeout_s)`` of an executor with both options, checked once for
    every scheduler that runs the group engine."""
    backoff, ready = float(executor.retry_backoff_s), float(executor.ready_timeout_s)
    if not backoff >= 0:  # (not: NaN is refused too)
        raise InvalidOptionError(f"retry_backoff_s={executor.retry_backoff_s}: a delay in seconds, >= 0")
    if not ready > 0:
        raise InvalidOptionError(f"ready_timeout_s={executor.ready_timeout_s}: a time in seconds, > 0 "
                                 "(how long a service may take to accept connections)")
    return backoff, ready


@dataclass
class Executor:
    """Base of all executors. Subclasses set ``scheduler`` and ``capabilities``."""

    scheduler: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    dependencies: Optional[list[str]] = option(
        None,
        help="app handles or ids (of this scheduler) that must SUCCEED before this app starts "
        "(afterok); a failed or cancelled dependency fails this app",
    )

    def to_cfg(self) -> dict[str, Any]:
        """The run options as a cfg mapping (None values left out, so defaults apply)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_run_args(self) -> tuple[str, dict[str, Any]]:
        """``(scheduler_name, cfg)`` for ``get_runner().run(app, *executor.to_run_args())``."""
        name = ExecutorRegistry.default().scheduler_for(self)
        return name, self.to_cfg()

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Executor:
        """Builds the executor from a resolved cfg; unknown keys raise with the valid names."""
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise UnknownOptionError(cls.scheduler or cls.__name__, unknown, names)
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for name, value in cfg.items():
            if value is None:
                continue  # unset: the dataclass default applies (the only place defaults live)
            if _runopt_type(hints[name]) is typing.List[str]:
                value = as_list(value)  # "a,b" from Python callers, as the CLI would split it
            values[name] = value
        return cls(**values)


_OPT_TYPES = (str, int, float, bool)


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    # per class, once: evaluating the string annotations compiles each one (~1 ms per submit)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _runopt_type(tp: Any) -> Any:
    """Maps a field annotation to the type torchx runopts accepts."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _runopt_type(args[0])
    if origin in (list, typing.List):
        return typing.List[str]
    if origin in (dict, typing.Dict):
        return typing.Dict[str, str]
    if tp in _OPT_TYPES:
        return tp
    raise TypeError(f"unsupported run option type {tp!r}")


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_EXPECTED = {
    bool: "bool (true/false, 1/0, yes/no)",
    int: "int (a whole number)",
    float: "float (a number)",
    str: "str",
    typing.List[str]: "List[str] (comma-separated)",
    typing.Dict[str, str]: "Dict[str, str] (KEY:VALUE pairs, comma-separated)",
}


class StrictRunopts(runopts):
    """The run options of one of our schedulers; refuses what TorchX 0.7.0 would let through.

    TorchX 0.7.0's ``cfg_from_str`` drops unknown ``-cfg`` keys without a word (a typo such as
    ``dependency=`` runs the app at once instead of after its dependency), ends a bad number in a
    traceback and reads any boolean other than ``true`` as False. This subclass, returned by our
    schedulers only (TorchX's own keep theirs), raises one-line :class:`UnknownOptionError` (with a
    close match) and :class:`InvalidOptionError` instead, on 0.7.0 and on the nightly alike.
    """

    def __init__(self, scheduler: str) -> None:
        super().__init__()
        self.scheduler = scheduler

    def _key(self, name: str) -> Optional[str]:
        # the nightly also accepts a camelCase spelling of an option; 0.7.0 only the name itself
        canonical = getattr(super(), "canonical_key", None)
        if canonical is not None:
            return typing.cast(Optional[str], canonical(name))
        return name if name in self._opts else None

    def cfg_from_str(self, cfg_str: str) -> Dict[str, Any]:
        try:
            pairs = to_dict(cfg_str)
        except ValueError as e:
            raise InvalidOptionError(f"-cfg {cfg_str!r} for scheduler '{self.scheduler}': {e}; "
                                     "expected KEY=VALUE[,KEY=VALUE]") from None
        unknown = [k for k in pairs if self._key(k) is None]
        if unknown:
            raise UnknownOptionError(self.scheduler, unknown, self._opts)
        cfg: Dict[str, Any] = {}
        for key, text in pairs.items():
            name = typing.cast(str, self._key(key))
            cfg[name] = self._parse(name, text)
        return cfg

    def _parse(self, name: str, text: str) -> Any:
        tp = self._opts[name].opt_type
        try:
            if tp is bool:
                return _BOOL_WORDS[text.strip().lower()]
            if tp is typing.List[str]:
                return [v for v in text.replace(";", ",").split(",") if v]  # as TorchX splits them
            if tp is typing.Dict[str, str]:
                items = [i for i in text.replace(";", ",").split(",") if i]
                if not all(":" in i for i in items):
                    raise ValueError(text)
                return dict(i.split(":", 1) for i in items)
            return tp(text)
        except (KeyError, ValueError):
            raise self._invalid(name, text) from None

    def _invalid(self, name: str, value: Any) -> InvalidOptionError:
        tp = self._opts[name].opt_type
        return InvalidOptionError(f"option '{name}' of scheduler '{self.scheduler}' cannot be {value!r}: "
                                  f"expected {_EXPECTED.get(tp, str(tp))}")

    def resolve(self, cfg: Mapping[str, Any], **kwargs: Any) -> Dict[str, Any]:
        # a whole number for a float option is that number (ready_timeout_s=3), as in Python (not a bool)
        cfg = {k: float(v) if type(v) is int and k in self._opts and self._opts[k].opt_type is float else v
               for k, v in cfg.items()}
        # a Python caller's cfg (or .torchxconfig's) of the wrong type: our line, not TorchX's
        for name, value in cfg.items():
            opt = self._opts.get(name)
            if opt is not None and value is not None and not runopts.is_type(value, opt.opt_type):
                raise self._invalid(name, value)
        return typing.cast(Dict[str, Any], super().resolve(cfg, **kwargs))


def runopts_for(executor_cls: Type[Executor]) -> runopts:
    """The ``runopts`` of a scheduler, generated from its executor's fields."""
    opts = StrictRunopts(executor_cls.scheduler or executor_cls.__name__)
    hints = _type_hints(executor_cls)
    for f in fields(executor_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        required = bool(f.metadata.get("required"))
        opts.add(
            f.name,
            type_=_runopt_type(hints[f.name]),
            help=f.metadata.get("help", ""),
            default=None if required else default,
            required=required,
        )
    return opts


ExecutorLike = Union[Executor, Type[Executor]]


class ExecutorRegistry:
    """Maps executor classes to scheduler names; entry points are read once, lazily."""

    _default: ClassVar[Optional[ExecutorRegistry]] = None

    def __init__(self, load_entry_points: bool = True) -> None:
        self._by_scheduler: dict[str, Type[Executor]] = {}
        self._loaded = not load_entry_points
        self._errors: dict[str, str] = {}

    @classmethod
    def default(cls) -> ExecutorRegistry:
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def register(self, executor_cls: Type[Executor], scheduler: Optional[str] = None,
                 clobber: bool = False) -> None:
        """Registers ``executor_cls`` for ``scheduler`` (default: ``executor_cls.scheduler``).

        Args:
            executor_cls: the executor dataclass
            scheduler: the scheduler name (default: ``executor_cls.scheduler``)
            clobber: replace a *different* class already registered for that name (entry points
                included); without it that is an error, as fsspec's ``register_implementation``
        """
        name = scheduler or executor_cls.scheduler
        if not name:
            raise RegistrationError(f"{executor_cls.__name__} names no scheduler; pass scheduler=")
        self._ensure_loaded()
        current = self._by_scheduler.get(name)
        if current is not None and current is not executor_cls and not clobber:
            raise RegistrationError(
                f"scheduler '{name}' already has executor {current.__module__}.{current.__qualname__}; "
                f"pass clobber=True to replace it with {executor_cls.__module__}.{executor_cls.__qualname__}"
            )
        self._by_scheduler[name] = executor_cls

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in importlib.metadata.entry_points().select(group=ENTRY_POINT_GROUP):
            if ep.name in self._by_scheduler:
                continue  # explicit registration wins over the entry point
            try:
                self._by_scheduler[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin, whatever it raises, must not hide the others
                self._errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"

    def registered(self) -> dict[str, Type[Executor]]:
        self._ensure_loaded()
        return dict(self._by_scheduler)

    def scheduler_for(self, executor: ExecutorLike) -> str:
        """The scheduler name of an executor instance or class, resolving subclasses."""
        self._ensure_loaded()
        cls = executor if isinstance(executor, type) else type(executor)
        for klass in cls.__mro__:
            for name, registered in self._by_scheduler.items():
                if registered is klass:
                    return name
        raise UnknownExecutorError(
            f"no scheduler is registered for executor {cls.__module__}.{cls.__qualname__}. "
            f"Registered executors: {self._describe()}"
        )

    def executor_for(self, scheduler: str) -> Type[Executor]:
        self._ensure_loaded()
        if scheduler in self._by_scheduler:
            return self._by_scheduler[scheduler]
        hint = f" (failed to load: {self._errors[scheduler]})" if scheduler in self._errors else ""
        raise UnknownExecutorError(
            f"no executor is registered for scheduler '{scheduler}'{hint}. "
            f"Registered executors: {self._describe()}"
        )

    def capabilities(self, target: Union[str, ExecutorLike]) -> Capabilities:
        """Capabilities of a scheduler name, executor instance or executor class."""
        if isinstance(target, str):
            return self.executor_for(target).capabilities
        cls = target if isinstance(target, type) else type(target)
        self.scheduler_for(cls)  # raises with the registered list if unknown
        return cls.capabilities

    def _describe(self) -> str:
        items = [f"{n} ({c.__module__}.{c.__qualname__})" for n, c in sorted(self._by_scheduler.items())]
        return ", ".join(items) or "none"


def register_executor(executor_cls: Type[Executor], scheduler: Optional[str] = None,
                      clobber: bool = False) -> None:
    """Registers an executor class in the default registry (entry points are the other way)."""
    ExecutorRegistry.default().register(executor_cls, scheduler, clobber)


def scheduler_for(executor: ExecutorLike) -> str:
    return ExecutorRegistry.default().scheduler_for(executor)


def executor_for(scheduler: str) -> Type[Executor]:
    return ExecutorRegistry.default().executor_for(scheduler)


def capabilities(target: Union[str, ExecutorLike]) -> Capabilities:
    return ExecutorRegistry.default().capabilities(target)
