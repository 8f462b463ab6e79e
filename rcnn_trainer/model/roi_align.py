"""RoIAlign as one sparse matrix product: fast on CPU, same numbers as torchvision's op.

torchvision's CPU `roi_align` runs one scalar thread and its backward was the largest single
cost of a training step here (4 x 512 RoIs on a 256x80x80 map: 2.9 s forward+backward at two
threads). Every output value of RoIAlign is a fixed weighted sum of input pixels: the mean of
`grid_h x grid_w` bilinear samples, each a mix of 4 pixels. So the whole op is `S @ F`, with
F the feature maps as rows of channels and S a sparse matrix built from the boxes alone, and
the gradient is `S^T @ dOut`. MKL runs both products on all threads (0.32 s for the example).

The sample positions and the bilinear rules (the -1 / size margins, clamping at the border,
`aligned`, adaptive `sampling_ratio=0`) follow torchvision's CPU kernel; tests compare values
and gradients with `torchvision.ops.roi_align`. The products run in float32 whatever the
feature dtype (sampling coordinates and sums are where precision matters).

`SparseMultiScaleRoIAlign` keeps torchvision's MultiScaleRoIAlign (its FPN level assignment
and scales) and pools every level in a single product. It falls back to torchvision's kernel
on CUDA, which has a fast native one, and without gradients on CPU, where it runs that kernel
on chunks of the RoIs in parallel threads (`threaded_pool`).
"""

from __future__ import annotations

import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align
from torchvision.ops.poolers import LevelMapper


