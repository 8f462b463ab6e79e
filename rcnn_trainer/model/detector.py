"""TwoStageDetector: normalize + pad -> backbone/FPN -> RPN -> RoI heads.

Images arrive already resized by the data pipeline (data/transforms.py), as float [3, H, W]
in [0, 1]. Training returns (losses, stats) with unweighted loss terms; weights are applied
by the trainer (losses/weighting.py). Inference returns one dict per image with "boxes"
(xyxy), "labels" (1..C) and "scores", mapped to `original_sizes` when those are given; with
a mask head also "masks": probabilities [D, 1, H, W] pasted into the (original) image.
Submodule names match torchvision's FasterRCNN (backbone, rpn, roi_heads), so its state dict loads.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, paste_masks_in_image, resize_boxes

from rcnn_trainer.model import stats as S

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TwoStageDetector(nn.Module):
    def __init__(self, *, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                 image_mean: list[float] = IMAGENET_MEAN, image_std: list[float] = IMAGENET_STD,
                 size_divisible: int = 32):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        # Used only for its normalize() and batch_images() (padding to a multiple of 32);
        # resizing happened in the data pipeline. It holds no parameters.
        self.transform = GeneralizedRCNNTransform(min_size=1, max_size=1, image_mean=image_mean,
                                                  image_std=image_std, size_divisible=size_divisible)
        self.channels_last = False

    def use_channels_last(self) -> "TwoStageDetector":
        """NHWC images, activations and conv weights: oneDNN's fast layout for CPU convolutions
        (with bf16 autocast on AMX). Same numbers, different memory order."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def preprocess(self, images: list[torch.Tensor]) -> ImageList:
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batched = self.transform.batch_images([self.transform.normalize(img) for img in images],
                                              size_divisible=self.transform.size_divisible)
        if self.channels_last:
            batched = batched.contiguous(memory_format=torch.channels_last)
        return ImageList(batched, sizes)

    @torch.no_grad()
    def classify_boxes(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """Class probabilities [sum of B_i, C+1] (column 0 = background) of the box head on the
        given boxes (image coordinates), e.g. the ground truth: what the classifier says about
        perfectly placed RoIs, independent of the RPN. As the loss trains them: with the logit
        adjustment's offsets (`model.roi.cls_loss.logit_adjust`), which inference leaves out."""
        image_list = self.preprocess(images)
        features = self.backbone(image_list.tensors)
        heads = self.roi_heads
        pooled = heads.box_roi_pool(features, [b.to(image_list.tensors.dtype) for b in boxes], image_list.image_sizes)
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
        return torch.softmax(class_logits.float() + heads.class_logit_offsets, dim=-1)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                original_sizes: list[tuple[int, int]] | None = None, masks: bool = True):
        """`masks=False` skips the mask branch at inference (the monitor's probe counts boxes only)."""
        image_list = self.preprocess(images)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses, rpn_stats = self.rpn(image_list, features, targets)
        detections, roi_losses, roi_stats = self.roi_heads(features, proposals, image_list.image_sizes, targets,
                                                           masks=masks)
        if self.training:
            stats = {**rpn_stats, **roi_stats,
                     S.GT_PER_IMAGE: sum(len(t["boxes"]) for t in targets) / len(targets), S.IMAGES: len(targets)}
            return {**rpn_losses, **roi_losses}, stats
        sizes = original_sizes if original_sizes is not None else image_list.image_sizes
        for det, size, orig in zip(detections, image_list.image_sizes, sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, orig)
            if "masks" in det:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], orig)
        return detections
