"""pooling.py against torchvision.ops (roi_pool, roi_align, MultiScaleRoIAlign, LevelMapper), forward and backward,
plus hand-computed toy cases on a 4 x 4 map."""

import pytest
import torch
import torchvision
from torchvision.ops import poolers as tv_poolers

from frcnn_tutorial.pooling import (
    LevelMapper,
    MultiScaleRoIAlign,
    SingleScaleRoIPool,
    as_roi_tensor,
    bilinear_interpolate,
    infer_scale,
    pool_with,
    roi_align,
    roi_align_cells,
    roi_align_fast,
    roi_align_sampling_points,
    roi_align_transpose_matrix,
    roi_pool,
    roi_pool_bins,
)

# ----------------------------------------------------------------------------------------------------- inputs


def random_rois(num, image_size, num_images, dtype, generator, min_size=0.0, max_size=None):
    """[num, 5] boxes in image pixels: many sticking out of the image, some fully outside, some tiny."""
    height, width = image_size
    max_size = max_size or max(height, width)
    size = min_size + torch.rand(num, 2, generator=generator, dtype=dtype) * (max_size - min_size)
    corner = torch.rand(num, 2, generator=generator, dtype=dtype) * torch.tensor([width * 1.4, height * 1.4],
                                                                                   dtype=dtype)
    corner -= torch.tensor([width * 0.2, height * 0.2], dtype=dtype)
    batch = torch.randint(0, num_images, (num, 1), generator=generator).to(dtype)
    return torch.cat([batch, corner, corner + size], dim=1)


def edge_rois(image_size, scale, dtype):
    """Boxes at the borders, fully outside, smaller than a bin / a cell, zero-sized, covering the whole image."""
    h, w = image_size[0] / scale, image_size[1] / scale  # the map's extent in image pixels
    boxes = [
        (0, 0, w, h), (0, 0, w - 1, h - 1), (w - 3, h - 3, w, h),  # whole map, last cell
        (-5 / scale, -5 / scale, -2 / scale, -2 / scale),  # fully outside, top-left
        (w + 1 / scale, h + 1 / scale, w + 4 / scale, h + 4 / scale),  # fully outside, bottom-right
        (-0.5 / scale, -0.5 / scale, 0.3 / scale, 0.2 / scale),  # straddles the top-left corner, < 1 cell
        (1.2 / scale, 2.3 / scale, 1.4 / scale, 2.35 / scale),  # tiny: a fraction of a cell, much less than a bin
        (2 / scale, 2 / scale, 2 / scale, 2 / scale),  # zero size
        (w - 0.5 / scale, 0, w + 3 / scale, h),  # right border, mostly outside
        (-1.5 / scale, -1.5 / scale, -0.9 / scale, -0.9 / scale),  # samples between -1 and 0: clamped, not dropped
    ]
    rois = torch.tensor(boxes, dtype=dtype)
    return torch.cat([torch.arange(len(rois), dtype=dtype)[:, None] % 2, rois], dim=1)


def run(fn, features, rois, grad_out, *args):
    """Forward and the gradient of <out, grad_out> with respect to the features."""
    features = features.detach().clone().requires_grad_(True)
    out = fn(features, rois, *args)
    (out * grad_out).sum().backward()
    return out, features.grad


def assert_same(ours, theirs, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, **tol)


