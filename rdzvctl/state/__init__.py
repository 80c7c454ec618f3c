"""The state layer: model, safe codec, JSON form and pure analysis. No I/O."""

from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["NodeDesc", "RendezvousState"]
