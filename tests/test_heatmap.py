"""Normalization: [0, 1], never inverted, never NaN."""

from __future__ import annotations

import torch

import medcam3d


def test_normalize_per_map_range_and_order():
    maps = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 7 + 3
    normed = medcam3d.normalize(maps)
    flat = normed.flatten(2)
    torch.testing.assert_close(flat.amin(2), torch.zeros(2, 3))
    torch.testing.assert_close(flat.amax(2), torch.ones(2, 3))
    assert torch.equal(flat.argmax(2), maps.flatten(2).argmax(2))  # not inverted
    expected = (maps[1, 2] - maps[1, 2].min()) / (maps[1, 2].max() - maps[1, 2].min())
    torch.testing.assert_close(normed[1, 2], expected)


def test_normalize_flat_map_gives_zeros_not_nan():
    maps = torch.randn(1, 2, 3, 3, 3)
    maps[0, 1] = 4.2
    normed = medcam3d.normalize(maps)
    assert not torch.isnan(normed).any()
    assert torch.equal(normed[0, 1], torch.zeros(3, 3, 3))
    assert normed[0, 0].max() == 1


def test_normalize_single_map():
    single = torch.arange(8.0).reshape(2, 2, 2)
    torch.testing.assert_close(medcam3d.normalize(single, spatial_dims=3), single / 7)
