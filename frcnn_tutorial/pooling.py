"""RoI pooling: cut a fixed P x Q grid of features (7 x 7) out of a feature map for every region of interest.

Shape shorthand: N images, C channels, H x W feature map, K RoIs of the whole batch, R proposals of one image,
P x Q output size (output_size = (P, Q)), G sampling points per bin along one axis (RoIAlign).

RoIs come as torchvision takes them: a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of per-image
Tensor[R, 4]; boxes are in IMAGE pixels and spatial_scale (1/16 for a stride-16 map) maps them onto the features.

Two ways to turn a box of any size into P x Q numbers per channel:
- RoIPool (Fast R-CNN, used by the original Faster R-CNN): QUANTISE twice. Round the box to whole feature cells,
  split it into P x Q bins whose edges are rounded down / up to whole cells, take the max of each bin. Any box size
  works (bins just hold more or fewer cells, may overlap by one cell, or be empty); the rounding costs accuracy.
- RoIAlign (Mask R-CNN): no rounding at all. Put G x G sampling points at exact fractional positions in each bin,
  read the feature there by bilinear interpolation, and average. aligned=True shifts the box by half a cell so
  that a pixel's centre lands on the cell's centre (detectron2); aligned=False is torchvision's legacy default.

roi_pool and roi_align here are readable, vectorised PyTorch (autograd gives the backward) and are tested equal to
torchvision.ops, forward and backward, edge rules included. The model itself calls torchvision's compiled kernels
(MultiScaleRoIAlign, SingleScaleRoIPool) because they are faster; see `python -m frcnn_tutorial.bench pooling`.
One exception, for speed: on the CPU, RoIAlign's backward is roi_align_fast's sparse matrix product (RoIAlign is
a linear map of the features), several times faster than the kernel's one-thread loop and tested equal to it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torchvision
from torch import Tensor, nn

from frcnn_tutorial.boxes import box_area

FLT_MAX = torch.finfo(torch.float32).max  # torchvision's C++ kernel starts every RoIPool max at -FLT_MAX


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def as_roi_tensor(rois: Tensor | list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Tensor[K, 5] as is, or a list of per-image Tensor[R_n, 4] -> Tensor[K, 5] with the image index first.

    Detached: torchvision gives no gradient to the boxes, only to the features.
    """
    if isinstance(rois, (list, tuple)):
        if any(r.dim() != 2 or r.shape[1] != 4 for r in rois):
            raise ValueError("a list of rois must hold one Tensor[R, 4] (x1, y1, x2, y2) per image")
        index = [torch.full_like(r[:, :1], n) for n, r in enumerate(rois)]
        rois = torch.cat([torch.cat(index), torch.cat(list(rois))], dim=1) if rois else torch.zeros(0, 5)
    elif not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError("rois must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[R, 4]")
    return rois.detach().to(dtype) if dtype is not None else rois.detach()


# ---------------------------------------------------------------------------------------------------------------
# RoIPool: quantise, then max
# ---------------------------------------------------------------------------------------------------------------


def _round_half_away(x: Tensor) -> Tensor:
    """C's round(): halves go away from zero (2.5 -> 3, -2.5 -> -3). torch.round sends halves to even (2.5 -> 2)."""
    whole = x.trunc()
    return torch.where((x - whole).abs() >= 0.5, whole + x.sign(), whole)


def roi_pool_edges(rois: Tensor, output_size, spatial_scale: float, feature_size=None):
    """rois [K, 5] -> integer bin edges: rows_start, rows_end [K, P] and cols_start, cols_end [K, Q].

    Bin (p, q) of RoI k covers cells rows_start[k, p] <= y < rows_end[k, p], cols_start[k, q] <= x < cols_end[k, q].
    With feature_size = (H, W) the edges are clipped to the map, as the kernel does.
    """
    (P, Q), dtype = _pair(output_size), rois.dtype
    # Quantisation 1: the box snaps to whole cells; x1..x2 counts both end cells, hence the + 1.
    x1, y1, x2, y2 = _round_half_away(rois[:, 1:] * torch.tensor(spatial_scale, dtype=dtype)).long().unbind(1)
    roi_h, roi_w = (y2 - y1 + 1).clamp(min=1), (x2 - x1 + 1).clamp(min=1)  # malformed boxes become 1 x 1
    rows = _bin_edges(roi_h.to(dtype) / P, P, y1)
    cols = _bin_edges(roi_w.to(dtype) / Q, Q, x1)
    if feature_size is not None:
        rows = tuple(edge.clamp(0, feature_size[0]) for edge in rows)
        cols = tuple(edge.clamp(0, feature_size[1]) for edge in cols)
    return rows[0], rows[1], cols[0], cols[1]