# ---------------------------------------------------------------------------------------------------- RoIAlign


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4, 1 / 16])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision_forward_and_backward(dtype, spatial_scale, sampling_ratio, aligned):
    g = torch.Generator().manual_seed(int(spatial_scale * 64) + 7 * sampling_ratio + aligned)
    features = torch.randn(3, 4, 9, 13, generator=g, dtype=dtype)
    image_size = (9 / spatial_scale, 13 / spatial_scale)
    rois = torch.cat([random_rois(30, image_size, 3, dtype, g), edge_rois(image_size, spatial_scale, dtype)])
    output_size = (3, 4)
    grad_out = torch.randn(len(rois), 4, *output_size, generator=g, dtype=dtype)
    args = (output_size, spatial_scale, sampling_ratio, aligned)
    ours, our_grad = run(roi_align, features, rois, grad_out, *args)
    theirs, their_grad = run(torchvision.ops.roi_align, features, rois, grad_out, *args)
    assert ours.shape == (len(rois), 4, 3, 4)
    assert_same(ours, theirs, dtype)
    assert_same(our_grad, their_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_fast_is_the_kernel_forward_with_the_same_gradient(dtype, sampling_ratio, aligned):
    g = torch.Generator().manual_seed(11 + 3 * sampling_ratio + aligned)
    features = torch.randn(3, 4, 9, 13, generator=g, dtype=dtype)
    image_size = (9 * 4, 13 * 4)
    rois = torch.cat([random_rois(40, image_size, 3, dtype, g), edge_rois(image_size, 1 / 4, dtype)])
    grad_out = torch.randn(len(rois), 4, 3, 4, generator=g, dtype=dtype)
    args = ((3, 4), 1 / 4, sampling_ratio, aligned)
    ours, our_grad = run(roi_align_fast, features, rois, grad_out, *args)
    theirs, their_grad = run(torchvision.ops.roi_align, features, rois, grad_out, *args)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same kernel
    assert_same(our_grad, their_grad, dtype)  # a different order of the same sums


def test_roi_align_fast_empty_rois_and_frozen_features():
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = roi_align_fast(features, torch.zeros(0, 5), 2, 1.0, 2)
    out.sum().backward()
    assert out.shape == (0, 3, 2, 2) and features.grad.abs().sum() == 0
    frozen = roi_align_fast(features.detach(), torch.tensor([[0, 0, 0, 4.0, 4.0]]), 2, 1.0, 2)
    assert not frozen.requires_grad


def test_roi_align_cells_golden_one_sample_one_bin():
    # one 2 x 2 box at (0.5, 0.5) on a 4 x 4 map, 1 bin, 1 sample: the centre (1.5, 1.5), a quarter on each of
    # the cells (1, 1), (1, 2), (2, 1), (2, 2); the matrix A^T has those 4 weights in column 0
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64)
    cells, weights = roi_align_cells(rois, (1, 1, 4, 4), 1, 1.0, 1, False)
    assert cells.shape == weights.shape == (1, 1, 1, 4)
    assert sorted(cells.flatten().tolist()) == [5, 6, 9, 10] and weights.flatten().tolist() == [0.25] * 4
    dense = roi_align_transpose_matrix(rois, (1, 1, 4, 4), 1, 1.0, 1, False).to_dense()
    expected = torch.zeros(16, 1, dtype=torch.float64)
    expected[[5, 6, 9, 10]] = 0.25
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    features = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    assert (dense.T @ features.reshape(16, 1)).item() == roi_align(features, rois, 1, 1.0, 1, False).item() == 7.5


def test_boxes_stay_fp32_under_bf16_autocast():
    features = torch.randn(1, 2, 8, 8)
    box = torch.tensor([[0, 301.0, 3.0, 313.0, 9.0]])
    seen = []  # a stand-in kernel records the (box, feature) dtypes that reach it

    def kernel(feature, rois):
        seen.append((rois.dtype, feature.dtype))
        return feature

    pool_with(kernel, features.bfloat16(), box)
    pool_with(kernel, features.double(), box)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pool_with(kernel, features.bfloat16(), box).dtype == torch.bfloat16  # the output: features' dtype
        pooled = MultiScaleRoIAlign(["0"], 2, 2)({"0": features.bfloat16()}, [box[:, 1:] / 40], [(64, 64)])
    assert seen == [(torch.bfloat16, torch.bfloat16),  # outside autocast: the features' dtype
                    (torch.float64, torch.float64),
                    (torch.float32, torch.float32)]  # under it fp32 (301 would round to 300 in bf16)
    expected = torchvision.ops.roi_align(features.bfloat16().float(), box / torch.tensor([1, 40, 40, 40, 40]), 2,
                                         1 / 8, 2)
    torch.testing.assert_close(pooled.float(), expected, rtol=1e-2, atol=1e-2)


