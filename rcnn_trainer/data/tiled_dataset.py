"""Training on tiles: a split's images cut into the windows of data/tiling.py, as items.

Items: every window of every image larger than `size` (plus the image whole when `whole_image`),
and every smaller image whole. A tile without objects is drawn in an epoch with probability
`empty_share` (the sampler's per-epoch coin flip, as repeat-factor sampling draws fractions).

Decoding: a 3000 px image decodes in ~0.1 s, as long as a training step on a tile, so it must
not be decoded once per tile. The sampler keeps an image's tiles together in the epoch's order
(images shuffled, tiles shuffled within their image) and each worker keeps the last image it
decoded: an image is decoded once per worker per epoch (both workers may hold it when its
tiles span two batches). Everything random is a function of (seed, epoch, item, copy), so a
resumed run draws the same tiles with the same augmentation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from rcnn_trainer.data.coco import parse_key
from rcnn_trainer.data.images import check_loaded_size, read_first_readable
from rcnn_trainer.data.loader import TrainBatchSampler
from rcnn_trainer.data.repeat_factors import epoch_copies, repeat_factors
from rcnn_trainer.data.tiling import cut_boxes, is_tiled, split_ignored, tile_grid, tile_masks
from rcnn_trainer.data.transforms import output_size

IGNORE_LABEL = -1  # cut boxes ride through the transforms as boxes with this label, then split off


@dataclasses.dataclass(frozen=True)
class TileItem:
    record: int  # index into the split's records
    window: tuple[int, int, int, int] | None  # None: the image whole
    empty: bool  # no object kept as ground truth in the window


def tile_items(records: list, size: int, overlap: float, min_visible: float, whole_image: bool) -> list[TileItem]:
    """The items of a split, grouped by image (its tiles in grid order, then the image whole)."""
    items = []
    for index, r in enumerate(records):
        if not is_tiled(r.height, r.width, size):
            items.append(TileItem(index, None, False))
            continue
        for window in tile_grid(r.height, r.width, size, overlap):
            kept, _, _ = cut_boxes(r.boxes, window, min_visible)
            items.append(TileItem(index, window, not len(kept)))
        if whole_image:
            items.append(TileItem(index, None, False))
    return items


def tile_records(records: list, size: int, overlap: float, min_visible: float) -> list:
    """The records as the tiles show them (boxes cut and in tile pixels, the tile's size), for
    what fits settings to the objects' size as the model sees them (anchors, the preflight)."""
    out = []
    for item in tile_items(records, size, overlap, min_visible, whole_image=False):
        r = records[item.record]
        if item.window is None:
            out.append(r)
            continue
        kept, boxes, _ = cut_boxes(r.boxes, item.window, min_visible)
        x0, y0, x1, y1 = item.window
        out.append(dataclasses.replace(r, boxes=boxes, labels=r.labels[kept], width=x1 - x0, height=y1 - y0,
                                       rows=r.rows[kept] if len(r.rows) == len(r.labels) else r.rows[:0]))
    return out


class TiledDataset(torch.utils.data.Dataset):
    """Tiles of a CocoDetection split (its records, image reading, bad-record policy and
    transforms). Items are (image [3, h, w] in [0, 1], target) as the split's, the target with
    `ignore_boxes` [K, 4] (cut boxes less visible than min_visible) and `window`."""

    def __init__(self, base, *, size: int, overlap: float, min_visible: float, empty_share: float,
                 whole_image: bool):
        self.base = base
        self.min_visible, self.empty_share = min_visible, empty_share
        self.masks = base.masks  # the val loss turns it on (train/val_loss.py)
        self.items = tile_items(base.records, size, overlap, min_visible, whole_image)
        self._cached: tuple[int, object] | None = None  # (record index, decoded image): one per worker
        self.decoded = 0  # images decoded by this copy (each worker has its own)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def aspect_ratios(self) -> list[float]:
        records = self.base.records
        return [(i.window[2] - i.window[0]) / (i.window[3] - i.window[1]) if i.window
                else records[i.record].width / records[i.record].height for i in self.items]

    def repeat_factors(self, image_factors: list[float] | None = None) -> list[float]:
        """Per item: its image's repeat factor (repeat-factor sampling; 1 without) times
        empty_share for a tile without objects."""
        return [(1.0 if image_factors is None else image_factors[item.record]) * (self.empty_share if item.empty else 1.0)
                for item in self.items]

    def _image(self, index: int):
        if self._cached is None or self._cached[0] != index:
            found = read_first_readable(self.base.records, index, self.base._checks, False)
            self._cached = found  # (position, image): another record's if this one was unreadable (drop)
            self.decoded += 1
        return self._cached

    def __getitem__(self, key):
        index, epoch, copy, min_size = parse_key(key)
        item = self.items[index]
        position, image = self._image(item.record)
        record = self.base.records[position]
        check_loaded_size(image, record, self.base.ann_file)
        window = item.window if position == item.record else None
        if window is None:
            window = (0, 0, record.width, record.height)
        else:
            image = image.crop(window)
        x0, y0, x1, y1 = window
        kept, boxes, ignore = cut_boxes(record.boxes, window, self.min_visible)
        labels = np.concatenate([record.labels[kept], np.full(len(ignore), IGNORE_LABEL, np.int64)])
        target = {"boxes": torch.from_numpy(np.concatenate([boxes, ignore]).astype(np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(labels), "image_id": record.image_id,
                  "orig_size": (y1 - y0, x1 - x0), "window": window}
        transforms = self.base.transforms
        if self.masks:
            segmentations = [self.base.raw["annotations"][row]["segmentation"] for row in record.rows[kept].tolist()]
            size = output_size(transforms, y1 - y0, x1 - x0, min_size)
            masks = tile_masks(segmentations, record.height, record.width, window, size)
            # the ignore boxes carry empty masks through the transforms (the loss never reads them)
            masks = np.concatenate([masks, np.zeros((len(ignore), *size), np.uint8)])
            target["masks"] = torch.from_numpy(masks)
        rng = np.random.default_rng((self.base.seed, epoch, index) if copy == 0
                                    else (self.base.seed, epoch, index, copy))
        image, target = (transforms(image, target, rng) if min_size is None
                         else transforms(image, target, rng, min_size))
        return image, split_ignored(target, IGNORE_LABEL)


class TiledBatchSampler(TrainBatchSampler):
    """TrainBatchSampler over tiles: an epoch shuffles the images, then each image's tiles
    among themselves, and draws them image after image (the decode cache's order)."""

    def __init__(self, dataset: TiledDataset, image_factors: list[float] | None = None, **kwargs):
        super().__init__(dataset.aspect_ratios, repeat_factors=dataset.repeat_factors(image_factors), **kwargs)
        self.item_records = [item.record for item in dataset.items]
        self.num_records = max(self.item_records, default=-1) + 1

    def epoch_draws(self, epoch: int) -> list[tuple[int, int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        copies = epoch_copies(self.repeat_factors, generator)
        by_record: list[list] = [[] for _ in range(self.num_records)]
        for index, count in enumerate(copies):
            by_record[self.item_records[index]] += [(index, epoch, copy) for copy in range(count)]
        draws = []
        for record in torch.randperm(self.num_records, generator=generator).tolist():
            tiles = by_record[record]
            draws += [tiles[i] for i in torch.randperm(len(tiles), generator=generator).tolist()]
        return draws


def tiled_training(cfg, dataset, **sampler_kwargs) -> tuple[TiledDataset, TiledBatchSampler]:
    """The tiled dataset over a training split and its batch sampler (data.tiling)."""
    tiling = cfg.data.tiling
    tiled = TiledDataset(dataset, size=tiling.size, overlap=tiling.overlap, min_visible=tiling.min_visible,
                         empty_share=tiling.empty_share, whole_image=tiling.whole_image)
    threshold = cfg.data.repeat_factor_threshold
    image_factors = None if threshold is None else repeat_factors([r.labels for r in dataset.records], threshold)
    return tiled, TiledBatchSampler(tiled, image_factors, batch_size=cfg.data.batch_size, seed=cfg.seed,
                                    group_by_aspect=cfg.data.aspect_ratio_grouping, min_sizes=cfg.data.train_min_sizes,
                                    **sampler_kwargs)


def tiles_with_objects(cfg, dataset, count: int) -> TiledDataset | torch.utils.data.Subset:
    """At most `count` tiles that hold objects (evenly spread over the split), read with the
    split's own transforms: what the monitor's probe and the val loss look at under data.tiling
    (whole images resized would show the objects smaller than the model ever sees them)."""
    tiling = cfg.data.tiling
    tiled = TiledDataset(dataset, size=tiling.size, overlap=tiling.overlap, min_visible=tiling.min_visible,
                         empty_share=1.0, whole_image=False)
    full = [i for i, item in enumerate(tiled.items) if not item.empty]
    chosen = full if len(full) <= count else [full[round(k * len(full) / count)] for k in range(count)]
    return torch.utils.data.Subset(tiled, chosen or list(range(min(count, len(tiled)))))


def tiled_val_loader(cfg, loader):
    """The evaluation loader as the val loss reads it: under data.tiling, tiles with objects
    (at most 4 per image), as training sees the images; else the loader itself."""
    if cfg.data.tiling is None:
        return loader
    subset = loader.dataset
    base = subset.dataset if isinstance(subset, torch.utils.data.Subset) else subset
    records = subset.indices if isinstance(subset, torch.utils.data.Subset) else range(len(base))
    tiles = tiles_with_objects(cfg, base, 4 * len(records))
    return torch.utils.data.DataLoader(tiles, batch_size=loader.batch_size, shuffle=False,
                                       num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def tiled_view(dataset, size: int, overlap: float, min_visible: float) -> TiledDataset:
    """The split as its tiles (whole_image off, every tile), with the split's attributes that
    the preflight reads (records: tile_records, in item order; the file's counts unchanged)."""
    view = TiledDataset(dataset, size=size, overlap=overlap, min_visible=min_visible, empty_share=1.0,
                        whole_image=False)
    view.records = tile_records(dataset.records, size, overlap, min_visible)
    for name in ("file_boxes", "class_names", "raw", "ann_file", "report"):
        setattr(view, name, getattr(dataset, name))
    return view
