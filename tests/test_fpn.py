"""fpn.py against torchvision.ops.FeaturePyramidNetwork (with LastLevelMaxPool), plus a hand-computed pyramid."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from frcnn_tutorial.fpn import FeaturePyramidNetwork


def backbone_maps(sizes, channels, seed=0, dtype=torch.float32, names=None):
    g = torch.Generator().manual_seed(seed)
    names = names or [str(i) for i in range(len(sizes))]
    return OrderedDict((name, torch.randn(2, c, h, w, generator=g, dtype=dtype))
                       for name, c, (h, w) in zip(names, channels, sizes, strict=True))


def torchvision_fpn(in_channels_list, out_channels):
    return torchvision.ops.FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())


@pytest.mark.parametrize("sizes", [
    [(32, 40), (16, 20), (8, 10), (4, 5)],  # an 128 x 160 image through a ResNet
    [(25, 38), (13, 19), (7, 10), (4, 5)],  # odd sizes: 2x upsampling would not fit, nearest to the exact size does
    [(9, 9), (3, 3)],  # two levels, factor 3
    [(5, 7)],  # a single level: no top-down path, still the extra P6
])
def test_fpn_matches_torchvision_with_copied_weights(sizes):
    channels = [8, 16, 24, 32][: len(sizes)]
    theirs = torchvision_fpn(channels, 12).double()
    ours = FeaturePyramidNetwork(channels, 12).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same parameter names, no key map needed
    maps = backbone_maps(sizes, channels, dtype=torch.float64, names=["c2", "c3", "c4", "c5"][: len(sizes)])
    leaves = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in maps.items())
    tv_leaves = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in maps.items())
    out, tv_out = ours(leaves), theirs(tv_leaves)
    assert list(out.keys()) == list(tv_out.keys()) == ["c2", "c3", "c4", "c5"][: len(sizes)] + ["pool"]
    for name in out:
        torch.testing.assert_close(out[name], tv_out[name], rtol=0, atol=0)
    sum(v.sum() * (i + 1) for i, v in enumerate(out.values())).backward()
    sum(v.sum() * (i + 1) for i, v in enumerate(tv_out.values())).backward()
    for name in maps:
        torch.testing.assert_close(leaves[name].grad, tv_leaves[name].grad, rtol=1e-12, atol=1e-12)
    for (key, p), (tv_key, tv_p) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert key == tv_key
        torch.testing.assert_close(p.grad, tv_p.grad, rtol=1e-12, atol=1e-12)


def test_fpn_initialisation_is_torchvision_s():
    # Same creation order and the same kaiming_uniform_(a=1) / zero-bias init: one seed gives the same weights.
    torch.manual_seed(3)
    ours = FeaturePyramidNetwork([4, 8, 16], 6)
    torch.manual_seed(3)
    theirs = torchvision_fpn([4, 8, 16], 6)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (key, ours_t), tv_t in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(ours_t, tv_t, rtol=0, atol=0, msg=key)
    assert all(torch.all(b == 0) for k, b in ours.state_dict().items() if k.endswith("bias"))


def test_fpn_output_shapes_and_strides():
    maps = backbone_maps([(32, 48), (16, 24), (8, 12), (4, 6)], [16, 32, 64, 128])
    out = FeaturePyramidNetwork([16, 32, 64, 128], 64)(maps)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (2, 64, 32, 48), "1": (2, 64, 16, 24), "2": (2, 64, 8, 12), "3": (2, 64, 4, 6), "pool": (2, 64, 2, 3)}
    assert "pool" not in FeaturePyramidNetwork([16, 32, 64, 128], 64, extra_max_pool=False)(maps)


def test_fpn_golden_pyramid_by_hand():
    # Two levels, one channel, every conv an identity (1x1 weight 1, 3x3 with only its centre 1, biases 0):
    # P3 = C3 = [[1, 2], [3, 4]]; P2 = C2 + nearest-upsampled P3, where upsampling copies each value into a 2x2 block.
    fpn = FeaturePyramidNetwork([1, 1], 1)
    with torch.no_grad():
        for block in list(fpn.inner_blocks) + list(fpn.layer_blocks):
            conv = block[0]
            conv.weight.zero_()
            conv.weight[0, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1
    c2 = torch.full((1, 1, 4, 4), 10.0)
    c3 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = fpn(OrderedDict([("c2", c2), ("c3", c3)]))
    assert out["c3"][0, 0].tolist() == [[1, 2], [3, 4]]
    assert out["c2"][0, 0].tolist() == [[11, 11, 12, 12], [11, 11, 12, 12], [13, 13, 14, 14], [13, 13, 14, 14]]
    # P6 ("pool") = P3 with stride 2, kernel 1: keeps the top-left value of every 2x2 block -> [[1]]
    assert out["pool"][0, 0].tolist() == [[1.0]]
