"""Validation loss: the training loss terms on the val split, at every evaluation.

The model runs its training forward (the same samplers, avg_factors and loss weights, so the
figures compare with the training loss line for line) under no_grad, with every BatchNorm in
eval mode (running statistics, as at inference) and the samplers' random draws seeded, so two
evaluations of the same weights give the same number. With masks on, the val images' masks are
rasterized for it (evaluation itself reads them from the COCO file). Logged as `val/loss`
(the weighted total, like the training `loss`) and `val/loss_<term>` (unweighted, like
`loss_<term>`); averaged over ranks under DDP.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from rcnn_trainer.runtime.device import to_device
from rcnn_trainer.runtime.distributed import mean_over_ranks
from rcnn_trainer.losses.weighting import weighted_total

SAMPLER_SEED = 0


def val_loss_loader(val_loader: DataLoader, with_masks: bool) -> DataLoader:
    """The evaluation loader, reading the objects' masks too when the model trains them."""
    if not with_masks:
        return val_loader
    subset = val_loader.dataset
    dataset = copy.copy(subset.dataset if isinstance(subset, Subset) else subset)
    dataset.masks = True
    target = Subset(dataset, subset.indices) if isinstance(subset, Subset) else dataset
    return DataLoader(target, batch_size=val_loader.batch_size, shuffle=False, num_workers=val_loader.num_workers,
                      collate_fn=val_loader.collate_fn)


@torch.no_grad()
def validation_losses(model: nn.Module, loader: DataLoader, device: torch.device, weights: dict[str, float],
                      autocast) -> dict[str, float]:
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    sums: dict[str, float] = {}
    images = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SAMPLER_SEED)
            for batch in loader:
                if not batch[0]:  # every image of the batch was dropped (unreadable)
                    continue
                batch_images, targets = to_device(*batch, device)
                with autocast():
                    losses, _ = model(batch_images, targets)
                total, _ = weighted_total(losses, weights)
                n = len(batch_images)
                for name, value in {"loss": total, **losses}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                images += n
    finally:
        model.train(was_training)
    means = mean_over_ranks({name: torch.tensor(total / max(images, 1)) for name, total in sums.items()})
    return {f"val/{name}": float(value) for name, value in means.items()}