def _bin_edges(bin_size: Tensor, num_bins: int, offset: Tensor) -> tuple[Tensor, Tensor]:
    """Quantisation 2: bin i spans [floor(i * bin_size), ceil((i + 1) * bin_size)) cells from the box's first cell.

    A fractional bin_size (e.g. 10 cells / 7 bins) makes neighbouring bins share a cell; bin_size < 1 repeats cells.
    """
    i = torch.arange(num_bins, dtype=bin_size.dtype, device=bin_size.device)
    start = torch.floor(i[None, :] * bin_size[:, None]).long()
    end = torch.ceil((i[None, :] + 1) * bin_size[:, None]).long()
    return start + offset[:, None], end + offset[:, None]


def roi_pool_bins(roi: Tensor, output_size, spatial_scale: float = 1.0, feature_size=None) -> tuple[Tensor, Tensor]:
    """The bins RoIPool uses for one box roi = (x1, y1, x2, y2) in image pixels, for drawing.

    Returns rows [P, 2] and cols [Q, 2] int64: (first cell, one past the last cell) of each bin row / column, in
    feature-map cells. Pass feature_size = (H, W) to clip them to the map exactly as roi_pool does.
    """
    rois = torch.cat([roi.new_zeros(1), roi.reshape(4)])[None]
    rows_start, rows_end, cols_start, cols_end = roi_pool_edges(rois, output_size, spatial_scale, feature_size)
    return torch.stack([rows_start[0], rows_end[0]], 1), torch.stack([cols_start[0], cols_end[0]], 1)


def roi_pool(features: Tensor, rois: Tensor | list[Tensor], output_size, spatial_scale: float = 1.0) -> Tensor:
    """features [N, C, H, W], rois [K, 5] or list of [R, 4] -> [K, C, P, Q]: the max of every quantised bin.

    Same numbers as torchvision.ops.roi_pool: an empty bin gives 0, and on ties the first cell in row-major order
    wins the max - and with it the whole gradient of that output (backward routes to the argmax cell only).
    """
    (N, C, H, W), (P, Q) = features.shape, _pair(output_size)
    rois = as_roi_tensor(rois, features.dtype)
    rows_start, rows_end, cols_start, cols_end = roi_pool_edges(rois, (P, Q), spatial_scale, (H, W))
    cells = features.permute(0, 2, 3, 1).reshape(N * H * W, C)  # one row of C channels per feature-map cell
    cell_of_image = rois[:, 0].long()[:, None, None] * (H * W)  # [K, 1, 1]: where the RoI's image starts

    empty = (rows_end <= rows_start)[:, :, None] | (cols_end <= cols_start)[:, None, :]  # [K, P, Q]
    best = torch.where(empty, 0.0, -FLT_MAX).to(features.dtype)[..., None].expand(-1, -1, -1, C)  # [K, P, Q, C]
    best_cell = torch.full_like(best, -1, dtype=torch.long)
    # Visit the cells of every bin one offset (dy, dx) at a time, for all RoIs, bins and channels at once. Cutting
    # out all the windows at once would need K*C*P*Q*(bin cells) memory; bins hold only a few cells, so this loop is
    # short. dy outer, dx inner and a strict ">" reproduce the kernel's row-major "first maximum wins".
    max_h = int((rows_end - rows_start).max()) if len(rois) else 0
    max_w = int((cols_end - cols_start).max()) if len(rois) else 0
    with torch.no_grad():
        for dy in range(max_h):
            y = rows_start + dy  # [K, P]
            for dx in range(max_w):
                x = cols_start + dx  # [K, Q]
                inside = (y < rows_end)[:, :, None] & (x < cols_end)[:, None, :]  # [K, P, Q]
                cell = cell_of_image + y.clamp(max=H - 1)[:, :, None] * W + x.clamp(max=W - 1)[:, None, :]
                value = cells[cell]  # [K, P, Q, C]
                better = inside[..., None] & (value > best)
                best = torch.where(better, value, best)
                best_cell = torch.where(better, cell[..., None], best_cell)
    # Read the winners again with autograd on: the gradient of each output flows to its argmax cell only.
    winner = cells.reshape(-1)[best_cell.clamp(min=0) * C + torch.arange(C, device=features.device)]
    return torch.where(best_cell >= 0, winner, best).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# RoIAlign: sample, interpolate bilinearly, average
