"""How one setting is declared, and what is derived from a declaration: its CLI flag, TOML value and checks.

``config.py`` declares the settings (``RunConfig``); this module is the machinery every declaration goes through
(``setting`` -> ``Rule``; ``Setting``: the type, bounds, allowed values, the one-line problem, the flag, the TOML
value), kept apart so that the declarations read as a list.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What a declaration says about a setting besides its type and default."""

    help: str
    choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None  # a callable: a registry, read lazily
    ge: float | None = None  # bounds (for a list: of each entry)
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # a list needs at least one entry
    check: Callable[[Any], str | None] | None = None  # a set value's further rule: what is wrong, or None
    hint: str = ""  # appended to the rule in messages, e.g. "0 = never"
    flags: tuple[str, ...] = ()  # CLI flags; default: --<name-with-dashes>
    metavar: str | None = None


def setting(default: Any, help: str, **rule: Any) -> Any:
    """One setting: its default, its help text and its rules (see ``Rule``); the type is the annotation."""
    meta = {"rule": Rule(help=help, **rule)}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


_WHAT = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
         bool: ("true or false", "booleans")}


def _is(typ: type, value: Any) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _one_of(values: Iterable[Any]) -> str:
    items = [repr(v) for v in values]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


@dataclass(frozen=True)
class Setting:
    """One field of RunConfig with its declaration: what the CLI, the TOML file and validate() use."""

    name: str
    type: type  # int, float, str or bool (of each entry, for a list)
    is_list: bool
    optional: bool  # None allowed (unset); then the default is None
    default: Any
    rule: Rule

    @property
    def flags(self) -> tuple[str, ...]:
        return self.rule.flags or ("--" + self.name.replace("_", "-"),)

    def allowed(self) -> list[Any] | None:
        c = self.rule.choices
        return list(c() if callable(c) else c) if c is not None else None

    def _bounds(self) -> str:
        r = self.rule
        lo = (r.ge, "[", ">=") if r.ge is not None else (r.gt, "(", ">") if r.gt is not None else None
        hi = (r.le, "]", "<=") if r.le is not None else (r.lt, ")", "<") if r.lt is not None else None
        if lo and hi:
            return f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        if lo or hi:
            bound, _, op = lo or hi
            return f"{op} {bound:g}"
        return ""

    def _in_bounds(self, v: Any) -> bool:
        r = self.rule
        if isinstance(v, float) and math.isnan(v):
            return r.ge is None and r.gt is None and r.le is None and r.lt is None
        return ((r.ge is None or v >= r.ge) and (r.gt is None or v > r.gt)
                and (r.le is None or v <= r.le) and (r.lt is None or v < r.lt))

    def describe(self) -> str:
        """The rule in words, e.g. "must be an integer >= 1", "must be 'samples' or 'uniform'"."""
        one, many = _WHAT[self.type]
        allowed, bounds = self.allowed(), self._bounds()
        if self.is_list:
            text = f"must be a {'non-empty ' if self.rule.nonempty else ''}list of {many}"
            text += f", each {bounds}" if bounds else ""
            text += f", each {_one_of(allowed)}" if allowed else ""
        elif allowed:
            text = f"must be {_one_of(allowed)}"
        else:
            text = f"must be {one}" + (f" {bounds}" if bounds else "")
        if self.optional:
            text += " when set"
        return text + (f" ({self.rule.hint})" if self.rule.hint else "")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting (one line, without the name), or None."""
        allowed = self.allowed()

        def ok(v: Any) -> bool:
            return _is(self.type, v) and (allowed is None or v in allowed) and (self.type is str or self._in_bounds(v))

        if value is None:
            fine = self.optional
        elif self.is_list:
            fine = isinstance(value, list) and (value or not self.rule.nonempty) and all(ok(v) for v in value)
        else:
            fine = ok(value)
        if not fine:
            return f"{self.describe()}, got {value!r} ({self.flags[0]})"
        return self.rule.check(value) if value is not None and self.rule.check else None

    def coerce(self, value: Any) -> Any:
        """An integer where a number is declared becomes a float (TOML ``alpha = 16`` reads as 16.0)."""
        def one(v: Any) -> Any:
            return float(v) if self.type is float and isinstance(v, int) and not isinstance(v, bool) else v

        return [one(v) for v in value] if self.is_list and isinstance(value, list) else one(value)

    def parse(self, text: str) -> Any:
        """A CLI value: ``8``, ``0.5``, ``name``; lists ``2,4,8`` (numbers also ``6:3:1``)."""
        if not self.is_list:
            return self.type(text)
        if self.type in (int, float):
            text = text.replace(":", ",")
        return [self.type(x.strip()) for x in text.split(",") if x.strip()]

    def help_text(self) -> str:
        parts = [self.rule.help]
        allowed = self.allowed()
        if allowed:
            parts.append("one of " + ", ".join(map(str, allowed)))
        if self.default is not None:
            d = self.default
            parts.append("default " + (",".join(map(str, d)) if isinstance(d, list) else str(d)))
        return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


def settings_of(cls: type) -> tuple[Setting, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = rest[0], len(rest) == 1
        is_list = typing.get_origin(tp) is list
        if is_list:
            tp = typing.get_args(tp)[0]
        if tp not in _WHAT or "rule" not in f.metadata:
            raise TypeError(f"RunConfig.{f.name}: declare it with setting(...) as int, float, str, bool, "
                            "a list of one of them, or one of those | None")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if optional and default is not None:
            raise TypeError(f"RunConfig.{f.name}: an optional setting defaults to None (TOML has no null)")
        out.append(Setting(f.name, tp, is_list, optional, default, f.metadata["rule"]))
    return tuple(out)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # Python's float repr (1e-05, inf, nan) is valid TOML
    if isinstance(v, str):
        # JSON string escaping is valid TOML basic-string escaping; DEL must be escaped too in TOML
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")