def test_roi_align_takes_a_list_of_boxes_per_image_and_int_output_size():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 3, 10, 10, generator=g, dtype=torch.float64)
    boxes = [random_rois(n, (40, 40), 1, torch.float64, g)[:, 1:] for n in (5, 0, 4)]  # the 2nd image has none
    ours = roi_align(features, boxes, 2, 0.25, 2, True)
    theirs = torchvision.ops.roi_align(features, boxes, 2, 0.25, 2, True)
    assert ours.shape == (9, 3, 2, 2)
    assert_same(ours, theirs, torch.float64)
    rois = as_roi_tensor(boxes)
    assert rois[:, 0].tolist() == [0] * 5 + [2] * 4
    assert_same(ours, roi_align(features, rois, (2, 2), 0.25, 2, True), torch.float64)


def test_roi_align_inverted_boxes_match_torchvision():
    # x2 < x1: aligned=False stretches the box to 1 x 1; aligned=True with a fixed grid walks backwards.
    # (torchvision cannot run aligned=True, adaptive sampling on such boxes, so neither is tested there.)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 6.0, 5.0, 2.0, 1.0], [0, 3.0, 3.0, 2.5, 7.0]], dtype=torch.float64)
    for aligned, sampling_ratio in [(False, -1), (False, 2), (True, 2)]:
        grad_out = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
        args = (3, 1.0, sampling_ratio, aligned)
        ours, our_grad = run(roi_align, features, rois, grad_out, *args)
        theirs, their_grad = run(torchvision.ops.roi_align, features, rois, grad_out, *args)
        assert_same(ours, theirs, torch.float64)
        assert_same(our_grad, their_grad, torch.float64)


@pytest.mark.parametrize("fn", [roi_align, roi_pool])
@pytest.mark.parametrize("rois", [torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]], ids=["tensor", "list"])
def test_empty_rois_give_an_empty_output_and_a_zero_gradient(fn, rois):
    features = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = fn(features, rois, (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_rois_must_have_torchvision_shapes():
    features = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="Tensor\\[K, 5\\]"):
        roi_align(features, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="Tensor\\[R, 4\\]"):
        roi_pool(features, [torch.zeros(3, 5)], 2)


# The toy map of the golden cases: F[i, j] = 4 i + j, i.e.
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
#   12 13 14 15
TOY = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)


def test_roi_align_golden_toy_cases():
    # F = 4y + x is linear, and bilinear interpolation of a linear function is exact, so a bin's value is
    # 4 * (mean sample y) + (mean sample x). Box (0.5, 0.5)-(2.5, 2.5), one 2 x 2 bin, 2 x 2 samples: the samples
    # sit at the centres of the four 1 x 1 sub-bins, y, x in {1.0, 2.0}: values 5, 6, 9, 10 -> mean 7.5.
    out = roi_align(TOY, torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], dtype=torch.float64), 1, 1.0, 2, False)
    assert out.item() == 7.5
    # A one-hot map (1 at row 1, col 1). Box (1, 1)-(2, 1.5), one bin, one sample, aligned=False: the box is 0.5 high,
    # stretched to 1 (legacy rule), so the sample is at the centre (y, x) = (1.5, 1.5): weight (1 - .5)(1 - .5) = 0.25.
    one_hot = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    one_hot[0, 0, 1, 1] = 1
    box = torch.tensor([[0, 1.0, 1.0, 2.0, 1.5]], dtype=torch.float64)
    assert roi_align(one_hot, box, 1, 1.0, 1, False).item() == 0.25
    # aligned=True: shift by -0.5 -> y in [0.5, 1.0] (not stretched), x in [0.5, 1.5]; the sample is at (0.75, 1.0):
    # rows 0 and 1 get weights 0.25 and 0.75, column 1 gets 1 -> 0.75.
    assert roi_align(one_hot, box, 1, 1.0, 1, True).item() == 0.75
    # Borders, all-ones map: a sample at (-0.5, -0.5) is within one cell of the map, clamped onto F[0, 0] -> 1;
    # a sample at (-1.5, -1.5) is further out and reads 0. A sample at y = x = 4.0 (= H, the far edge) still counts.
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    boxes = torch.tensor([[0, -1.0, -1.0, 0.0, 0.0], [0, -2.0, -2.0, -1.0, -1.0], [0, 3.5, 3.5, 4.5, 4.5]],
                         dtype=torch.float64)
    assert roi_align(ones, boxes, 1, 1.0, 1, False).flatten().tolist() == [1.0, 0.0, 1.0]
    assert torchvision.ops.roi_align(ones, boxes, 1, 1.0, 1, False).flatten().tolist() == [1.0, 0.0, 1.0]


