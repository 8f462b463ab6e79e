"""Inference: COCO evaluation, prediction, test-time augmentation and export."""
