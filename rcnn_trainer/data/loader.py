"""Datasets and DataLoaders from the config.

Training reads an endless stream of batches (iteration-based, like detectron2): each epoch is
a permutation seeded by (seed, epoch), optionally grouped by aspect ratio. Under DDP every
rank takes its slice of the same global batch, so N ranks see exactly what one process with
an N-times larger batch would see. The stream starts at any iteration, which makes resume exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from rcnn_trainer.config import Config
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.labels import load_split
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.data.repeat_factors import epoch_copies, repeat_factors
from rcnn_trainer.data.synthetic import ensure_synthetic_dataset
from rcnn_trainer.data.tiling import allow_large_images
from rcnn_trainer.data.augment import build_transforms
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import check_file_size


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets; the items an evaluation dataset skipped (None: an unreadable
    image under data.bad_records.missing_image: drop) are left out, so a batch may be empty."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [target for _, target in kept]


class TrainBatchSampler:
    """Yields lists of (index, epoch, copy) for one rank, forever, starting at `start_iter`.
    `repeat_factors` (one per image, >= 1): repeat-factor sampling; None draws each image once
    per epoch. `min_sizes` of more than one size: multi-scale training, each global batch's
    short side drawn from them by (seed, step), so that every rank and a resumed run draw alike;
    the items are then (index, epoch, copy, min_size)."""

    def __init__(self, aspect_ratios: list[float], batch_size: int, seed: int, group_by_aspect: bool,
                 start_iter: int = 0, rank: int = 0, world_size: int = 1,
                 repeat_factors: list[float] | None = None, min_sizes: list[int] | None = None):
        if not aspect_ratios:
            raise UserError(f"no training image is left to sample batches from (0 images kept; data.batch_size "
                            f"{batch_size} x {world_size} processes): check data.train and the dropped-record summary.")
        self.groups = [0 if ar >= 1.0 else 1 for ar in aspect_ratios] if group_by_aspect else [0] * len(aspect_ratios)
        self.batch_size, self.seed = batch_size, seed
        self.start_iter, self.rank, self.world_size = start_iter, rank, world_size
        self.repeat_factors = repeat_factors
        self.min_sizes = min_sizes if min_sizes and len(min_sizes) > 1 else None

    def epoch_draws(self, epoch: int) -> list[tuple[int, int, int]]:
        """This epoch's (index, epoch, copy) items in random order; copy numbers an image's
        repeats so that each gets its own augmentation."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        copies = [1] * len(self.groups) if self.repeat_factors is None else epoch_copies(self.repeat_factors, generator)
        draws = [(index, epoch, copy) for index, count in enumerate(copies) for copy in range(count)]
        return [draws[i] for i in torch.randperm(len(draws), generator=generator).tolist()]

    def global_batches(self) -> Iterator[list[tuple[int, int, int]]]:
        """Every epoch adds each image (once, or as many times as its repeat factor draws) to
        its aspect-ratio bucket; a full bucket is a batch. Leftovers carry into the next epoch,
        so a dataset (or a group) smaller than the global batch still yields: its images repeat
        within a batch, each with its own augmentation."""
        global_size = self.batch_size * self.world_size
        buckets: dict[int, list] = {}
        epoch = 0
        while True:
            for draw in self.epoch_draws(epoch):
                bucket = buckets.setdefault(self.groups[draw[0]], [])
                bucket.append(draw)
                if len(bucket) == global_size:
                    yield list(bucket)
                    bucket.clear()
            epoch += 1

    def batch_min_size(self, step: int) -> int:
        generator = torch.Generator().manual_seed(self.seed * 100019 + step)
        return self.min_sizes[int(torch.randint(len(self.min_sizes), (1,), generator=generator))]

    def __iter__(self):
        for step, batch in enumerate(self.global_batches()):
            if step >= self.start_iter:
                mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                if self.min_sizes is not None:
                    size = self.batch_min_size(step)
                    mine = [(*draw, size) for draw in mine]
                yield mine


