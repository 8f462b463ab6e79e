"""Reading torch files as data: nothing in a file this product reads can run code.

Every `.pth` (checkpoints, backbone weights, torchvision state dicts) goes through
`load_weights_only`: torch's weights-only unpickler, which builds tensors and plain values and
refuses any other global before constructing it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from rcnn_trainer.errors import UnsafeFile, UserError

# Checkpoints written before the RNG states became plain values hold numpy's MT19937 state as an
# ndarray. These exact numpy types rebuild an array from bytes and run no code, so they are the
# only globals allowed beyond torch's own weights-only set.
LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def load_weights_only(path: Path, what: str = "checkpoint"):
    """torch.load that never runs code from the file: weights-only, plus the legacy numpy types.

    A file that needs any other global is refused (UnsafeFile) before anything of it is built;
    a truncated or foreign one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist.")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err) or "Unsupported operand" in str(err):
            found = _unsafe_globals(path)
            raise UnsafeFile(
                f"{what} '{path}' was refused: loading it would run code from the file "
                f"({'it needs ' + ', '.join(found[:5]) if found else 'it asks for objects outside plain tensors and values'}). "
                f"rcnn_trainer reads checkpoints as data only (torch.load weights_only=True), because a file "
                f"from someone else can carry a payload that runs on your machine. If you made this file yourself "
                f"with another tool, save just its tensors (torch.save(model.state_dict(), PATH)) and use that."
            ) from None
        raise _corrupt(path, what, err) from None
    except Exception as err:  # noqa: BLE001 - any other failure to read is a corrupt file
        raise _corrupt(path, what, err) from None


def _corrupt(path: Path, what: str, err: Exception) -> UserError:
    return UserError(f"{what} '{path}' is corrupt or truncated: not a loadable state dict or checkpoint ({type(err).__name__}: "
                     f"{str(err)[:200]}).")


def _unsafe_globals(path: Path) -> list[str]:
    try:  # lists the globals a pickle names without unpickling anything
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to word the message
        return []