def test_roi_align_adaptive_grid_and_empty_grid():
    # Adaptive sampling: ceil(roi size / bins) samples per bin. Box 0..3 (3 cells) in 2 bins -> ceil(1.5) = 2 per axis.
    points = roi_align_sampling_points(torch.tensor([0.0, 0.0, 3.0, 3.0]), 2, 1.0, -1, False)
    assert points.shape == (2, 2, 4, 2)
    # bin 0 spans [0, 1.5): its two sub-bins have centres 0.375 and 1.125
    assert points[0, 0, :, 0].tolist() == [0.375, 0.375, 1.125, 1.125]
    assert points[0, 0, :, 1].tolist() == [0.375, 1.125, 0.375, 1.125]
    # aligned=True and a zero-size box: ceil(0 / 2) = 0 samples; the output is 0 (count is max(0, 1) = 1)
    assert roi_align_sampling_points(torch.tensor([2.0, 2.0, 2.0, 2.0]), 2, 1.0, -1, True).shape == (2, 2, 0, 2)
    box = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert roi_align(TOY, box, 2, 1.0, -1, True).abs().sum().item() == 0.0


@pytest.mark.parametrize("sampling_ratio, aligned, scale", [(-1, False, 1.0), (2, True, 0.25), (-1, True, 0.5),
                                                             (1, False, 1 / 16)])
