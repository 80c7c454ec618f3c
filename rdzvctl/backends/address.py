"""Where a rendezvous lives: :class:`Address` (torchrun's ``--rdzv-*`` options) and ``--rdzv-conf`` parsing.

``Address`` is what every backend is built from (:meth:`rdzvctl.backends.base.RendezvousBackend.from_address`);
``parse_conf`` reads torchrun's ``k1=v1,k2=v2`` form, ``check_conf_keys`` refuses a key neither
the backend nor torch knows, and ``Address.check_conf`` bounds torch's numeric options.
:mod:`rdzvctl.backends.base` re-exports these names.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, FrozenSet, Iterable, Mapping, NamedTuple, Optional

from rdzvctl.errors import BackendConfigError
from rdzvctl.text import excerpt

__all__ = [
    "Address",
    "parse_conf",
    "check_conf_keys",
    "SHARED_CONF_KEYS",
    "NUMERIC_OPTIONS",
    "INTEGER_OPTIONS",
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
]

DEFAULT_TIMEOUT = 10.0
#: The largest RDZVCTL_TIMEOUT (a year, as the CLI's SECONDS options); a larger one overflows.
MAX_TIMEOUT = 365 * 86_400.0



def parse_conf(text: str) -> Dict[str, str]:
    """Parse torchrun's ``--rdzv-conf`` form ``k1=v1,k2=v2`` (empty values allowed)."""
    conf: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BackendConfigError(f"--rdzv-conf: expected key=value, got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


#: ``--rdzv-conf`` keys every backend accepts: rdzvctl's liveness and size settings, and
#: what torch's dynamic rendezvous and torchrun read from rdzv_conf in torch 2.13:
#: ``dynamic_rendezvous.create_handler`` (``join``/``last_call``/``close``/``heartbeat_timeout``
#: via ``_get_timeout``, ``keep_alive_interval``, ``keep_alive_max_attempt``),
#: ``launcher.api.LaunchConfig`` (``timeout``, always set by torchrun), ``run.py`` (``rank``
#: for the static backend) and the c10d/etcd backends' ``read_timeout``.  torch's
#: ``heartbeat_timeout`` only bounds the keep-alive write (``_keep_alive``); liveness is
#: ``keep_alive_interval x keep_alive_max_attempt`` (``_sanitize``), so rdzvctl judges the same.
SHARED_CONF_KEYS: FrozenSet[str] = frozenset({
    "keep_alive_interval", "keep_alive_max_attempt", "min_nodes", "max_nodes",
    "join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
    "timeout", "rank", "read_timeout",
})


def check_conf_keys(backend: str, conf: Mapping[str, str], accepted: Optional[FrozenSet[str]]) -> None:
    """Refuse a ``--rdzv-conf`` key neither the backend nor torch/rdzvctl knows (a typo would be ignored
    silently otherwise, e.g. leaving liveness at its default); ``accepted=None`` accepts any key."""
    if accepted is None:
        return
    known = sorted(accepted | SHARED_CONF_KEYS)
    for key in sorted(conf):
        if key in accepted or key in SHARED_CONF_KEYS:
            continue
        import difflib

        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise BackendConfigError(
            f"--rdzv-conf: unknown key {key!r} for the {backend} backend{hint} (known keys: {', '.join(known)})"
        )


#: torch's numeric ``--rdzv-conf`` options with the largest value rdzvctl accepts (torch reads each
#: with ``RendezvousParameters.get_as_int``: ``create_handler`` and ``_get_timeout`` in
#: dynamic_rendezvous.py, ``create_backend`` in c10d_/etcd_rendezvous_backend.py, ``create_rdzv_handler``
#: in etcd_rendezvous.py).  rdzvctl also takes a fraction of a second; every value must be positive.
#: The caps only keep the arithmetic finite: a keep-alive interval up to a day, timeouts up to a
#: year, up to a million keep-alive attempts, node counts up to 2**31 - 1.
NUMERIC_OPTIONS: Mapping[str, float] = {
    "keep_alive_interval": 86_400,
    "keep_alive_max_attempt": 10**6,
    "join_timeout": 365 * 86_400,
    "last_call_timeout": 365 * 86_400,
    "close_timeout": 365 * 86_400,
    "heartbeat_timeout": 365 * 86_400,
    "read_timeout": 365 * 86_400,
    "timeout": 365 * 86_400,
    "min_nodes": 2**31 - 1,
    "max_nodes": 2**31 - 1,
}
#: Those of :data:`NUMERIC_OPTIONS` that are counts (whole numbers).
INTEGER_OPTIONS = frozenset({"keep_alive_max_attempt", "min_nodes", "max_nodes"})


def _check_range(key: str, value: float, minimum: Optional[float], maximum: Optional[float]) -> None:
    if minimum is not None and value < minimum:
        raise BackendConfigError(f"--rdzv-conf {key}: {excerpt(value)} is below {_number(minimum)}")
    if maximum is not None and value > maximum:
        raise BackendConfigError(f"--rdzv-conf {key}: {excerpt(value)} is above {_number(maximum)}")


def _number(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else f"{bound:g}"


#: The spellings of a boolean ``--rdzv-conf`` value.
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})


class _AddressFields(NamedTuple):
    backend: str
    endpoint: str
    run_id: str
    conf: Mapping[str, str]
    timeout: float


