"""Typed argument schemas: declared as data, checked before any handler runs.

A schema is a tree of :class:`Field` objects. ``check`` walks a decoded msgpack value
against it and either returns the value (with defaults filled in) or raises
``FaasError(bad_request)`` naming the offending field. Only the types msgpack can carry
are modelled; anything the schema does not name is refused, never ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from common.errors import Code, FaasError
from common.wgconf import check_key

_MISSING = object()


def _bad(path: str, message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, f"{path}: {message}", {"field": path})


@dataclass(frozen=True)
class Field:
    """Base of every field type. ``required`` fields without a default must be sent."""

    help: str = ""
    required: bool = True
    default: Any = None

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """A short type name for help text and docs."""
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Str(Field):
    """A UTF-8 string with a length cap and optional pattern or fixed choices."""

    max_len: int = 256
    pattern: str | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _bad(path, f"must be a string, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _bad(path, f"longer than {self.max_len} characters")
        if "\x00" in value:
            raise _bad(path, "contains a NUL character")
        if self.choices is not None and value not in self.choices:
            raise _bad(path, f"must be one of {', '.join(self.choices)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _bad(path, f"does not match {self.pattern}")
        return value


@dataclass(frozen=True)
class Int(Field):
    """An integer in [min, max]. ``bool`` is not an integer here."""

    min: int = 0
    max: int = 2**63 - 1

    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, f"must be an integer, not {type(value).__name__}")
        if not self.min <= value <= self.max:
            raise _bad(path, f"must be between {self.min} and {self.max}")
        return value


@dataclass(frozen=True)
class Float(Field):
    """A number in [min, max]; integers are accepted and widened."""

    min: float = 0.0
    max: float = float("inf")

    def check(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, f"must be a number, not {type(value).__name__}")
        value = float(value)
        if not self.min <= value <= self.max:  # also refuses NaN
            raise _bad(path, f"must be between {self.min} and {self.max}")
        return value


@dataclass(frozen=True)
class Bool(Field):
    """true or false."""

    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise _bad(path, f"must be true or false, not {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Bytes(Field):
    """Raw bytes (msgpack bin) with a length cap."""

    max_len: int = 1 << 20

    def check(self, value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise _bad(path, f"must be bytes, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _bad(path, f"longer than {self.max_len} bytes")
        return value


@dataclass(frozen=True)
class IPv6(Str):
    """An IPv6 address, optionally required to lie inside a network given at check time."""

    max_len: int = 64

    def check(self, value: Any, path: str) -> str:
        value = super().check(value, path)
        if "%" in value:  # ipaddress keeps a scope id verbatim, newlines and all
            raise _bad(path, "must not carry a scope id (%...)")
        try:
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            raise _bad(path, "is not an IPv6 address") from None


@dataclass(frozen=True)
class WgKey(Str):
    """A WireGuard key: exactly 32 bytes, in canonical base64 (44 characters)."""

    max_len: int = 44
    help: str = "WireGuard public key: 32 bytes of base64 (wg pubkey prints one)"

    def check(self, value: Any, path: str) -> str:
        value = super().check(value, path)
        try:
            return check_key(value)
        except ValueError as exc:
            raise _bad(path, f"is not a WireGuard key: {exc}") from None


@dataclass(frozen=True)
class List(Field):
    """A list of items of one field type, at most ``max_items`` long.

    ``memo``: remember the items of the last list that passed, by their ``repr`` (which
    tells every msgpack type and value apart), and do not check one of those again. For
    the lists of an agent's desired state, whose every sync carries them whole and
    changes one item of a thousand: checking a function's spec costs ten times its repr
    (docs/operations.md, "Scale"). Only items that passed are kept, only those of the
    last list (memory: one state's worth), and the result is the same either way, since
    a check depends on nothing but the item. Callers must not change what it returns."""

    item: Field = field(default_factory=Str)
    max_items: int = 1024
    memo: bool = False
    _passed: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def check(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _bad(path, f"must be a list, not {type(value).__name__}")
        if len(value) > self.max_items:
            raise _bad(path, f"more than {self.max_items} items")
        if not self.memo:
            return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]
        known, passed, out = self._passed, {}, []
        for i, v in enumerate(value):
            key = repr(v)
            checked = known[key] if key in known else self.item.check(v, f"{path}[{i}]")
            passed[key] = checked
            out.append(checked)
        known.clear()  # the dataclass is frozen: the same dict, refilled
        known.update(passed)
        return out

    def describe(self) -> str:
        return f"list of {self.item.describe()}"


@dataclass(frozen=True)
class Record(Field):
    """A map with a fixed set of string keys; unknown keys are refused."""

    fields: dict[str, Field] = field(default_factory=dict)
    validator: Callable[[dict[str, Any], str], None] | None = None

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _bad(path, f"must be a map, not {type(value).__name__}")
        extra = sorted(str(k) for k in value if k not in self.fields)
        if extra:
            raise _bad(path, f"unknown field(s): {', '.join(extra)}")
        out: dict[str, Any] = {}
        for name, spec in self.fields.items():
            sub = f"{path}.{name}" if path else name
            v = value.get(name, _MISSING)
            if v is None and not spec.required:
                v = _MISSING  # nil stands for "not given" in an optional field
            if v is _MISSING:
                if spec.required and spec.default is None:
                    raise _bad(sub, "is required")
                out[name] = spec.default
            else:
                out[name] = spec.check(v, sub)
        if self.validator is not None:
            self.validator(out, path)
        return out

    def describe(self) -> str:
        return "map"


@dataclass(frozen=True)
class MapOf(Field):
    """A map from constrained string keys to values of one field type."""

    key: Str = field(default_factory=Str)
    value: Field = field(default_factory=Str)
    max_items: int = 256

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _bad(path, f"must be a map, not {type(value).__name__}")
        if len(value) > self.max_items:
            raise _bad(path, f"more than {self.max_items} entries")
        return {
            self.key.check(k, f"{path}<key>"): self.value.check(v, f"{path}.{k}")
            for k, v in value.items()
        }

    def describe(self) -> str:
        return "map"