def test_sampling_points_averaged_reproduce_roi_align(sampling_ratio, aligned, scale):
    # The drawing helper is the definition: average bilinear samples at its points, bin by bin.
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 3, 7, 9, generator=g, dtype=torch.float64)
    rois = torch.cat([random_rois(6, (7 / scale, 9 / scale), 1, torch.float64, g),
                      edge_rois((7 / scale, 9 / scale), scale, torch.float64)])
    rois[:, 0] = 0
    expected = roi_align(features, rois, (2, 3), scale, sampling_ratio, aligned)
    for roi, want in zip(rois, expected, strict=True):
        points = roi_align_sampling_points(roi[1:], (2, 3), scale, sampling_ratio, aligned)  # [2, 3, S, 2]
        values = bilinear_interpolate(features[0], points[..., 0], points[..., 1])  # [C, 2, 3, S]
        got = values.sum(-1) / max(points.shape[2], 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bilinear_interpolate_golden():
    # On F = 4y + x interpolation is exact inside the map: F(1.25, 2.5) = 5 + 2.5 = 7.5. Outside, torchvision's rules:
    # (-0.5, 0) is clamped to (0, 0) -> 0; (0, 3.7) is clamped onto the last column -> 3; (-1.2, 0) is dropped -> 0.
    y = torch.tensor([1.25, -0.5, 0.0, -1.2, 3.0], dtype=torch.float64)
    x = torch.tensor([2.5, 0.0, 3.7, 0.0, 3.0], dtype=torch.float64)
    assert bilinear_interpolate(TOY[0], y, x)[0].tolist() == [7.5, 0.0, 3.0, 0.0, 15.0]


# ----------------------------------------------------------------------------------------------------- RoIPool


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4, 1 / 16])
@pytest.mark.parametrize("output_size", [(3, 4), 7])
def test_roi_pool_matches_torchvision_forward_and_backward(dtype, spatial_scale, output_size):
    g = torch.Generator().manual_seed(int(spatial_scale * 64))
    features = torch.randn(3, 4, 9, 13, generator=g, dtype=dtype)
    image_size = (9 / spatial_scale, 13 / spatial_scale)
    rois = torch.cat([random_rois(30, image_size, 3, dtype, g), edge_rois(image_size, spatial_scale, dtype)])
    # coordinates that land exactly on .5 after scaling: C's round() sends them away from zero
    halves = torch.tensor([[0.5, 1.5, 2.5, 3.5], [-0.5, 2.5, 6.5, 4.5]], dtype=dtype) / spatial_scale
    rois = torch.cat([rois, torch.cat([torch.tensor([[0.0], [1.0]], dtype=dtype), halves], dim=1)])
    grad_out = torch.randn(len(rois), 4, *torch.nn.modules.utils._pair(output_size), generator=g, dtype=dtype)
    ours, our_grad = run(roi_pool, features, rois, grad_out, output_size, spatial_scale)
    theirs, their_grad = run(torchvision.ops.roi_pool, features, rois, grad_out, output_size, spatial_scale)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # a max picks a value: bit-identical
    assert_same(our_grad, their_grad, dtype)


def test_roi_pool_ties_send_the_gradient_to_the_first_cell():
    # A constant map: every cell of a bin ties; the kernel keeps the first in row-major order, so does ours.
    features = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    _, our_grad = run(roi_pool, features, rois, torch.ones(1, 1, 2, 2, dtype=torch.float64), 2)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1  # the top-left cell of each 2 x 2 bin
    assert torch.equal(our_grad[0, 0], expected)
    _, their_grad = run(torchvision.ops.roi_pool, features, rois, torch.ones(1, 1, 2, 2, dtype=torch.float64), 2)
    assert torch.equal(their_grad[0, 0], expected)


