"""Sliced inference (data.tiling): a large image as overlapping tiles plus the image whole,
run in batches, the detections merged across views and reported in original pixels.

SlicedModel wraps a detector with the detector's inference signature: it takes the images at
full resolution (uint8 or float [3, H, W], typically views of the decoded file: no copy) and
returns per image {"boxes" (xyxy, original pixels), "labels", "scores"} and, with a mask head,
"rles" (COCO RLE of each mask at 0.5, in original pixels). Each view is cut as a view of the
image and resized alone by the evaluation rule (min_size / max_size), so memory is one image
plus one batch of tiles: the whole image is never converted to float or resized at full size
in one piece except through the antialiased uint8 resize of the whole-image view.

Merging: `nms` (per-class NMS at model.roi.nms_thresh) or `greedy` (SAHI's greedy NMM: the
best-scored box absorbs the same-class boxes whose intersection covers >= merge_thresh of the
smaller box, and becomes their union: a box cut at a tile edge rejoins the rest of its object).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_area

from rcnn_trainer.data.tiling import is_tiled, tile_grid, window_tensor
from rcnn_trainer.data.transforms import resize_scale


class ToUint8Tensor:
    """Evaluation transform for sliced inference: the image as a uint8 tensor [3, H, W] at full
    resolution (a view of the decoded pixels), the target unchanged (original pixels)."""

    def __call__(self, image, target, rng=None, min_size=None):
        with warnings.catch_warnings():  # read-only pixels: nothing writes into them, tiles are views
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(image)).permute(2, 0, 1), target


class SlicedModel(nn.Module):
    def __init__(self, model: nn.Module, *, size: int, overlap: float, whole_image: bool, min_size: int,
                 max_size: int, merge: str = "nms", merge_thresh: float = 0.5, nms_thresh: float = 0.5,
                 batch_size: int = 4):
        super().__init__()
        if merge not in ("greedy", "nms"):
            raise ValueError(f"unknown merge '{merge}' (greedy | nms)")
        self.model = model
        self.size, self.overlap, self.whole_image = size, overlap, whole_image
        self.min_size, self.max_size = min_size, max_size
        self.merge, self.merge_thresh, self.nms_thresh = merge, merge_thresh, nms_thresh
        self.batch_size = batch_size

    @staticmethod
    def from_config(model: nn.Module, cfg) -> "SlicedModel":
        tiling = cfg.data.tiling
        return SlicedModel(model, size=tiling.size, overlap=tiling.overlap, whole_image=tiling.whole_image,
                           min_size=cfg.data.test_min_size, max_size=cfg.data.max_size, merge=tiling.merge,
                           merge_thresh=tiling.merge_thresh, nms_thresh=cfg.model.roi.nms_thresh,
                           batch_size=max(cfg.data.batch_size, 1))

    def views(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The windows run on an image: its tiles, and the image whole (last), or the whole alone."""
        if not is_tiled(height, width, self.size):
            return [(0, 0, width, height)]
        return tile_grid(height, width, self.size, self.overlap) + ([(0, 0, width, height)] if self.whole_image else [])

    def prepare(self, image: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
        """The window resized by the evaluation rule, float [3, h, w] in [0, 1]."""
        crop = window_tensor(image, window)
        h, w = crop.shape[-2:]
        scale = resize_scale(h, w, self.min_size, self.max_size)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        if size != [h, w]:  # PIL-like antialiased bilinear, as the data pipeline resizes (uint8 stays uint8)
            crop = F.resize(crop.contiguous(), size, antialias=True)
        return crop.float().div_(255.0) if crop.dtype == torch.uint8 else crop.float()

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], original_sizes=None, masks: bool = True) -> list[dict]:
        return [self.detect(image, masks) for image in images]

    def detect(self, image: torch.Tensor, masks: bool = True) -> dict:
        height, width = image.shape[-2:]
        windows = self.views(height, width)
        device = next(self.model.parameters()).device
        found = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            tensors = [self.prepare(image, w).to(device) for w in chunk]
            sizes = [(w[3] - w[1], w[2] - w[0]) for w in chunk]
            for window, det in zip(chunk, self.model(tensors, original_sizes=sizes, masks=masks)):
                found.append(shift_detection(det, window))
        boxes, scores, labels, crops = (torch.cat([d[k] for d in found]) if k != "crops" else
                                        [c for d in found for c in d["crops"]]
                                        for k in ("boxes", "scores", "labels", "crops"))
        if self.merge == "nms":
            groups = [[int(i)] for i in batched_nms(boxes, scores, labels, self.nms_thresh)]
        else:
            groups = greedy_groups(boxes, scores, labels, self.merge_thresh)
        out = {"boxes": torch.stack([merged_box(boxes, g) for g in groups]).reshape(-1, 4) if groups
               else boxes.new_zeros((0, 4)),
               "scores": scores[[g[0] for g in groups]], "labels": labels[[g[0] for g in groups]]}
        if any(d["with_masks"] for d in found):  # even when nothing was found: the results say masks
            out["rles"] = [merged_rle([crops[i] for i in g], height, width) for g in groups]
        return out


def shift_detection(det: dict, window: tuple[int, int, int, int]) -> dict:
    """One view's detections (in view pixels) moved to original pixels; masks become crops of
    their box at 0.5: (bool [h, w], x, y) in original pixels (never view-size arrays per box)."""
    x0, y0 = window[0], window[1]
    boxes = det["boxes"].float().cpu() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    crops: list = [None] * len(boxes)
    if "masks" in det:
        binary = det["masks"][:, 0].cpu() >= 0.5
        for i, box in enumerate(det["boxes"].cpu().tolist()):
            bx0, by0 = max(int(box[0]), 0), max(int(box[1]), 0)
            bx1, by1 = min(int(np.ceil(box[2])), binary.shape[-1]), min(int(np.ceil(box[3])), binary.shape[-2])
            crops[i] = (binary[i, by0:by1, bx0:bx1].numpy(), bx0 + x0, by0 + y0)
    return {"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu(), "crops": crops,
            "with_masks": "masks" in det}


