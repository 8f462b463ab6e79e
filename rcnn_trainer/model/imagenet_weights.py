"""torchvision's ImageNet classifier weights (`model.backbone.weights: imagenet`), read as data.

torchvision's own `Weights.get_state_dict` unpickles the cached file with weights_only=False and
no hash check, so a file planted in a shared torch cache (`$TORCH_HOME/hub/checkpoints`) runs its
payload. Here the file is checked against the hash published in its name (torchvision names each
file `<arch>-<first 8 hex digits of its sha256>.pth`) before anything reads it, downloaded with
that check when missing, and loaded with the weights-only unpickler.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from rcnn_trainer.errors import UserError
from rcnn_trainer.safe_load import load_weights_only


def published_url(name: str) -> str:
    """The download address of torchvision's default weights for classifier `name`."""
    return torchvision.models.get_model_weights(name).DEFAULT.url


def imagenet_state_dict(name: str, progress: bool = True) -> dict:
    url = published_url(name)
    filename = os.path.basename(urlparse(url).path)
    match = torch.hub.HASH_REGEX.search(filename)
    if match is None or len(match.group(1)) < 8:
        raise UserError(f"model.backbone.weights: imagenet: torchvision publishes '{filename}' without a hash "
                        f"in its name, so it cannot be checked; download it yourself and set "
                        f"model.backbone.weights to its path.")
    expected = match.group(1)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if os.path.lexists(cached) and not cached.is_file():  # a FIFO would block the read below for ever
        raise UserError(f"model.backbone.weights: imagenet: '{cached}' is not a regular file (a folder, a FIFO, a "
                        f"device or a broken link in the torch cache); it was not read. Delete it to download the "
                        f"weights again.")
    if not cached.exists():
        try:  # checks the hash before moving the download into place
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=expected, progress=progress)
        except (OSError, RuntimeError) as err:
            raise UserError(f"model.backbone.weights: imagenet: could not download {url} ({err}). Without "
                            f"internet, put the file at '{cached}' or set model.backbone.weights to a local "
                            f"path.") from None
    found = _sha256(cached)
    if not found.startswith(expected):
        raise UserError(f"model.backbone.weights: imagenet: '{cached}' does not match the hash torchvision "
                        f"publishes for it (sha256 {found[:16]}..., expected {expected}...): it is not torchvision's "
                        f"file (corrupt, or planted in a shared cache). It was not loaded; delete it to download "
                        f"it again.")
    return load_weights_only(cached, what="model.backbone.weights (imagenet)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
