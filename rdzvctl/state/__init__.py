"""The state layer: model, safe codec, JSON form and pure analysis. No I/O.

``model`` (the state), ``codec`` (decode/encode; ``prescan`` bounds a pickle
before it is read, ``convert`` checks what it built), ``jsonform`` (the JSON
form and the one JSON document loader), ``nodes`` (liveness), ``repairs`` (as
torch does them), ``lifecycle`` and ``findings`` (phase, what torch does next),
``analysis`` (semantic events and their grouping; re-exports liveness, repairs
and findings), ``invariants``, ``restart``, ``history``.
"""

from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["NodeDesc", "RendezvousState"]
