"""Fault injection for the emulator: the misbehaving server every client test needs.

Faults are set for the whole run (:class:`Faults`, through ``Emulator.faults`` or
``POST /_emulator/faults``) and per request (header ``x-emulator-fault``). The run-wide
ones hit only requests in ``scope``; the header ones always hit their own request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)

#: The methods whose answers are file bytes (Range-capable); the default fault scope.
BLOB_METHODS = frozenset({"images.data.download", "file-storage.download", "images.download"})
HEADER = "x-emulator-fault"
BODY_FAULTS = ("reset_mid_body", "short_body", "ignore_range", "wrong_content_range")
_TRUE = {"1", "true", "yes", "on", ""}
_FALSE = {"0", "false", "no", "off"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _coerce(current: Any, value: Any) -> Any:
    """``value`` converted to the type of the setting it replaces (JSON or header text)."""
    if isinstance(current, dict):
        return _per_method(value)
    if isinstance(current, bool):
        return _as_bool(value)
    if isinstance(current, int):
        if isinstance(value, bool):
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    if isinstance(current, float):
        return float(value)
    return str(value)


def _per_method(value: Any) -> dict[str, str]:
    """``{"images.data.download": "ignore_range"}``: each value in the header's syntax,
    checked now so a typo is refused when set, not on some later request."""
    if not isinstance(value, dict):
        raise ValueError("methods must map method names to fault strings")
    out: dict[str, str] = {}
    for method, faults in value.items():
        if not isinstance(method, str) or not isinstance(faults, str):
            raise ValueError("methods must map method names to fault strings")
        _apply_header(Active(), faults, 500)
        out[method] = faults
    return out


@dataclass
class Active:
    """The faults one request suffers (run-wide ones in scope plus its header)."""

    latency_ms: float = 0.0
    fail_status: int | None = None
    reset_mid_body: bool = False
    short_body: bool = False
    ignore_range: bool = False
    wrong_content_range: bool = False

    @property
    def cuts_body(self) -> bool:
        """The answer's body is to be cut short (RST or FIN)."""
        return self.reset_mid_body or self.short_body

    def names(self) -> list[str]:
        """The names of the faults that fire, for the request log."""
        return [f.name for f in fields(self) if getattr(self, f.name) not in (0, None, False)]


@dataclass
class Faults:
    """Run-wide fault settings.

    =======================  =============================================================
    ``latency_ms``           added to every request (whatever the scope)
    ``fail_n``               the next N requests in scope answer ``fail_status``
    ``fail_status``          500 by default; 503, 429... for other retry paths
    ``reset_mid_body``       send half the body, then reset the connection (RST)
    ``short_body``           announce the full Content-Length, send half, close (FIN)
    ``ignore_range``         answer 200 with the whole object despite ``Range``
    ``wrong_content_range``  206 with a Content-Range shifted by one byte
    ``times``                if N > 0, the four body faults above hit only the next N
                             requests in scope, then switch themselves off (0: all)
    ``scope``                ``blob`` (default: the byte downloads), ``all``, or method
                             names separated by commas (``images.data.download``)
    ``methods``              faults per method, whatever the scope, in the header's syntax:
                             ``{"images.data.download": "ignore_range",
                             "file-storage.download": "fail_status=404"}`` (every request
                             of that method suffers them)
    =======================  =============================================================
    """

    latency_ms: float = 0.0
    fail_n: int = 0
    fail_status: int = 500
    reset_mid_body: bool = False
    short_body: bool = False
    ignore_range: bool = False
    wrong_content_range: bool = False
    times: int = 0
    scope: str = "blob"
    methods: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, values: dict[str, Any]) -> None:
        """Change some settings; unknown names or bad values raise ValueError (all or none)."""
        if not isinstance(values, dict):
            raise ValueError("faults must be a JSON object")
        parsed = {}
        for key, value in values.items():
            if key.startswith("_") or key not in self.snapshot():
                raise ValueError(f"unknown fault {key!r}")
            parsed[key] = _coerce(getattr(self, key), value)
        with self._lock:
            for key, value in parsed.items():
                setattr(self, key, value)
        logger.info("faults now %s", self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The current settings (without the lock)."""
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
            for f in fields(self)
            if not f.name.startswith("_")
        }

    def reset(self) -> None:
        """Back to a healthy server (every setting at its default)."""
        self.update(Faults().snapshot())

    def in_scope(self, method: str) -> bool:
        """Whether the run-wide faults (other than latency) hit ``method``."""
        scope = self.scope.strip()
        if scope == "all":
            return True
        if scope == "blob":
            return method in BLOB_METHODS
        return method in {s.strip() for s in scope.split(",")}

    def _body_faults(self, active: Active) -> None:
        """Copy the body faults onto ``active``, counting ``times`` down (lock held)."""
        for name in BODY_FAULTS:
            setattr(active, name, getattr(self, name))
        if self.times > 0 and any(getattr(self, name) for name in BODY_FAULTS):
            self.times -= 1
            if self.times == 0:
                for name in BODY_FAULTS:
                    setattr(self, name, False)

    def for_request(self, method: str, header: str | None) -> Active:
        """The faults for one request; consumes one ``fail_n`` if it applies.

        Raises ValueError for a malformed header, so a typo in a test is a 400, not a
        silently healthy request.
        """
        active = Active()
        with self._lock:
            active.latency_ms = self.latency_ms
            if self.in_scope(method):
                if self.fail_n > 0:
                    self.fail_n -= 1
                    active.fail_status = self.fail_status
                else:  # a failed request has no body to spoil: it does not use up ``times``
                    self._body_faults(active)
            default_status = self.fail_status
            own = self.methods.get(method)
        if own:
            _apply_header(active, own, default_status)
        if header:
            _apply_header(active, header, default_status)
        return active


def _apply_header(active: Active, header: str, default_status: int) -> None:
    """``latency_ms=5;fail_n=1;fail_status=503;ignore_range`` onto ``active``."""
    items = {}
    for item in header.split(";"):
        key, sep, value = item.strip().partition("=")
        if key:
            items[key.strip()] = value.strip() if sep else ""
    for key, value in items.items():
        if key == "latency_ms":
            active.latency_ms += float(value)
        elif key == "fail_n":
            if int(value or "1") > 0:
                active.fail_status = int(items.get("fail_status") or default_status)
        elif key == "fail_status":
            active.fail_status = int(value)
        elif key in BODY_FAULTS:
            setattr(active, key, _as_bool(value))
        else:
            raise ValueError(f"unknown fault {key!r} in {HEADER}")