# ---------------------------------------------------------------------------------------------------------------


def roi_align_geometry(rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool):
    """rois [K, 5] -> per RoI, in feature-map units: (start_y, start_x), (bin_h, bin_w), (grid_h, grid_w), each [K].

    No rounding anywhere. A feature value F[i, j] sits at the point (y=i, x=j).
    """
    (P, Q), dtype = _pair(output_size), rois.dtype
    offset = 0.5 if aligned else 0.0  # aligned: box corner x maps to x * scale - 0.5, so cell j covers [j-.5, j+.5)
    x1, y1, x2, y2 = (rois[:, 1:] * torch.tensor(spatial_scale, dtype=dtype) - offset).unbind(1)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:  # legacy behaviour: a box smaller than one cell is stretched to 1 x 1
        roi_h, roi_w = roi_h.clamp(min=1.0), roi_w.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
    else:  # adaptive: about one sample per feature cell, ceil(roi size / bins); 0 for an empty aligned box
        grid_h, grid_w = torch.ceil(roi_h / P).long(), torch.ceil(roi_w / Q).long()
    return (y1, x1), (roi_h / P, roi_w / Q), (grid_h, grid_w)


def sample_coordinates(start: Tensor, bin_size: Tensor, grid: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Along one axis: [K] -> coordinates [K, num_bins, G] of the samples of every bin, and used [K, G].

    Sample i of bin p sits at start + p * bin_size + (i + 0.5) * bin_size / grid: the centres of `grid` equal
    sub-bins. G is the largest grid of the batch; a RoI with a smaller (adaptive) grid marks its extra points unused.
    Written in the kernel's order of operations, so the floats are the same.
    """
    G = max(int(grid.max()), 1) if len(grid) else 1
    i = torch.arange(G, dtype=start.dtype, device=start.device)[None, None, :]
    p = torch.arange(num_bins, dtype=start.dtype, device=start.device)[None, :, None]
    start, bin_size, g = start[:, None, None], bin_size[:, None, None], grid.clamp(min=1).to(start.dtype)[:, None, None]
    coords = start + p * bin_size + (i + 0.5) * bin_size / g
    return coords, i[0] < grid[:, None]


def linear_neighbours(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Along one axis of `size` cells: (low, high, frac, inside) for each coordinate, torchvision's border rules.

    The value at coordinate c is (1 - frac) * F[low] + frac * F[high]. A sample more than one cell outside the map
    (c < -1 or c > size) reads 0 (inside False); one closer than that is clamped onto the first / last cell.
    """
    inside = (coords >= -1.0) & (coords <= size)
    c = coords.clamp(min=0, max=size - 1)  # past the last cell: sit exactly on it (frac = 0)
    low = c.floor()
    frac = c - low
    low = low.long()
    return low, (low + 1).clamp(max=size - 1), frac, inside


def bilinear_interpolate(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """feature [C, H, W], y and x [...] (same shape) -> [C, ...]: the feature read at fractional points.

    Bilinear: a weighted mean of the 4 surrounding cells, each weighted by the area of the opposite sub-rectangle.
    One point at a time, for teaching and drawing; roi_align does the same sums as matrix products.
    """
    y_low, y_high, ly, y_inside = linear_neighbours(y, feature.shape[-2])
    x_low, x_high, lx, x_inside = linear_neighbours(x, feature.shape[-1])
    hy, hx = 1 - ly, 1 - lx
    value = (hy * hx * feature[:, y_low, x_low] + hy * lx * feature[:, y_low, x_high]
             + ly * hx * feature[:, y_high, x_low] + ly * lx * feature[:, y_high, x_high])
    return torch.where(y_inside & x_inside, value, 0.0)


def interpolation_matrix(coords: Tensor, used: Tensor, size: int) -> Tensor:
    """coords [K, B, G] along one axis -> [K, B, size]: how much each cell row (or column) counts in each bin.

    Bilinear weights factor into a row weight times a column weight, so the sum over a bin's G x G samples is
    (row weights summed over its G rows)^T F (column weights summed over its G columns): two small matrices.
    """
    low, high, frac, inside = linear_neighbours(coords, size)
    keep = inside & used[:, None, :]
    weights = coords.new_zeros(*coords.shape[:2], size)
    weights.scatter_add_(2, low, torch.where(keep, 1 - frac, 0.0))
    weights.scatter_add_(2, high, torch.where(keep, frac, 0.0))
    return weights


def roi_align(features: Tensor, rois: Tensor | list[Tensor], output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """features [N, C, H, W], rois [K, 5] or list of [R, 4] -> [K, C, P, Q]: the average of bilinear samples.

    For bin (p, q): out = sum over its grid_h x grid_w samples of F(y, x), divided by max(grid_h * grid_w, 1).
    Because bilinear weights are separable this is  out[k] = Wy[k] @ F[n] @ Wx[k]^T / count[k],  with Wy [P, H]
    and Wx [Q, W] from interpolation_matrix: exactly torchvision's numbers, as two matrix products per image.
    """
    (N, C, H, W), (P, Q) = features.shape, _pair(output_size)
    rois = as_roi_tensor(rois, features.dtype)
    (y1, x1), (bin_h, bin_w), (grid_h, grid_w) = roi_align_geometry(rois, (P, Q), spatial_scale, sampling_ratio,
                                                                     aligned)
    weights_y = interpolation_matrix(*sample_coordinates(y1, bin_h, grid_h, P), H)  # [K, P, H]
    weights_x = interpolation_matrix(*sample_coordinates(x1, bin_w, grid_w, Q), W)  # [K, Q, W]
    count = (grid_h * grid_w).clamp(min=1).to(features.dtype)  # an empty grid (aligned, tiny box) gives 0

    out = features.new_zeros(len(rois), C, P, Q)
    batch = rois[:, 0].long()
    for n in range(N):  # a loop over the few images, not the RoIs: each RoI reads only its own image
        k = torch.nonzero(batch == n).squeeze(1)  # may be empty: the output stays connected to the features
        rows = torch.einsum("kph,chw->kcpw", weights_y[k], features[n])  # mix rows: [k, C, P, W]
        out[k] = torch.einsum("kcpw,kqw->kcpq", rows, weights_x[k])  # then columns: [k, C, P, Q]
    return out / count[:, None, None, None]


def roi_align_sampling_points(roi: Tensor, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                              aligned: bool = False) -> Tensor:
    """The points RoIAlign samples for one box roi = (x1, y1, x2, y2) in image pixels, for drawing.

    Returns [P, Q, grid_h * grid_w, 2]: the (y, x) of every sample of every bin, in feature-map units (F[i, j]
    sits at y=i, x=j; multiply by 1 / spatial_scale for image pixels). bilinear_interpolate at these points,
    averaged per bin (divided by max(grid_h * grid_w, 1)), gives roi_align's output.
    """
    rois = torch.cat([roi.new_zeros(1), roi.reshape(4)])[None]
    (P, Q) = _pair(output_size)
    (y1, x1), (bin_h, bin_w), (grid_h, grid_w) = roi_align_geometry(rois, (P, Q), spatial_scale, sampling_ratio,
                                                                     aligned)
    ys, used_y = sample_coordinates(y1, bin_h, grid_h, P)
    xs, used_x = sample_coordinates(x1, bin_w, grid_w, Q)
    ys, xs = ys[0][:, used_y[0]], xs[0][:, used_x[0]]  # [P, grid_h], [Q, grid_w]
    gh, gw = ys.shape[1], xs.shape[1]
    yy = ys[:, None, :, None].expand(P, Q, gh, gw)
    xx = xs[None, :, None, :].expand(P, Q, gh, gw)
    return torch.stack([yy, xx], dim=-1).reshape(P, Q, gh * gw, 2)


# ---------------------------------------------------------------------------------------------------------------
# RoIAlign as a sparse matrix: the backward the model uses on the CPU
# ---------------------------------------------------------------------------------------------------------------
# RoIAlign is linear in the features: every output number is a weighted sum of a few feature cells. Flatten the
# features to F [N*H*W, C] (channels last) and the output to O [K*P*Q, C]: then O = A @ F for a sparse A with
# (2G)^2 entries per row (G x G samples per bin, 4 neighbours each), and the backward is dF = A^T @ dO.
# torchvision's CPU backward walks every RoI, channel and sample on one thread; A^T @ dO is one sparse product.


def roi_align_cells(rois: Tensor, feature_shape, output_size, spatial_scale: float, sampling_ratio: int,
                    aligned: bool) -> tuple[Tensor, Tensor]:
    """rois [K, 5] -> (cells, weights), each [K, P, Q, S] with S = (2G)^2: the flat feature cells (n*H*W + y*W + x)
    every bin reads and their weights, so out[k, :, p, q] = sum_s weights[k,p,q,s] * F[:, cells[k,p,q,s]].

    Row and column weights (interpolation_matrix's, before they are summed into a band) multiply: a sample's
    bilinear weight is (row weight) x (column weight). Unused or outside samples get weight 0.
    """
    (_, _, H, W), (P, Q) = feature_shape, _pair(output_size)
    (y1, x1), (bin_h, bin_w), (grid_h, grid_w) = roi_align_geometry(rois, (P, Q), spatial_scale, sampling_ratio,
                                                                     aligned)

    def axis(start, bin_size, grid, num_bins, size):  # [K, bins, 2G]: the low and high neighbour of each sample
        coords, used = sample_coordinates(start, bin_size, grid, num_bins)
        low, high, frac, inside = linear_neighbours(coords, size)
        keep = (inside & used[:, None, :]).to(coords.dtype)
        return torch.cat([low, high], dim=-1), torch.cat([(1 - frac) * keep, frac * keep], dim=-1)

    rows, row_weights = axis(y1, bin_h, grid_h, P, H)  # [K, P, 2G]
    cols, col_weights = axis(x1, bin_w, grid_w, Q, W)  # [K, Q, 2G]
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)[:, None, None, None, None]
    image = rois[:, 0].long()[:, None, None, None, None]
    cells = (image * H + rows[:, :, None, :, None]) * W + cols[:, None, :, None, :]  # [K, P, Q, 2G, 2G]
    weights = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :] / count
    return cells.flatten(3), weights.flatten(3)


def roi_align_transpose_matrix(rois: Tensor, feature_shape, output_size, spatial_scale: float, sampling_ratio: int,
                               aligned: bool) -> Tensor:
    """A^T as a sparse CSR matrix [N*H*W, K*P*Q]: row i holds the weights with which the output bins read cell i."""
    N, _, H, W = feature_shape
    cells, weights = roi_align_cells(rois, feature_shape, output_size, spatial_scale, sampling_ratio, aligned)
    entries_per_bin = cells.shape[-1]
    cells, weights = cells.flatten(), weights.flatten()
    order = torch.argsort(cells)  # CSR stores the entries grouped by row: by feature cell
    row_starts = torch.cat([cells.new_zeros(1), torch.bincount(cells, minlength=N * H * W).cumsum(0)])
    bins = order // entries_per_bin  # entry e belongs to bin e // S of the flattened [K, P, Q]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long-standing
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, bins, weights[order], (N * H * W, cells.numel() // entries_per_bin))


class _RoIAlignSparseBackward(torch.autograd.Function):
    """Forward: torchvision's compiled roi_align. Backward: dF = A^T @ dO (same numbers, up to the order of sums)."""

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, features.dtype, output_size, spatial_scale, sampling_ratio, aligned)
        return torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (rois,), (shape, dtype, output_size, spatial_scale, sampling_ratio, aligned) = ctx.saved_tensors, ctx.args
        N, C, H, W = shape
        if len(rois) == 0:
            return grad_out.new_zeros(shape, dtype=dtype), None, None, None, None, None
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 grads are summed in fp32
        a_t = roi_align_transpose_matrix(rois.to(math_dtype), shape, output_size, spatial_scale, sampling_ratio,
                                         aligned)
        grad_bins = grad_out.to(math_dtype).permute(0, 2, 3, 1).reshape(-1, C)  # [K*P*Q, C]
        grad = (a_t @ grad_bins).reshape(N, H, W, C).permute(0, 3, 1, 2)  # [N, C, H, W]
        return grad.to(dtype).contiguous(), None, None, None, None, None


def roi_align_fast(features: Tensor, rois: Tensor, output_size, spatial_scale: float = 1.0,
                   sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align with a faster CPU backward (the sparse product above); on CUDA, the kernel as is."""
    output_size = _pair(output_size)
    if features.is_cuda or not features.requires_grad:
        return torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _RoIAlignSparseBackward.apply(features, as_roi_tensor(rois), output_size, spatial_scale, sampling_ratio,
                                         aligned)


# ---------------------------------------------------------------------------------------------------------------
# Poolers the model uses (torchvision's compiled kernels)
# ---------------------------------------------------------------------------------------------------------------


def pool_with(kernel, feature: Tensor, rois: Tensor, *args) -> Tensor:
    """kernel(feature, rois, *args) with the dtypes the kernels want: the boxes in the features' dtype; under
    autocast both in fp32 and the output back in the features' dtype (as torchvision's own autocast wrappers do,
    which its CPU roi_pool lacks; and boxes in bf16 would be rounded: a coordinate near 300 px to a multiple of 2)."""
    if torch.is_autocast_enabled(feature.device.type):
        return kernel(feature.float(), rois.float(), *args).to(feature.dtype)
    return kernel(feature, rois.to(feature.dtype), *args)


class LevelMapper:
    """FPN eq. 1: an RoI of w x h image pixels is pooled from level k = floor(k0 + log2(sqrt(w h) / 224)).

    A 224 x 224 box (ImageNet size) goes to k0 = 4 (P4); half the size, one level finer. k is clamped to the
    levels that exist, [k_min, k_max], and returned 0-based: 0 means P{k_min}. Same numbers as torchvision.
    """

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.canonical_scale, self.canonical_level, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxes: list[Tensor] | Tensor) -> Tensor:
        """boxes: list of per-image [R, 4] (or one [R, 4]) -> level index [sum R] int64."""
        boxes = torch.cat(list(boxes)) if isinstance(boxes, (list, tuple)) else boxes
        size = torch.sqrt(box_area(boxes))
        # eps: a box of exactly 224 * 2^j must land on level 4 + j despite log2's rounding
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale)
                            + torch.tensor(self.eps, dtype=size.dtype))
        return level.clamp(min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


def infer_scale(feature: Tensor, image_sizes: list[tuple[int, int]]) -> float:
    """spatial_scale of a feature map: its height over the largest image height, rounded to a power of 2.

    E.g. a 50-row map for images up to 800 rows: 50 / 800 = 1/16. torchvision's rule (heights only, float32 log2).
    """
    if not image_sizes:
        raise ValueError("image_sizes is empty: the scale of a feature map is inferred from the image sizes")
    max_height = max(int(h) for h, _ in image_sizes)
    return 2 ** float(torch.tensor(float(feature.shape[-2]) / max_height).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign from an FPN: each RoI is pooled from ONE level, picked by its size (LevelMapper); no averaging.

    forward(features: {name: [N, C, h_l, w_l]}, proposals: list of [R, 4] image boxes, image_sizes: [(h, w)])
        -> [sum R, C, P, Q] in the order of the concatenated proposals.
    Uses the levels in featmap_names (in the dict's order, as torchvision); spatial scales and the level range are
    inferred from the feature and image sizes at every call (torchvision infers them once and caches them).
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes) -> Tensor:
        maps = [v for k, v in features.items() if k in self.featmap_names]
        scales = [infer_scale(m, image_sizes) for m in maps]
        rois = as_roi_tensor(proposals)  # the boxes' own dtype: under bf16 autocast they stay fp32
        if len(maps) == 1:
            return self._align(maps[0], rois, scales[0])
        # P2 has scale 1/4 -> level 2; the mapper works in these absolute level numbers
        mapper = LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])), self.canonical_scale,
                             self.canonical_level)
        levels = mapper(proposals)
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], *self.output_size)
        for level, (feature, scale) in enumerate(zip(maps, scales, strict=True)):
            k = torch.where(levels == level)[0]
            out[k] = self._align(feature, rois[k], scale).to(out.dtype)
        return out

    def _align(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return pool_with(roi_align_fast, feature, rois, self.output_size, scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")


class SingleScaleRoIPool(nn.Module):
    """The original Faster R-CNN pooler: RoIPool 7 x 7 on one map (VGG16's conv5_3, spatial_scale 1/16).

    Same forward signature as MultiScaleRoIAlign so RoIHeads takes either; uses torchvision.ops.roi_pool.
    """

    def __init__(self, featmap_name: str = "0", output_size=7, spatial_scale: float = 1 / 16):
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes=None) -> Tensor:
        feature = features[self.featmap_name]
        return pool_with(torchvision.ops.roi_pool, feature, as_roi_tensor(proposals), self.output_size,
                         self.spatial_scale)

    def extra_repr(self) -> str:
        return f"featmap_name={self.featmap_name!r}, output_size={self.output_size}, spatial_scale={self.spatial_scale}"
