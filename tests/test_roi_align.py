"""The sparse RoIAlign against torchvision's op: values and gradients, every mode and edge."""

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from rcnn_trainer.model.roi_align import SparseMultiScaleRoIAlign, roi_align


def random_rois(num: int, num_images: int, extent: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes of every kind: inside, across and beyond the borders, tiny, degenerate, reversed."""
    xy = torch.rand(num, 2, generator=generator) * extent * 1.4 - 0.2 * extent
    wh = torch.rand(num, 2, generator=generator) * extent * 0.6
    wh[: num // 8] = torch.rand(num // 8, 2, generator=generator) * 0.5  # sub-pixel boxes
    wh[num // 8: num // 6] = 0.0  # degenerate
    wh[num // 6: num // 5] *= -0.3  # x2 < x1
    image = torch.randint(0, num_images, (num, 1), generator=generator).float()
    return torch.cat([image, xy, xy + wh], 1)


def compare(features, rois, output_size, scale, sampling_ratio, aligned):
    a = features.clone().requires_grad_()
    b = features.clone().requires_grad_()
    expected = torchvision_roi_align(a, rois, output_size, scale, sampling_ratio, aligned)
    actual = roi_align(b, rois, output_size, scale, sampling_ratio, aligned)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 3, 0, -1])
def test_values_and_gradients_match_torchvision(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(7 + sampling_ratio)
    features = torch.randn(3, 5, 17, 23, generator=g)
    rois = random_rois(120, 3, extent=96.0, generator=g)
    compare(features, rois, (7, 7), 0.25, sampling_ratio, aligned)


@pytest.mark.parametrize("output_size", [(1, 1), (3, 5), (14, 14)])
def test_output_sizes_and_tiny_maps(output_size):
    g = torch.Generator().manual_seed(3)
    for height, width in [(1, 1), (1, 6), (2, 2), (9, 4)]:
        features = torch.randn(2, 4, height, width, generator=g)
        rois = random_rois(40, 2, extent=8.0 * max(height, width), generator=g)
        compare(features, rois, output_size, 0.125, 2, False)
        compare(features, rois, output_size, 0.125, 0, True)


def test_no_rois_and_channels_last():
    features = torch.randn(2, 8, 10, 10)
    empty = roi_align(features, torch.zeros(0, 5), 7, 0.5, 2)
    assert empty.shape == (0, 8, 7, 7)
    rois = random_rois(30, 2, extent=20.0, generator=torch.Generator().manual_seed(1))
    compare(features.contiguous(memory_format=torch.channels_last), rois, (7, 7), 0.5, 2, False)


def test_multiscale_pooler_matches_torchvision_level_assignment():
    g = torch.Generator().manual_seed(11)
    names = ["0", "1", "2", "3"]
    features = OrderedDict((name, torch.randn(2, 6, 256 // 2 ** i, 192 // 2 ** i, generator=g))
                           for i, name in enumerate(names))
    features["pool"] = torch.randn(2, 6, 16, 12, generator=g)  # not pooled from, as in torchvision
    boxes = []
    for _ in range(2):  # sizes from 2 to ~900 px so every level gets RoIs
        xy = torch.rand(80, 2, generator=g) * 600
        wh = torch.exp(torch.rand(80, 1, generator=g) * 6.8) * (0.5 + torch.rand(80, 2, generator=g)) + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
    image_shapes = [(1024, 768), (1000, 760)]
    reference = MultiScaleRoIAlign(names, 7, 2)
    sparse = SparseMultiScaleRoIAlign(names, 7, 2)
    leaves_a = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
    leaves_b = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
    expected = reference(leaves_a, boxes, image_shapes)
    actual = sparse(leaves_b, boxes, image_shapes)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    for name in names:
        torch.testing.assert_close(leaves_b[name].grad, leaves_a[name].grad, rtol=1e-4, atol=1e-4)
    assert len(set(reference.map_levels(boxes).tolist())) == 4  # the test reached every level
    assert sparse.scales == reference.scales  # inferred through public names only


def test_scales_of_padded_odd_sized_maps_match_torchvision():
    """Maps of a 1333 x 800 batch padded to 32: 25 x 42 at stride 32 is not an exact ratio."""
    names = ["0", "1", "2", "3"]
    # requires_grad: the sparse path (without gradients the module uses torchvision's kernel)
    features = OrderedDict((n, torch.zeros(1, 2, 800 // 2 ** (i + 2), -(-1344 // 2 ** (i + 2)), requires_grad=True))
                           for i, n in enumerate(names))
    boxes = [torch.tensor([[10.0, 10.0, 300.0, 200.0]])]
    reference, sparse = MultiScaleRoIAlign(names, 7, 2), SparseMultiScaleRoIAlign(names, 7, 2)
    torch.testing.assert_close(sparse(features, boxes, [(800, 1333)]), reference(features, boxes, [(800, 1333)]))
    assert sparse.scales == reference.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_without_gradients_the_pooler_gives_the_same_numbers():
    names = ["0", "1"]
    g = torch.Generator().manual_seed(3)
    features = OrderedDict((n, torch.randn(2, 3, 32 // 2 ** i, 32 // 2 ** i, generator=g)) for i, n in enumerate(names))
    boxes = [random_rois(6, 1, extent=120.0, generator=g)[:, 1:] for _ in range(2)]
    sparse = SparseMultiScaleRoIAlign(names, 7, 2)
    with torch.no_grad():
        fast = sparse(features, boxes, [(128, 128)] * 2)
    trained = sparse(OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items()), boxes, [(128, 128)] * 2)
    torch.testing.assert_close(fast, trained.detach(), rtol=1e-4, atol=1e-5)


def test_bfloat16_features_pool_in_float32():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 4, 12, 12, generator=g)
    rois = random_rois(20, 1, extent=40.0, generator=g)
    pooled = roi_align(features.bfloat16(), rois, 7, 0.25, 2)
    expected = torchvision_roi_align(features.bfloat16().float(), rois, 7, 0.25, 2)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_inference_pooling_equals_torchvisions_pooler(dtype):
    """Without gradients the RoIs are pooled in parallel chunks by torchvision's kernel: the
    same numbers as its MultiScaleRoIAlign, every level, in the RoIs' order."""
    g = torch.Generator().manual_seed(7)
    names = ["0", "1", "2", "3"]
    features = OrderedDict((n, torch.randn(2, 5, 128 // 2 ** i, 96 // 2 ** i, generator=g).to(dtype))
                           for i, n in enumerate(names))
    boxes = []
    for _ in range(2):  # enough RoIs for several chunks on every level
        xy = torch.rand(400, 2, generator=g) * 300
        wh = torch.exp(torch.rand(400, 1, generator=g) * 6.0) * (0.5 + torch.rand(400, 2, generator=g)) + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
    image_shapes = [(512, 384), (500, 380)]
    reference = MultiScaleRoIAlign(names, 7, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            actual = SparseMultiScaleRoIAlign(names, 7, 2)(features, boxes, image_shapes)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        expected = reference(features, boxes, image_shapes)  # autocast: torchvision's fp32 rule
    assert actual.dtype == dtype
    assert len(set(reference.map_levels(boxes).tolist())) == 4
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
