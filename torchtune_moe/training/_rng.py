"""RNG save/restore for exact resumes: the torch (and CUDA), Python and NumPy random streams of one process, in
a form ``torch.load(weights_only=True)`` reads back (plain lists and tensors)."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

__all__ = ["rng_state", "restore_rng_state"]


def rng_state() -> dict:
    """This process's random streams: ``{"torch", "cuda", "python", "numpy"}``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng_state(states: Optional[list], rank: int, world_size: int, device: torch.device) -> Optional[str]:
    """Restores rank ``rank``'s streams from ``states`` (one :func:`rng_state` per rank, as saved). Returns a
    warning to show when they cannot be restored (saved by another number of ranks), else None."""
    if not states:
        return None
    if len(states) != world_size:
        return (
            f"resume_from_checkpoint: RNG states were saved by {len(states)} ranks, now {world_size}; "
            f"random streams are not restored"
        )
    s = states[rank]
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device=device)
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return None