def overlapping_pairs(boxes: np.ndarray, labels: np.ndarray, thresh: float, chunk: int = 256) -> list[np.ndarray]:
    """For each box [N, 4], the other same-class boxes whose intersection covers >= thresh of the
    smaller of the two. Boxes sorted by x0 are compared in chunks with the band of boxes that can
    reach them, never N x N at once: a 100-megapixel image gives ~10^5 detections."""
    order = np.argsort(boxes[:, 0], kind="stable")
    b, lab = boxes[order], labels[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    widest = float((b[:, 2] - b[:, 0]).max()) if len(b) else 0.0
    neighbours: list[np.ndarray] = [np.zeros(0, np.int64)] * len(b)
    for start in range(0, len(b), chunk):
        rows = slice(start, min(start + chunk, len(b)))
        lo = np.searchsorted(b[:, 0], b[rows, 0].min() - widest, "left")
        hi = np.searchsorted(b[:, 0], b[rows, 2].max(), "right")
        lt = np.maximum(b[rows, None, :2], b[None, lo:hi, :2])
        rb = np.minimum(b[rows, None, 2:], b[None, lo:hi, 2:])
        inter = np.clip(rb - lt, 0, None).prod(axis=2)
        ios = inter / np.maximum(np.minimum(area[rows, None], area[None, lo:hi]), 1e-6)
        hit = (ios >= thresh) & (lab[rows, None] == lab[None, lo:hi])
        for k, row in enumerate(range(rows.start, rows.stop)):
            found = np.flatnonzero(hit[k]) + lo
            neighbours[row] = order[found[found != row]]
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(b)
    for row, index in enumerate(order):
        out[index] = neighbours[row]
    return out


def greedy_groups(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, thresh: float) -> list[list[int]]:
    """Greedy non-maximum merging: by descending score, each box not yet taken grows into the
    union of the remaining same-class boxes whose intersection over the smaller area (with the
    union so far) is >= thresh, until none joins: the parts of an object cut at tile edges (and
    the view that saw it whole) become one box, whatever their scores. Candidates come from
    the pairs that overlap (overlapping_pairs). Groups of indices, the best-scored first."""
    b = boxes.double().numpy()
    neighbours = overlapping_pairs(b, labels.numpy(), thresh)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    taken = np.zeros(len(b), bool)
    groups = []
    for i in torch.argsort(scores, descending=True).tolist():
        if taken[i]:
            continue
        taken[i] = True
        group, union, frontier = [i], b[i].copy(), set(neighbours[i].tolist())
        while frontier:
            joined = []
            for j in sorted(frontier):
                if taken[j]:
                    continue
                inter = np.clip(np.minimum(union[2:], b[j, 2:]) - np.maximum(union[:2], b[j, :2]), 0, None).prod()
                if inter >= thresh * max(min(area[j], (union[2] - union[0]) * (union[3] - union[1])), 1e-6):
                    joined.append(j)
            frontier = set()
            for j in joined:
                taken[j] = True
                group.append(j)
                union = np.concatenate([np.minimum(union[:2], b[j, :2]), np.maximum(union[2:], b[j, 2:])])
                frontier |= {k for k in neighbours[j].tolist() if not taken[k]}
        groups.append(group)
    return groups


def merged_box(boxes: torch.Tensor, group: list[int]) -> torch.Tensor:
    """The union of a group's boxes (one box: itself)."""
    members = boxes[group]
    return torch.cat([members[:, :2].min(dim=0).values, members[:, 2:].max(dim=0).values])


def merged_rle(crops: list, height: int, width: int) -> dict:
    """COCO RLE (counts as str) in a height x width image of the union of mask crops
    (bool [h, w], x, y), encoded from a band of the crops' columns: memory height x band width."""
    crops = [c for c in crops if c is not None and c[0].size]
    if not crops:
        return _compressed([height * width], height, width)
    x0 = min(x for _, x, _ in crops)
    x1 = max(x + m.shape[1] for m, x, _ in crops)
    band = np.zeros((height, x1 - x0), np.uint8)
    for mask, x, y in crops:
        band[y:y + mask.shape[0], x - x0:x - x0 + mask.shape[1]] |= mask.astype(np.uint8)
    flat = band.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:  # counts start with a run of zeros
        runs = [0] + runs
    runs[0] += x0 * height
    after = (width - x1) * height
    if len(runs) % 2:  # ends on zeros
        runs[-1] += after
    elif after:
        runs.append(after)
    return _compressed(runs, height, width)


def _compressed(runs: list[int], height: int, width: int) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def sliced_eval(cfg, model: nn.Module, loader):
    """With data.tiling on: the model wrapped for sliced inference and the evaluation loader
    reading the same images at full resolution (ToUint8Tensor); else both unchanged."""
    if cfg.data.tiling is None:
        return model, loader
    import copy

    from torch.utils.data import DataLoader, Subset

    subset = loader.dataset
    full = copy.copy(subset.dataset if isinstance(subset, Subset) else subset)
    full.transforms = ToUint8Tensor()
    target = Subset(full, subset.indices) if isinstance(subset, Subset) else full
    return SlicedModel.from_config(model, cfg), DataLoader(
        target, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn)
