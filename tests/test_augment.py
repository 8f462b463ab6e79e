"""data.augment: boxes and masks follow each geometric transform exactly, photometric jitter
leaves targets alone, and every draw is a function of (seed, epoch, index, copy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ann, image, write_coco
from rcnn_trainer.config_data import AugmentConfig, ColorJitterConfig
from rcnn_trainer.data.augment import ColorJitter, RandomRot90, RandomVerticalFlip, ScaleJitter, build_transforms
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.transforms import Compose

W, H = 60, 40  # not square: a rotation by 90 swaps the sides
BOXES = [[5, 4, 21, 14], [30, 20, 56, 37]]  # xyxy
COLOURS = [(255, 0, 0), (0, 0, 255)]


def painted() -> tuple[Image.Image, dict]:
    """A grey image with each object a solid rectangle of its own colour, and its exact mask."""
    pixels = np.full((H, W, 3), 128, np.uint8)
    masks = torch.zeros((len(BOXES), H, W), dtype=torch.uint8)
    for k, ((x0, y0, x1, y1), colour) in enumerate(zip(BOXES, COLOURS)):
        pixels[y0:y1, x0:x1] = colour
        masks[k, y0:y1, x0:x1] = 1
    return Image.fromarray(pixels), {"boxes": torch.tensor(BOXES, dtype=torch.float32),
                                     "labels": torch.tensor([1, 2]), "masks": masks}


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def assert_follows(img: Image.Image, target: dict) -> None:
    """Each mask's tight box is its box, and the image under each mask is that object's colour."""
    pixels = np.asarray(img)
    assert target["masks"].shape[-2:] == (img.size[1], img.size[0])
    for mask, box, colour in zip(target["masks"], target["boxes"].tolist(), COLOURS):
        assert tight_box(mask) == box
        assert (pixels[mask.numpy().astype(bool)] == colour).all()


def test_vertical_flip_moves_boxes_and_masks_with_the_pixels():
    img, target = painted()
    out, moved = RandomVerticalFlip(1.0)(img, target, np.random.default_rng(0))
    assert moved["boxes"].tolist() == [[5, H - 14, 21, H - 4], [30, H - 37, 56, H - 20]]
    assert_follows(out, moved)
    assert RandomVerticalFlip(0.0)(img, target, np.random.default_rng(0))[1] is target


@pytest.mark.parametrize("seed", range(6))
def test_rot90_on_a_non_square_image_keeps_boxes_and_masks_exact(seed):
    img, target = painted()
    out, moved = RandomRot90(1.0)(img, target, np.random.default_rng(seed))
    assert out.size in ((H, W), (W, H))  # 90 / 270 swap the sides, 180 keeps them
    assert_follows(out, moved)
    assert RandomRot90(0.0)(img, target, np.random.default_rng(seed))[1] is target


def test_rot90_draws_each_quarter_turn():
    img, target = painted()
    seen = set()
    for seed in range(20):
        out, moved = RandomRot90(1.0)(img, target, np.random.default_rng(seed))
        seen.add((out.size, tuple(moved["boxes"][0].tolist())))
    # counter-clockwise 90: (x, y) -> (y, W - x); 270: (x, y) -> (H - y, x)
    assert seen == {((H, W), (4.0, W - 21.0, 14.0, W - 5.0)), ((W, H), (W - 21.0, H - 14.0, W - 5.0, H - 4.0)),
                    ((H, W), (H - 14.0, 5.0, H - 4.0, 21.0))}


def test_rot90_of_an_image_without_objects_keeps_empty_masks_at_the_new_size():
    img, _ = painted()
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros((0, H, W), dtype=torch.uint8)}
    for seed in range(6):
        out, moved = RandomRot90(1.0)(img, empty, np.random.default_rng(seed))
        assert moved["boxes"].shape == (0, 4) and moved["masks"].shape == (0, out.size[1], out.size[0])


def test_scale_jitter_scales_boxes_and_masks_with_the_image():
    img, target = painted()
    sizes = set()
    for seed in range(6):
        jitter = ScaleJitter(40, 60, 0.5, 2.0)  # unjittered: the image as it is
        out, moved = jitter(img, target, np.random.default_rng(seed))
        sizes.add(out.size)
        sx, sy = out.size[0] / W, out.size[1] / H
        expected = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in BOXES]
        assert torch.allclose(moved["boxes"], torch.tensor(expected), atol=1e-4)
        assert moved["masks"].shape[-2:] == (out.size[1], out.size[0])
        for mask, box in zip(moved["masks"], expected):  # nearest neighbour: within a pixel
            assert tight_box(mask) == pytest.approx(box, abs=1.0)
        assert jitter.output_size(H, W) == (H, W)  # masks are rasterized at the unjittered size
    assert len(sizes) == 6 and min(s[0] for s in sizes) >= 30 and max(s[0] for s in sizes) <= 120
    assert isinstance(ScaleJitter(40, 60, 0.5, 2.0).at(20), ScaleJitter)  # multi-scale keeps the jitter


def test_color_jitter_changes_pixels_only():
    img, target = painted()
    out, same = ColorJitter(0.4, 0.4, 0.4, 0.1)(img, target, np.random.default_rng(3))
    assert same is target and out.size == img.size
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_augment_off_is_the_plain_pipeline():
    plain = build_transforms(40, 60, 0.5, train=True, augment=AugmentConfig())
    assert [type(t).__name__ for t in plain.transforms] == ["Resize", "RandomHorizontalFlip", "ToTensor"]
    on = build_transforms(40, 60, 0.5, train=True, augment=AugmentConfig(
        vflip_prob=0.5, rot90_prob=0.5, scale_jitter=[0.8, 1.2], color_jitter=ColorJitterConfig(brightness=0.2)))
    assert [type(t).__name__ for t in on.transforms] == ["ScaleJitter", "RandomHorizontalFlip", "RandomVerticalFlip",
                                                         "RandomRot90", "ColorJitter", "ToTensor"]
    assert isinstance(build_transforms(40, 60, 0.5, train=False, augment=on), Compose)
    assert len(build_transforms(40, 60, 0.5, train=False, augment=AugmentConfig(vflip_prob=1.0)).transforms) == 2
    with pytest.raises(ValueError, match="scale_jitter"):
        AugmentConfig(scale_jitter=[1.5, 0.5])


def test_dataset_items_are_a_function_of_seed_epoch_index_copy(tmp_path):
    """Through CocoDetection with masks from the file: every step on, the same (epoch, index,
    copy) gives the same image and target; other epochs and copies draw their own."""
    img, _ = painted()
    segs = [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in BOXES]
    anns = [dict(ann(k + 1, 1, 7, [x0, y0, x1 - x0, y1 - y0]), segmentation=s)
            for k, ((x0, y0, x1, y1), s) in enumerate(zip(BOXES, segs))]
    ann_file = write_coco(tmp_path, [image(1, W, H)], anns)
    img.save(tmp_path / "im1.png")
    augment = AugmentConfig(vflip_prob=0.5, rot90_prob=0.5, color_jitter=ColorJitterConfig(brightness=0.3, hue=0.05),
                            scale_jitter=[0.75, 1.25])
    dataset = CocoDetection(ann_file, tmp_path, masks=True, seed=5,
                            transforms=build_transforms(40, 60, 0.0, train=True, augment=augment))
    first, again = dataset[(0, 3, 1)], dataset[(0, 3, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert torch.equal(first[1]["masks"], again[1]["masks"])
    shapes = {tuple(dataset[(0, epoch, copy)][0].shape) for epoch in range(4) for copy in range(3)}
    assert len(shapes) > 4  # scale and rotation differ between draws
    for epoch in range(4):  # masks rasterized from the polygons follow the boxes
        _, target = dataset[(0, epoch, 0)]
        for mask, box in zip(target["masks"], target["boxes"].tolist()):
            assert tight_box(mask) == pytest.approx(box, abs=1.0)
    other = CocoDetection(ann_file, tmp_path, masks=True, seed=6, transforms=dataset.transforms)
    assert any(not torch.equal(other[(0, e, 0)][0], dataset[(0, e, 0)][0]) for e in range(3))
