"""Whether this process trains beside others under torch.distributed: the one test every
collective in losses/ and engine/ asks before it communicates. A module of its own so that
losses/ (below the trainer) and engine/ both import it without importing each other."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized; with one process the
    collectives are skipped (they would be no-ops, and torch.distributed may not be built)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