class _SparsePool(torch.autograd.Function):
    """out = S @ flat; the transpose for the backward is built only when a gradient is needed."""

    @staticmethod
    def forward(ctx, flat: Tensor, crow: Tensor, cols: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(crow, cols, weights)
        ctx.shape = (crow.numel() - 1, flat.shape[0])
        matrix = _csr(crow, cols, weights, ctx.shape)
        with torch.autocast(flat.device.type, enabled=False):  # MKL's sparse product is fp32 only
            return matrix @ flat

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        crow, cols, weights = ctx.saved_tensors
        num_rows, num_cols = ctx.shape
        rows = torch.repeat_interleave(torch.arange(num_rows, device=crow.device), crow.diff())
        order = torch.argsort(cols, stable=True)  # CSR of S^T: entries grouped by input pixel
        crow_t = torch.zeros(num_cols + 1, dtype=torch.long, device=cols.device)
        crow_t[1:] = torch.cumsum(torch.bincount(cols, minlength=num_cols), 0)
        transposed = _csr(crow_t, rows[order], weights[order], (num_cols, num_rows))
        with torch.autocast(grad_out.device.type, enabled=False):
            return transposed @ grad_out.float().contiguous(), None, None, None


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def sampling_matrix(rois: Tensor, level_of_roi: Tensor, level_shapes: list[tuple[int, int, int]],
                    level_offsets: list[int], scales: list[float], output_size: tuple[int, int],
                    sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """CSR pieces (crow, cols, weights) of the matrix mapping stacked feature
    rows (every level's N*H*W pixels, level after level) to the K*ph*pw output bins."""
    device = rois.device
    ph, pw = output_size
    num_rois = rois.shape[0]
    scale = torch.tensor(scales, dtype=torch.float32, device=device)[level_of_roi]
    heights = torch.tensor([s[1] for s in level_shapes], device=device)[level_of_roi]
    widths = torch.tensor([s[2] for s in level_shapes], device=device)[level_of_roi]
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].float() * scale[:, None] - offset
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:  # torchvision forces malformed RoIs to 1x1 in legacy mode
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long, device=device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / pw).long().clamp(min=0)
    per_bin = grid_h * grid_w
    # one entry per sample point, RoI-major then bin-major: rows of S come out sorted
    points_per_roi = per_bin * (ph * pw)
    roi_of_point = torch.repeat_interleave(torch.arange(num_rois, device=device), points_per_roi)
    start = torch.cumsum(points_per_roi, 0) - points_per_roi
    local = torch.arange(roi_of_point.numel(), device=device) - start[roi_of_point]
    n = per_bin[roi_of_point]
    gw = grid_w[roi_of_point]
    bin_index, sub = local // n.clamp(min=1), local % n.clamp(min=1)
    py, px = bin_index // pw, bin_index % pw
    iy, ix = sub // gw.clamp(min=1), sub % gw.clamp(min=1)
    y = boxes[roi_of_point, 1] + py * bin_h[roi_of_point] + (iy + 0.5) * bin_h[roi_of_point] / grid_h[roi_of_point]
    x = boxes[roi_of_point, 0] + px * bin_w[roi_of_point] + (ix + 0.5) * bin_w[roi_of_point] / gw
    height, width = heights[roi_of_point], widths[roi_of_point]
    y_low, y_high, wy_low, wy_high, y_in = _axis_corners(y, height)
    x_low, x_high, wx_low, wx_high, x_in = _axis_corners(x, width)
    weight = (y_in & x_in).float() / n.float()
    image_base = torch.tensor(level_offsets, device=device)[level_of_roi[roi_of_point]] \
        + rois[roi_of_point, 0].long() * height * width
    cols = torch.stack([image_base + y_low * width + x_low, image_base + y_low * width + x_high,
                        image_base + y_high * width + x_low, image_base + y_high * width + x_high], 1)
    weights = torch.stack([wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high], 1) \
        * weight[:, None]
    counts = torch.repeat_interleave(per_bin * 4, ph * pw)  # entries per output row
    crow = torch.zeros(num_rois * ph * pw + 1, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, cols.reshape(-1), weights.reshape(-1)


def _axis_corners(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear_interpolate along one axis, for points on maps of different sizes:
    low/high pixel, their weights, and whether the point is in range (else it counts as 0)."""
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = torch.minimum(coord.floor().long(), size - 1)
    at_edge = low >= size - 1
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    return low, high, 1 - frac, frac, inside


def pool_levels(features: list[Tensor], rois: Tensor, level_of_roi: Tensor, scales: list[float],
                output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign of each RoI (K x [batch index, x1, y1, x2, y2]) on its level: K x C x ph x pw."""
    channels = features[0].shape[1]
    ph, pw = output_size
    if rois.shape[0] == 0:
        return features[0].new_zeros((0, channels, ph, pw))
    shapes = [tuple(f.shape[:1]) + tuple(f.shape[-2:]) for f in features]
    sizes = [n * h * w for n, h, w in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # pixels as rows of channels (free for channels_last maps), every level stacked
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]).float()
    crow, cols, weights = sampling_matrix(rois, level_of_roi, shapes, offsets, scales, output_size,
                                          sampling_ratio, aligned)
    pooled = _SparsePool.apply(flat, crow, cols, weights)
    return pooled.view(-1, ph, pw, channels).permute(0, 3, 1, 2)


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Drop-in for torchvision.ops.roi_align with K x 5 rois (sampling_ratio <= 0 = adaptive)."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    level = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    return pool_levels([features], rois, level, [spatial_scale], tuple(output_size), max(sampling_ratio, 0),
                       aligned)


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping and scales) pooled by `pool_levels`
    on CPU in training; torchvision's own kernel on other devices, and on CPU without gradients
    in parallel chunks (its forward alone was 1.6-1.9x faster than the sparse product for 800
    boxes at 7 x 7 and 14 x 14 here: the sparse product pays for building its matrix, which the
    backward reuses)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if features[0].device.type != "cpu":
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = level_scales(features, image_shapes, self.canonical_scale,
                                                        self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            level = torch.zeros(len(rois), dtype=torch.long, device=rois.device)
        else:
            level = self.map_levels(boxes).long()
        if not (torch.is_grad_enabled() and features[0].requires_grad):
            return threaded_pool(features, rois, level, self.scales, self.output_size, self.sampling_ratio)
        pooled = pool_levels(features, rois, level, self.scales, self.output_size, self.sampling_ratio)
        return pooled.to(features[0].dtype)


# Fewer RoIs per thread cost more to hand over than they save (64 x 7 x 7 pooled from a 128 px
# image's FPN, 2 threads: 100 RoIs 3.2 -> 2.1 ms in two chunks, 50 RoIs 1.7 ms either way).
MIN_ROIS_PER_THREAD = 32


def threaded_pool(features: list[Tensor], rois: Tensor, level_of_roi: Tensor, scales: list[float],
                  output_size: tuple[int, int], sampling_ratio: int) -> Tensor:
    """torchvision's RoIAlign without gradients, each level's RoIs split over
    `torch.get_num_threads()` Python threads. Its CPU kernel runs one thread per call and
    releases the GIL, so chunks pool in parallel; each RoI is pooled alone, so the numbers
    are the kernel's own. Why: at inference with torchvision's 1000 proposals per image the
    single-threaded kernel was half of the RoI heads' time (25 ms of 56 per 128 px image).
    Pools in float32 like torchvision's autocast rule, returns the features' dtype."""
    dtype = features[0].dtype
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
    threads = torch.get_num_threads()
    jobs = []
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.where(level_of_roi == level)[0]
        if index.numel():
            feature = feature.float()
            pieces = max(1, min(threads, index.numel() // MIN_ROIS_PER_THREAD))
            jobs += [(feature, chunk, scale) for chunk in index.chunk(pieces)]

    def pool(job):
        feature, index, scale = job
        with torch.no_grad():  # grad mode is per thread; nothing here needs a gradient
            return index, torchvision_roi_align(feature, rois[index].float(), output_size, scale, sampling_ratio)

    results = map(pool, jobs) if threads < 2 or len(jobs) < 2 else _executor(threads).map(pool, jobs)
    for index, pooled in results:
        out[index] = pooled.to(dtype)
    return out


@functools.cache
def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process."""
    return ThreadPoolExecutor(threads, thread_name_prefix="roi_align")


def level_scales(features: list[Tensor], image_shapes: list[tuple[int, int]], canonical_scale: int,
                 canonical_level: int) -> tuple[list[float], LevelMapper]:
    """What MultiScaleRoIAlign infers on its first call, through public names only: each level's
    scale is the power of two nearest to (map height / largest image height), and the FPN level
    of a box follows from the first and last level (torchvision's LevelMapper)."""
    if not image_shapes:
        raise ValueError("image_shapes is empty: nothing to infer the feature scales from")
    max_height = max(shape[0] for shape in image_shapes)
    scales = [2.0 ** round(math.log2(f.shape[-2] / max_height)) for f in features]
    first, last = -math.log2(scales[0]), -math.log2(scales[-1])
    return scales, LevelMapper(int(first), int(last), canonical_scale, canonical_level)


def multi_scale_roi_align(implementation: str, feature_names: list[str], output_size: int,
                          sampling_ratio: int) -> MultiScaleRoIAlign:
    """`model.roi.roi_align`: auto = the sparse product on CPU (torchvision's kernel on GPU),
    torchvision = torchvision's kernel everywhere."""
    cls = MultiScaleRoIAlign if implementation == "torchvision" else SparseMultiScaleRoIAlign
    return cls(feature_names, output_size=output_size, sampling_ratio=sampling_ratio)

