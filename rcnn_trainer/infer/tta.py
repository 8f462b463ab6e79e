"""Test-time augmentation (`--tta` of rcnn-eval and rcnn-predict): the model run on each image
at several short sides and mirrored, the detections (in original image coordinates) pooled and
merged per class by NMS, as detectron2's and MMDetection's TTA do.

The images arrive resized to data.min_size (the evaluation size); each extra size is an
interpolation of that tensor, so no loader changes. Masks, when the model has them, come with
their detection from the pass that kept it (mirrored back for a flipped pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from rcnn_trainer.config import Config


class TTAModel(nn.Module):
    def __init__(self, model: nn.Module, scales: list[float], flip: bool, nms_thresh: float, max_detections: int):
        super().__init__()
        self.model, self.scales, self.flip = model, scales, flip
        self.nms_thresh, self.max_detections = nms_thresh, max_detections

    @staticmethod
    def from_config(model: nn.Module, cfg: Config) -> "TTAModel":
        tta, test_size = cfg.tta, cfg.data.test_min_size
        sizes = sorted(set(tta.min_sizes) | {test_size})
        flip = cfg.data.hflip_prob > 0 if tta.flip == "auto" else tta.flip
        return TTAModel(model, [s / test_size for s in sizes], flip,
                                 tta.nms_thresh if tta.nms_thresh is not None else cfg.model.roi.nms_thresh,
                                 cfg.model.roi.detections_per_img)

    def passes(self) -> list[tuple[float, bool]]:
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]

    def describe(self) -> str:
        return (f"{len(self.passes())} passes (scales {', '.join(f'{s:.2f}' for s in self.scales)} of the "
                f"evaluation size{', each also mirrored' if self.flip else ''}), merged per class by NMS at "
                f"IoU {self.nms_thresh:g}")

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], original_sizes: list[tuple[int, int]], masks: bool = True):
        pooled: list[list[dict]] = [[] for _ in images]
        for scale, flipped in self.passes():
            batch = [augment(img, scale, flipped) for img in images]
            for found, det, size in zip(pooled, self.model(batch, original_sizes=original_sizes, masks=masks),
                                        original_sizes):
                found.append(unflip(det, size[1]) if flipped else det)
        return [self.merge(found) for found in pooled]

    def merge(self, found: list[dict]) -> dict:
        merged = {key: torch.cat([det[key] for det in found]) for key in found[0]}
        keep = batched_nms(merged["boxes"].float(), merged["scores"].float(), merged["labels"], self.nms_thresh)
        keep = keep[:self.max_detections]  # batched_nms returns them by decreasing score
        return {key: value[keep] for key, value in merged.items()}


def augment(image: torch.Tensor, scale: float, flipped: bool) -> torch.Tensor:
    if scale != 1.0:
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False,
                              antialias=scale < 1.0, recompute_scale_factor=False)[0]
    return image.flip(-1) if flipped else image


def unflip(det: dict, width: int) -> dict:
    """Detections of a mirrored image, mirrored back (boxes xyxy in original pixels)."""
    boxes = det["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - det["boxes"][:, 2], width - det["boxes"][:, 0]
    out = dict(det, boxes=boxes)
    if "masks" in det:
        out["masks"] = det["masks"].flip(-1)
    return out