def resolve_splits(cfg: Config) -> dict[str, tuple[Path, Path]]:
    """(ann_file, img_dir) of train and val; generates the synthetic dataset when configured."""
    data = cfg.data
    if data.synthetic is not None:
        syn = data.synthetic
        folder = ensure_synthetic_dataset(syn.num_train, syn.num_val, syn.image_size, syn.seed, syn.cache_dir)
        return {"train": (folder / "train.json", folder / "images"), "val": (folder / "val.json", folder / "images")}
    return {"train": (data.train.ann_file, data.train.img_dir), "val": (data.val.ann_file, data.val.img_dir)}


def build_dataset(cfg: Config, split: str, for_eval: bool = False) -> CocoDetection:
    """`for_eval`: the split as evaluation reads it (no augmentation, no masks rasterized),
    whichever split it is (rcnn-eval --split train)."""
    ann_file, img_dir = resolve_splits(cfg)[split]
    training = split == "train" and not for_eval
    if cfg.data.tiling is not None:  # large images are what tiling is for: a higher, still hard, pixel limit
        allow_large_images(cfg.data.tiling.max_image_megapixels)
    policy = cfg.data.bad_records
    record_policy = RecordPolicy(
        missing_image=policy.missing_image, unknown_category=policy.unknown_category,
        degenerate_box=policy.degenerate_box, box_outside_image=policy.box_outside_image,
        non_finite_box=policy.non_finite_box, bad_mask=policy.bad_mask, unsafe_path=policy.unsafe_path)
    report = DropReport()  # VOC / YOLO / LabelMe labels: read into a COCO dict (data/labels/), else None
    raw, labels_img_dir = load_split(cfg, split, record_policy, report)
    img_dir = labels_img_dir or img_dir
    if raw is None and Path(ann_file).is_file():
        check_file_size(ann_file, int(cfg.data.max_annotation_mb * 2**20), "annotation file", "data.max_annotation_mb")
    dataset = CocoDetection(
        ann_file, img_dir, policy=record_policy, raw=raw, report=report,
        check_images=cfg.data.check_images,
        masks=cfg.model.mask.enabled, load_masks=cfg.model.mask.enabled and training,
        transforms=build_transforms(cfg.data.test_min_size, cfg.data.max_size, cfg.data.hflip_prob, train=training,
                                    augment=cfg.data.augment),
        seed=cfg.seed)
    dataset.skip_unreadable = not training  # evaluation scores the images it read, never a stand-in
    if not dataset.records:
        raise UserError(f"{ann_file}: no image left in the {split} split ({len(dataset.raw['images'])} in the file; "
                        f"dropped: {'; '.join(dataset.report.lines()) or 'none'}). Fix the file or data.{split}.")
    return dataset


def build_train_loader(cfg: Config, dataset: CocoDetection, start_iter: int = 0,
                       rank: int = 0, world_size: int = 1) -> DataLoader:
    threshold = cfg.data.repeat_factor_threshold
    if cfg.data.tiling is not None:  # tiles of the large images, grouped by image (data/tiled_dataset.py)
        from rcnn_trainer.data.tiled_dataset import tiled_training

        dataset, sampler = tiled_training(cfg, dataset, start_iter=start_iter, rank=rank, world_size=world_size)
    else:
        sampler = TrainBatchSampler(
            [r.width / r.height for r in dataset.records], cfg.data.batch_size, cfg.seed,
            cfg.data.aspect_ratio_grouping, start_iter=start_iter, rank=rank, world_size=world_size,
            repeat_factors=None if threshold is None else repeat_factors([r.labels for r in dataset.records], threshold),
            min_sizes=cfg.data.train_min_sizes)
    # An own generator: creating the loader must not draw from the global torch RNG, or a
    # resumed run would sample differently from an uninterrupted one.
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed), pin_memory=_pin(cfg),
                      timeout=cfg.train.data_timeout_s if workers else 0)  # the watchdog for worker processes


def _pin(cfg: Config) -> bool:
    """Page-locked batches on CUDA, so that the copies to the GPU can be non_blocking."""
    return cfg.train.device != "cpu" and torch.cuda.is_available()


def build_eval_loader(cfg: Config, dataset: CocoDetection, indices: list[int] | None = None) -> DataLoader:
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=cfg.data.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed))