class Address(_AddressFields):
    """Where a rendezvous lives, the torchrun way.

    ``backend``/``endpoint``/``run_id``/``conf`` are torchrun's
    ``--rdzv-backend``/``--rdzv-endpoint``/``--rdzv-id``/``--rdzv-conf``;
    ``timeout`` bounds every network operation (seconds).

    Immutable. A named tuple rather than a dataclass: every command builds one, and a
    dataclass costs the compilation of its generated methods at import.
    """

    __slots__ = ()

    def __new__(cls, backend: str, endpoint: str = "", run_id: str = "", conf: Optional[Mapping[str, str]] = None,
                timeout: float = DEFAULT_TIMEOUT) -> "Address":
        self = super().__new__(cls, backend, endpoint, run_id, {} if conf is None else conf, timeout)
        # The passwords of this invocation, so nothing rdzvctl prints can show them (rdzvctl.text.scrub).
        from rdzvctl.text import register_address_secrets

        register_address_secrets(endpoint, self.conf, os.environ)
        return self

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> "Address":  # type: ignore[override]  # mypy's is generic
        # The named tuple's own builds the tuple directly; through __new__, the secrets of an
        # address made by _make or _replace (which calls _make) are registered too.
        return cls(*iterable)

    @classmethod
    def from_env(
        cls,
        backend: Optional[str] = None,
        endpoint: Optional[str] = None,
        run_id: Optional[str] = None,
        conf: Optional[str] = None,
        timeout: Optional[float] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> "Address":
        """Explicit values first, then ``RDZVCTL_RDZV_*``, then torchrun's ``PET_RDZV_*``."""
        env = os.environ if environ is None else environ

        def pick(value: Optional[str], name: str) -> Optional[str]:
            if value is not None:
                return value
            return env.get(f"RDZVCTL_RDZV_{name}") or env.get(f"PET_RDZV_{name}")

        backend = pick(backend, "BACKEND")
        if not backend:
            raise BackendConfigError(
                "no backend given: pass --rdzv-backend or set RDZVCTL_RDZV_BACKEND / PET_RDZV_BACKEND"
            )
        if timeout is None:
            raw = env.get("RDZVCTL_TIMEOUT")
            try:
                timeout = float(raw) if raw else DEFAULT_TIMEOUT
            except ValueError:
                raise BackendConfigError(f"RDZVCTL_TIMEOUT: not a number: {excerpt(raw)}") from None
            if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
                raise BackendConfigError(f"RDZVCTL_TIMEOUT: {excerpt(raw)} is not a number of seconds "
                                         f"above 0 and up to {MAX_TIMEOUT:.0f}")
        return cls(
            backend=backend,
            endpoint=pick(endpoint, "ENDPOINT") or "",
            run_id=pick(run_id, "ID") or "",
            conf=parse_conf(pick(conf, "CONF") or ""),
            timeout=timeout,
        )

    def with_run_id(self, run_id: str) -> "Address":
        return Address(self.backend, self.endpoint, run_id, dict(self.conf), self.timeout)

    # torch's RendezvousParameters.get* helpers, with errors that name the option.
    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.conf.get(key, default)

    def get_int(self, key: str, default: Optional[int] = None, *, minimum: Optional[int] = None,
                maximum: Optional[int] = None) -> Optional[int]:
        """``key`` as an integer, or ``default``; a value that is not one, or is outside
        ``[minimum, maximum]``, raises :class:`BackendConfigError` naming the option."""
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:  # also a string of more digits than int() accepts
            raise BackendConfigError(f"--rdzv-conf {key}: not an integer: {excerpt(raw)}") from None
        _check_range(key, value, minimum, maximum)
        return value

    def get_float(self, key: str, default: Optional[float] = None, *, minimum: Optional[float] = None,
                  maximum: Optional[float] = None) -> Optional[float]:
        """``key`` as a finite number, or ``default``; NaN, infinity or a value outside
        ``[minimum, maximum]`` raises :class:`BackendConfigError` naming the option."""
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BackendConfigError(f"--rdzv-conf {key}: not a number: {excerpt(raw)}") from None
        if not math.isfinite(value):
            raise BackendConfigError(f"--rdzv-conf {key}: not a finite number: {excerpt(raw)}")
        _check_range(key, value, minimum, maximum)
        return value

    def check_conf(self) -> None:
        """Reject what torch's handler would reject in ``--rdzv-conf`` before anything is read:
        a non-numeric, non-finite, non-positive or absurd value of one of torch's numeric options
        (:data:`NUMERIC_OPTIONS`), and ``min_nodes`` above ``max_nodes``
        (torch's ``RendezvousParameters.__init__``)."""
        for key, maximum in NUMERIC_OPTIONS.items():
            if key in INTEGER_OPTIONS:
                self.get_int(key, minimum=1, maximum=int(maximum))
            else:
                value = self.get_float(key, maximum=maximum)
                if value is not None and value <= 0:
                    raise BackendConfigError(f"--rdzv-conf {key}: must be positive, got {value:g}")
        lowest, highest = self.get_int("min_nodes"), self.get_int("max_nodes")
        if lowest is not None and highest is not None and lowest > highest:
            raise BackendConfigError(f"--rdzv-conf min_nodes ({lowest}) is greater than max_nodes ({highest})")

    def get_bool(self, key: str, default: Optional[bool] = None) -> Optional[bool]:
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise BackendConfigError(f"--rdzv-conf {key}: not a boolean: {raw!r}")