def test_roi_pool_golden_toy_cases():
    # Box (0.6, 0.4)-(2.4, 2.6), 2 x 2 bins. Quantisation 1 rounds it to cells x 1..2, y 0..3 (both ends included):
    # 4 rows, 2 columns. Quantisation 2: bin height 4/2 = 2 -> rows [0, 2), [2, 4); width 2/2 = 1 -> cols [1, 2),
    # [2, 3).
    # Maxima: rows 0-1 x col 1 -> F[1, 1] = 5; rows 0-1 x col 2 -> 6; rows 2-3 x col 1 -> 13; rows 2-3 x col 2 -> 14.
    box = torch.tensor([0.6, 0.4, 2.4, 2.6], dtype=torch.float64)
    rows, cols = roi_pool_bins(box, 2)
    assert rows.tolist() == [[0, 2], [2, 4]] and cols.tolist() == [[1, 2], [2, 3]]
    assert roi_pool(TOY, [box[None]], 2).flatten().tolist() == [5.0, 6.0, 13.0, 14.0]
    # 3 bins over 4 cells: bin size 4/3; edges floor(0, 1.33, 2.67) = 0, 1, 2 and ceil(1.33, 2.67, 4) = 2, 3, 4:
    # the bins [0, 2), [1, 3), [2, 4) OVERLAP. Any box size works; the rounding is the price.
    rows, cols = roi_pool_bins(torch.tensor([0.0, 0.0, 3.0, 3.0]), 3)
    assert rows.tolist() == [[0, 2], [1, 3], [2, 4]] == cols.tolist()
    assert roi_pool(TOY, [torch.tensor([[0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)], 3)[0, 0].tolist() == [
        [5.0, 6.0, 7.0], [9.0, 10.0, 11.0], [13.0, 14.0, 15.0]]
    # 2.5 rounds to 3 (C's round), not to 2 (torch.round's half-to-even): box (2.5, 2.5)-(2.5, 2.5) is cell (3, 3).
    assert roi_pool(TOY, [torch.tensor([[2.5, 2.5, 2.5, 2.5]], dtype=torch.float64)], 1).item() == 15.0
    # A box fully outside the map: every bin is empty -> 0.
    assert roi_pool(TOY, [torch.tensor([[5.0, 5.0, 8.0, 8.0]], dtype=torch.float64)], 2).abs().sum().item() == 0.0


def test_roi_pool_bins_clip_like_the_kernel_and_reproduce_roi_pool():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64)
    rois = random_rois(10, (24, 28), 1, torch.float64, g)
    expected = roi_pool(features, rois, (3, 2), 0.25)
    for roi, want in zip(rois, expected, strict=True):
        rows, cols = roi_pool_bins(roi[1:], (3, 2), 0.25, feature_size=(6, 7))
        assert rows.min() >= 0 and rows.max() <= 6 and cols.min() >= 0 and cols.max() <= 7
        for p, (y0, y1) in enumerate(rows.tolist()):
            for q, (x0, x1) in enumerate(cols.tolist()):
                window = features[0, :, y0:y1, x0:x1]
                value = window.amax(dim=(1, 2)) if window.numel() else torch.zeros(2, dtype=torch.float64)
                torch.testing.assert_close(want[:, p, q], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- FPN poolers


def test_level_mapper_matches_torchvision_and_eq1_golden():
    ours, theirs = LevelMapper(2, 5), tv_poolers.LevelMapper(2, 5)
    g = torch.Generator().manual_seed(5)
    boxes = random_rois(200, (1000, 1000), 1, torch.float32, g, max_size=1000)[:, 1:]
    # boxes of side exactly 224 * 2^j: the eps keeps them on level 4 + j despite log2's rounding
    sides = torch.tensor([14.0, 28, 56, 112, 224, 448, 896, 1792, 0.0, 1e-3])
    exact = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    for batch in ([boxes[:120], boxes[120:]], [exact], [boxes[:0]]):
        assert torch.equal(ours(batch), theirs(batch))
    # eq. 1, k = floor(4 + log2(side / 224)), clamped to [2, 5], minus k_min = 2:
    # 14 -> k=0 -> 2 -> 0; 56 -> 2 -> 0; 112 -> 3 -> 1; 224 -> 4 -> 2; 448 -> 5 -> 3; 1792 -> 7 -> 5 -> 3; 0 -> 0
    assert ours([exact]).tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 0, 0]


def test_infer_scale_golden():
    feature = torch.zeros(1, 1, 50, 68)
    assert infer_scale(feature, [(800, 1088)]) == 1 / 16
    assert infer_scale(feature, [(600, 900), (790, 1000)]) == 1 / 16  # the largest height, rounded to a power of 2
    assert infer_scale(torch.zeros(1, 1, 13, 13), [(100, 100)]) == 1 / 8  # 13 / 100 -> 2^round(-2.94) = 1/8
    with pytest.raises(ValueError):
        infer_scale(feature, [])


def fpn_features(image_sizes, channels=3, dtype=torch.float64, seed=6):
    g = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in image_sizes)
    width = max(w for _, w in image_sizes)
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)
    return {name: torch.randn(len(image_sizes), channels, padded[0] // s, padded[1] // s, generator=g, dtype=dtype)
            for name, s in [("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)]}


@pytest.mark.parametrize("names", [["0", "1", "2", "3"], ["3", "2"], ["2"]])
def test_multiscale_roi_align_matches_torchvision(names):
    image_sizes = [(200, 300), (256, 180), (120, 130)]
    features = fpn_features(image_sizes)
    g = torch.Generator().manual_seed(7)
    proposals = [random_rois(n, size, 1, torch.float64, g, min_size=2, max_size=300)[:, 1:]
                 for n, size in zip([25, 0, 12], image_sizes, strict=True)]
    ours = MultiScaleRoIAlign(names, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in features.items()}
    out = ours(leaves, proposals, image_sizes)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * grad_out).sum().backward()
    tv_leaves = {k: v.clone().requires_grad_(True) for k, v in features.items()}
    tv_out = theirs(tv_leaves, proposals, image_sizes)
    (tv_out * grad_out).sum().backward()
    assert out.shape == (37, 3, 7, 7)
    torch.testing.assert_close(out, tv_out, rtol=0, atol=0)
    for name in features:
        if name in names:
            # the CPU backward is a sparse product (roi_align_fast): the same sums in another order
            torch.testing.assert_close(leaves[name].grad, tv_leaves[name].grad, rtol=1e-12, atol=1e-12)
        else:
            assert leaves[name].grad is None and tv_leaves[name].grad is None
    assert ours.output_size == theirs.output_size == (7, 7)


def test_multiscale_roi_align_picks_one_level_per_box():
    # Image 512 x 512, levels P2..P5 (scales 1/4 .. 1/32): a 224 box goes to P4 (index 2), a 40 box to P2.
    # Poison every level except the expected one with NaN: the result must still be finite (no averaging).
    image_sizes = [(512, 512)]
    features = {name: torch.full((1, 1, 512 // s, 512 // s), float("nan")) for name, s in
                [("0", 4), ("1", 8), ("2", 16), ("3", 32)]}
    features["2"] = torch.full((1, 1, 32, 32), 2.0)
    out = MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)(features, [torch.tensor([[100.0, 100, 324, 324]])],
                                                          image_sizes)
    assert torch.equal(out, torch.full((1, 1, 2, 2), 2.0))
    features["0"] = torch.full((1, 1, 128, 128), 0.0)
    out = MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)(features, [torch.tensor([[10.0, 10, 50, 50]])], image_sizes)
    assert torch.equal(out, torch.zeros(1, 1, 2, 2))


def test_single_scale_roi_pool_is_torchvision_roi_pool_at_one_sixteenth():
    g = torch.Generator().manual_seed(8)
    features = {"0": torch.randn(2, 3, 25, 38, generator=g)}
    proposals = [random_rois(n, (400, 600), 1, torch.float32, g)[:, 1:] for n in (9, 4)]
    pool = SingleScaleRoIPool()
    out = pool(features, proposals, [(400, 600), (380, 590)])
    expected = torchvision.ops.roi_pool(features["0"], proposals, (7, 7), 1 / 16)
    assert out.shape == (13, 3, 7, 7) and pool.output_size == (7, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(roi_pool(features["0"], proposals, 7, 1 / 16), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- benchmark


def test_bench_pooling_runs_and_reports_medians():
    from frcnn_tutorial.bench import bench_pooling

    rows = bench_pooling(features_shape=(1, 4, 10, 12), num_rois=6, runs=2)
    assert {row["op"] for row in rows} >= {"roi_align", "roi_pool"}
    for row in rows:
        assert row["ours_s"] > 0 and row["torchvision_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["torchvision_s"])
        assert row["max_abs_diff"] < 1e-5  # the two sides computed the same thing


def test_bench_command_line_prints_the_table(capsys):
    from frcnn_tutorial.bench import main

    main(["pooling", "--shape", "1", "2", "6", "7", "--rois", "3", "--runs", "1"])
    out = capsys.readouterr().out
    assert "ours/tv" in out and out.count("roi_align") == 6 and out.count("roi_pool") == 2
