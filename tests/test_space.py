"""Tests of medcam3d.space: Space, feature_space and resample (exact values, seeded)."""

from __future__ import annotations

import warnings

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from medcam3d.space import Resampler, Space, SpaceError, feature_space, resample


def _affine(rotation=None, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), flip=None):
    """voxel -> world = R @ diag(flip) @ diag(spacing), translation ``origin``."""
    a = np.eye(4)
    r = np.eye(3) if rotation is None else np.asarray(rotation)
    f = np.ones(3) if flip is None else np.asarray(flip, dtype=float)
    a[:3, :3] = r @ np.diag(f * np.asarray(spacing))
    a[:3, 3] = origin
    return a


def _oblique(seed, spacing, origin, flip=(1, -1, 1)):
    rot = Rotation.random(random_state=seed).as_matrix()
    return _affine(rot, spacing, origin, flip)


def _reference(data, src, dst, fill):
    """Independent trilinear pull-resampling with scipy (edge band clamped, fill outside)."""
    nd = len(src.shape)
    m = np.linalg.inv(src.affine) @ dst.affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in dst.shape], indexing="ij")).reshape(nd, -1)
    if nd == 2:
        coords = m[:2, :2] @ idx + m[:2, 3:4]
    else:
        coords = m[:3, :3] @ idx + m[:3, 3:4]
    n = np.array(src.shape, dtype=float)[:, None]
    inside = np.all((coords >= -0.5) & (coords <= n - 0.5), axis=0)
    clamped = np.clip(coords, 0, n - 1)
    out = map_coordinates(np.asarray(data, dtype=np.float64), clamped, order=1)
    out[~inside] = fill
    # distance to the nearest fill boundary (voxels), to skip rounding-ambiguous points
    margin = np.min(np.minimum(np.abs(coords + 0.5), np.abs(coords - (n - 0.5))), axis=0)
    return out.reshape(dst.shape), coords, margin.reshape(dst.shape)


# ------------------------------------------------------------------------------ Space


def test_space_validation_messages():
    with pytest.raises(SpaceError, match="determinant"):
        Space((4, 4, 4), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(SpaceError, match="NaN"):
        Space((4, 4, 4), np.full((4, 4), np.nan))
    with pytest.raises(SpaceError, match="last row"):
        Space((4, 4, 4), np.ones((4, 4)))
    with pytest.raises(SpaceError, match=r"\(4, 4\)"):
        Space((4, 4, 4), np.eye(3))
    with pytest.raises(SpaceError, match="spatial"):
        Space((1, 4, 4, 4), np.eye(4))
    with pytest.raises(SpaceError, match="positive"):
        Space((0, 4, 4), np.eye(4))


def test_space_helpers_equality_repr():
    a = _affine(spacing=(0.7, 1.3, 2.5), origin=(10, -20, 30), flip=(-1, 1, 1))
    s = Space([36, 44, 28], a)
    assert s.shape == (36, 44, 28) and s.ndim == 3
    assert s.affine.dtype == np.float64 and not s.affine.flags.writeable
    np.testing.assert_allclose(s.spacing, (0.7, 1.3, 2.5))
    assert s.origin == (10.0, -20.0, 30.0)
    assert s.orientation == ("L", "A", "S")
    np.testing.assert_allclose(s.voxel_to_world([1, 2, 3]), [10 - 0.7, -20 + 2.6, 30 + 7.5])
    pts = np.random.default_rng(0).normal(size=(5, 3)) * 10
    np.testing.assert_allclose(s.voxel_to_world(s.world_to_voxel(pts)), pts, atol=1e-12)
    # tolerant equality (NIfTI stores affines in float32), hashable, friendly repr
    assert s == Space((36, 44, 28), a.astype(np.float32))
    assert s != Space((36, 44, 29), a)
    assert s != Space((36, 44, 28), a + np.diag([0, 0, 0.01, 0]))
    assert len({s, Space((36, 44, 28), a.copy())}) == 1
    r = repr(s)
    assert "(36, 44, 28)" in r and "0.7, 1.3, 2.5" in r and "LAS" in r
    assert not s.is_sheared
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    assert Space((4, 4, 4), sheared).is_sheared


def test_space_of_sources():
    a = _oblique(3, (0.8, 0.9, 1.5), (5, 6, 7))
    s = Space((6, 7, 8), a)
    assert Space.of(s) is s
    assert Space.of(((6, 7, 8), a)) == s
    img = nib.Nifti1Image(np.zeros((6, 7, 8, 2), np.float32), a)
    assert Space.of(img) == s

    from monai.data import MetaTensor

    mt = MetaTensor(torch.zeros(2, 6, 7, 8), affine=torch.as_tensor(a))
    assert Space.of(mt) == s
    batched = MetaTensor(torch.zeros(3, 2, 6, 7, 8), affine=torch.as_tensor(a)[None].repeat(3, 1, 1))
    assert Space.of(batched, batch=True) == s
    with pytest.raises(SpaceError, match="batch=True"):
        Space.of(MetaTensor(torch.zeros(3, 2, 6, 7, 8), affine=torch.as_tensor(a)))
    # MONAI LPS-tagged metadata is converted to RAS
    lps = MetaTensor(torch.zeros(1, 6, 7, 8), affine=torch.as_tensor(np.diag([-1, -1, 1, 1.0]) @ a))
    lps.meta["space"] = "LPS"
    assert Space.of(lps) == s
    # 2D: MONAI's 3x3 affine is embedded
    mt2 = MetaTensor(torch.zeros(1, 5, 6), affine=torch.tensor([[2.0, 0, 1], [0, 3, 2], [0, 0, 1]]))
    s2 = Space.of(mt2)
    assert s2.shape == (5, 6) and s2.spacing == (2.0, 3.0)
    np.testing.assert_allclose(s2.voxel_to_world([1, 1]), [3, 5, 0])
    with pytest.raises(SpaceError, match="plain torch.Tensor"):
        Space.of(torch.zeros(1, 4, 4, 4))


# ------------------------------------------------------------------------------ feature_space


@pytest.fixture
def space_oblique():
    """Oblique (rotation + flip), anisotropic, non-zero origin grid of odd shape."""
    return Space((36, 44, 28), _oblique(7, (0.7, 1.3, 2.5), (-81.5, 42.25, 17.0), flip=(1, -1, 1)))


def test_feature_space_cell_centres_are_pooled_voxel_centroids(space_oblique):
    s = space_oblique
    fs = feature_space(s, (9, 11, 7))
    assert fs.shape == (9, 11, 7)
    np.testing.assert_allclose(fs.spacing, np.array(s.spacing) * 4)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in s.shape], indexing="ij"), -1).reshape(-1, 3)
    world = s.voxel_to_world(ijk).reshape(9, 4, 11, 4, 7, 4, 3)
    centroids = world.mean(axis=(1, 3, 5)).reshape(-1, 3)
    uvw = np.stack(np.meshgrid(*[np.arange(n) for n in fs.shape], indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_allclose(fs.voxel_to_world(uvw), centroids, atol=1e-9)

    # Independently: pool images whose values are the world coordinates of each voxel.
    coords = torch.from_numpy(s.voxel_to_world(ijk))
    coords = coords.reshape(*s.shape, 3).permute(3, 0, 1, 2)[None]  # (1, 3, I, J, K) float64
    pooled = torch.nn.AvgPool3d(4)(coords)[0].permute(1, 2, 3, 0).reshape(-1, 3).numpy()
    assert pooled.shape == (9 * 11 * 7, 3)
    np.testing.assert_allclose(pooled[:, 0], fs.voxel_to_world(uvw)[:, 0], atol=1e-9)
    np.testing.assert_allclose(pooled, fs.voxel_to_world(uvw), atol=1e-9)


def test_feature_space_matches_monai_scale_affine(space_oblique):
    from monai.transforms.utils import scale_affine

    fs = feature_space(space_oblique, (9, 11, 7))
    expected = space_oblique.affine @ scale_affine((36, 44, 28), (9, 11, 7), centered=True)
    np.testing.assert_allclose(fs.affine, expected, atol=1e-12)


def test_feature_space_of_a_2d_grid_is_the_pooled_cell_centres():
    """A 2D grid (4x4 affine, third axis unused): each feature cell sits at the mean world position of the input
    voxels it pools, and the unused third axis is left as it is."""
    affine = np.eye(4)
    affine[:2, :2] = [[1.5, 0.2], [-0.1, 0.8]]
    affine[:2, 3] = [3.0, -4.0]
    s = Space((40, 24), affine)
    fs = feature_space(s, (10, 6))
    ij = np.stack(np.meshgrid(np.arange(40), np.arange(24), indexing="ij"), -1).reshape(-1, 2)
    world = torch.from_numpy(s.voxel_to_world(ij)).reshape(40, 24, 3).permute(2, 0, 1)[None]
    pooled = torch.nn.AvgPool2d(4)(world)[0].permute(1, 2, 0).reshape(-1, 3).numpy()
    uv = np.stack(np.meshgrid(np.arange(10), np.arange(6), indexing="ij"), -1).reshape(-1, 2)
    np.testing.assert_allclose(fs.voxel_to_world(uv), pooled, atol=1e-9)
    np.testing.assert_array_equal(fs.affine[:, 2], affine[:, 2])


def test_feature_space_warns_on_fractional_stride_and_checks_axes(space_oblique):
    with pytest.warns(UserWarning, match="not an integer multiple"):
        fs = feature_space(space_oblique, (5, 11, 7))
    np.testing.assert_allclose(fs.spacing[0], space_oblique.spacing[0] * 36 / 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_space(space_oblique, (36, 44, 28))
    with pytest.raises(SpaceError, match="axes"):
        feature_space(space_oblique, (1, 9, 11, 7))


# ------------------------------------------------------------------------------ resample


def test_resample_identity_numpy_and_torch(space_oblique):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 3, *space_oblique.shape)).astype(np.float32)
    out = resample(data, space_oblique, space_oblique)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, data)
    assert not np.shares_memory(out, data)
    t = torch.from_numpy(data)
    tout = resample(t, space_oblique, space_oblique)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
    assert torch.equal(tout, t)
    # an equal grid up to rounding (e.g. read back from float32 NIfTI) is still an exact copy
    copy = Space(space_oblique.shape, space_oblique.affine.astype(np.float32))
    np.testing.assert_array_equal(resample(data, space_oblique, copy), data)
    # a 0.01-voxel shift interpolates: values move, but by less than 0.01 x neighbour difference
    shifted = Space(space_oblique.shape, space_oblique.affine @ _affine(origin=(0.01, 0, 0)))
    moved = resample(data, space_oblique, shifted)
    inner = (slice(None), slice(None), slice(0, -1))
    expected = 0.99 * data[inner] + 0.01 * data[:, :, 1:]
    np.testing.assert_allclose(moved[inner], expected, atol=5e-5)


def test_resample_linear_function_axis_order_anisotropic():
    """A linear function is reproduced exactly; distinct axis sizes and weights catch axis swaps."""
    src = Space((5, 7, 9), _affine(spacing=(0.9, 1.7, 2.3), origin=(-3, 4, 11)))

    def f(c):  # c: (..., 3) voxel coordinates
        return 1.0 * c[..., 0] + 10.0 * c[..., 1] + 100.0 * c[..., 2] + 0.5

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in src.shape], indexing="ij"), -1).astype(float)
    data = f(ijk)
    # target: axes permuted and flipped inside the source box, odd shape (4, 3, 6)
    perm = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], dtype=float)
    a = np.eye(4)
    a[:3, :3] = src.affine[:3, :3] @ perm @ np.diag([1.1, 0.8, 0.6])
    a[:3, 3] = src.voxel_to_world([3.9, 1.25, 5.9])
    dst = Space((4, 3, 6), a)
    out = resample(data, src, dst)
    assert out.shape == (4, 3, 6)
    t_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in dst.shape], indexing="ij"), -1)
    src_c = src.world_to_voxel(dst.voxel_to_world(t_ijk.reshape(-1, 3))).reshape(*dst.shape, 3)
    assert src_c.min() > 0 and np.all(src_c.max(axis=(0, 1, 2)) < np.array(src.shape) - 1)
    np.testing.assert_allclose(out, f(src_c), atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resample_matches_nibabel_and_scipy_on_oblique_grids(seed):
    rng = np.random.default_rng(seed)
    src = Space((13, 17, 11), _oblique(seed, rng.uniform(0.6, 2.0, 3), rng.normal(0, 5, 3)))
    centre = src.voxel_to_world(np.array(src.shape) / 2 - 0.5)
    dshape = (15, 12, 14)
    a = _oblique(seed + 10, rng.uniform(0.7, 1.8, 3), (0, 0, 0), flip=(-1, 1, 1))
    a[:3, 3] = centre - a[:3, :3] @ (np.array(dshape) / 2 - 0.5)
    dst = Space(dshape, a)
    data = rng.normal(size=src.shape).astype(np.float32)

    out = resample(data, src, dst, fill=-7.0)
    ref, coords, margin = _reference(data, src, dst, fill=-7.0)
    n = np.array(src.shape)[:, None]
    strictly_inside = np.all((coords > 1e-6) & (coords < n - 1 - 1e-6), axis=0).reshape(dshape)
    assert 0.1 < strictly_inside.mean() < 0.99  # the test covers inside, edge band and outside
    assert (out == -7.0).any()

    img = nib.Nifti1Image(data.astype(np.float64), src.affine)
    nb = nibabel.processing.resample_from_to(img, (dshape, dst.affine), order=1, cval=-7.0)
    nb = np.asarray(nb.dataobj)
    np.testing.assert_allclose(out[strictly_inside], nb[strictly_inside], atol=1e-4)
    # scipy reference, including the clamped edge band and the fill outside
    ok = margin > 1e-6
    np.testing.assert_allclose(out[ok], ref[ok], atol=1e-4)


def test_resample_fill_band_edges():
    rng = np.random.default_rng(5)
    src = Space((4, 5, 6), _affine(spacing=(2, 1, 3)))
    data = rng.random(src.shape).astype(np.float32)

    def at(i, j, k, fill=np.nan):
        dst = Space((1, 1, 1), src.affine @ _affine(origin=(i, j, k)))
        return float(resample(data, src, dst, fill=fill)[0, 0, 0])

    assert at(-0.4, 1, 2) == pytest.approx(data[0, 1, 2], abs=1e-6)  # edge band: clamped
    assert at(3.45, 1, 2) == pytest.approx(data[3, 1, 2], abs=1e-6)
    assert at(1, 4.49, 5.49) == pytest.approx(data[1, 4, 5], abs=1e-6)
    assert np.isnan(at(-0.6, 1, 2))  # beyond the cell edge: fill
    assert np.isnan(at(1, 1, 5.6))
    assert at(1, -0.51, 2, fill=3.5) == 3.5
    assert at(1.5, 2, 2.25) == pytest.approx(
        0.5 * 0.75 * (data[1, 2, 2] + data[2, 2, 2]) + 0.5 * 0.25 * (data[1, 2, 3] + data[2, 2, 3]),
        abs=1e-6,
    )
    # a target entirely outside the field of view
    far = Space((3, 3, 3), _affine(origin=(100, 0, 0)))
    np.testing.assert_array_equal(resample(data, src, far, fill=-1.0), np.full((3, 3, 3), -1.0))


def test_resample_types_devices_and_leading_axes():
    rng = np.random.default_rng(1)
    src = Space((6, 5, 4), _affine(spacing=(2, 2, 2)))
    dst = Space((9, 8, 7), _oblique(4, (1.1, 1.2, 1.3), (1, 2, 3)))
    data64 = rng.normal(size=(2, 3, 6, 5, 4))  # float64 numpy in -> float32 numpy out
    out = resample(data64, src, dst)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3, 9, 8, 7)
    t = torch.from_numpy(data64)  # float64 tensor in -> float32 tensor out, same device
    tout = resample(t, src, dst)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
    assert tout.device == t.device and tout.shape == (2, 3, 9, 8, 7)
    np.testing.assert_allclose(tout.numpy(), out, atol=0)
    # every leading slice equals resampling that slice alone; chunking changes nothing
    single = resample(data64[1, 2], src, dst)
    np.testing.assert_allclose(out[1, 2], single, atol=1e-6)
    np.testing.assert_allclose(resample(data64, src, dst, chunk_voxels=7), out, atol=1e-6)
    # integer input works; wrong trailing shape explains itself
    assert resample(np.ones((6, 5, 4), np.int16), src, src).dtype == np.float32
    with pytest.raises(SpaceError, match=r"\(6, 5, 4\)"):
        resample(np.zeros((6, 5, 5)), src, dst)


def test_resample_2d():
    rng = np.random.default_rng(2)
    rot = np.eye(4)
    rot[:2, :2] = Rotation.from_euler("z", 33, degrees=True).as_matrix()[:2, :2]
    src = Space((11, 14), np.diag([0.8, 1.4, 1, 1]) @ np.eye(4))
    a = rot @ np.diag([0.9, 1.1, 1.0, 1.0])
    a[:2, 3] = [2.0, 3.0]
    dst = Space((13, 9), a)
    data = rng.normal(size=(3, 11, 14)).astype(np.float32)
    out = resample(data, src, dst, fill=-2.0)
    assert out.shape == (3, 13, 9)
    for c in range(3):
        ref, _, margin = _reference(data[c], src, dst, fill=-2.0)
        ok = margin > 1e-6
        np.testing.assert_allclose(out[c][ok], ref[ok], atol=1e-5)
    # feature grid in 2D = bilinear F.interpolate(align_corners=False)
    s = Space((15, 21), a)
    feat = torch.from_numpy(rng.normal(size=(2, 5, 7)).astype(np.float32))
    up = resample(feat, feature_space(s, (5, 7)), s)
    ref2 = F.interpolate(feat[None], size=(15, 21), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(up, ref2, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "in_shape,f_shape", [((35, 45, 27), (7, 9, 3)), ((36, 44, 28), (9, 11, 7)), ((9, 5, 7), (1, 5, 7))]
)
def test_feature_space_resample_equals_interpolate(space_oblique, in_shape, f_shape):
    s = Space(in_shape, space_oblique.affine)
    rng = np.random.default_rng(3)
    feat = torch.from_numpy(rng.normal(size=(2, 3, *f_shape)).astype(np.float32))
    up = resample(feat, feature_space(s, f_shape), s)
    ref = F.interpolate(feat, size=in_shape, mode="trilinear", align_corners=False)
    assert up.shape == ref.shape
    torch.testing.assert_close(up, ref, atol=1e-5, rtol=0)


def test_resample_large_grid_chunked():
    """A 4x4x4 map onto a 512x512x400 oblique scan grid, checked at a few voxels."""
    scan = Space((512, 512, 400), _oblique(11, (0.8, 0.8, 1.0), (-200.0, -180.0, -150.0)))
    # model input: half resolution, 256x256x200 (what Spacing/Resize preprocessing makes)
    inp = Space((256, 256, 200), scan.affine @ _affine(spacing=(2, 2, 2), origin=(0.5, 0.5, 0.5)))
    fs = feature_space(inp, (4, 4, 4))
    feat = np.random.default_rng(4).random((4, 4, 4)).astype(np.float32)
    heat = resample(feat, fs, scan, fill=-1.0)
    assert heat.shape == (512, 512, 400) and heat.dtype == np.float32
    pts = np.array([[0, 0, 0], [511, 511, 399], [100, 200, 300], [255, 256, 200], [7, 500, 13]])
    c = fs.world_to_voxel(scan.voxel_to_world(pts))
    expected = map_coordinates(feat.astype(np.float64), np.clip(c, 0, 3).T, order=1)
    expected[np.any((c < -0.5) | (c > 3.5), axis=1)] = -1.0
    np.testing.assert_allclose(heat[tuple(pts.T)], expected, atol=1e-4)
    # the input grid covers the whole scan: no fill anywhere
    assert heat.min() >= feat.min() - 1e-6 and heat.max() <= feat.max() + 1e-6


# ------------------------------------------------------------------ separable resampling


def _parallel_affine(rng, permutation, signs, spacing, origin):
    """Voxel -> world whose axes are a signed permutation of the world axes, scaled."""
    a = np.zeros((4, 4))
    for voxel_axis, world_axis in enumerate(permutation):
        a[world_axis, voxel_axis] = signs[voxel_axis] * spacing[voxel_axis]
    a[:3, 3] = origin
    a[3, 3] = 1.0
    return a


@pytest.mark.parametrize("seed", range(12))
def test_separable_resample_equals_grid_sample(seed):
    """Axis-parallel grids (anisotropic, flipped, permuted, odd shapes, partly outside): both paths agree."""
    from medcam3d.space import Resampler

    rng = np.random.default_rng(100 + seed)
    rot = Rotation.random(random_state=seed).as_matrix() if seed % 3 else np.eye(3)  # a shared obliquity is fine
    src_shape = tuple(int(n) for n in rng.integers(1, 7, 3))
    if seed == 5:
        src_shape = (40, 3, 37)  # long source axes: the gather path
    src_affine = np.eye(4)
    src_affine[:3, :3] = rot @ np.diag(rng.uniform(4, 16, 3))
    src_affine[:3, 3] = rng.uniform(-30, 30, 3)
    src = Space(src_shape, src_affine)
    perm = rng.permutation(3)
    local = _parallel_affine(rng, perm, rng.choice([-1, 1], 3), rng.uniform(0.6, 3.3, 3), rng.uniform(-25, 25, 3))
    dst_affine = src_affine.copy()
    dst_affine[:3, :3] = rot @ local[:3, :3]
    dst_affine[:3, 3] = src_affine[:3, 3] + rot @ local[:3, 3]
    dst = Space(tuple(int(n) for n in rng.integers(1, 40, 3)), dst_affine)
    fill = [0.0, -2.5, float("nan")][seed % 3]
    data = rng.random((2, *src_shape)).astype(np.float32)
    fast = Resampler(src, dst)
    assert fast.separable and sorted(a.source_axis for a in fast.axes) == [0, 1, 2]
    got = fast(data, fill=fill)
    ref = Resampler(src, dst, separable=False)(data, fill=fill)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, atol=2e-6, equal_nan=True)
    expected, _, margin = _reference(data[1], src, dst, fill=fill)
    ok = margin > 1e-6
    np.testing.assert_allclose(got[1][ok], expected[ok], atol=2e-6, equal_nan=True)
    # column-major layout and sub-grids give the same values
    column = fast(data, fill=fill, layout="F")
    assert column[0].flags["F_CONTIGUOUS"]
    np.testing.assert_allclose(column, got, atol=1e-6, equal_nan=True)  # other order of the 1D steps
    index = [np.unique(rng.integers(0, n, 3)) for n in dst.shape]
    part = fast(data, fill=fill, indices=index)
    np.testing.assert_allclose(part, got[(slice(None), *np.ix_(*index))], atol=1e-6, equal_nan=True)
    # rows along axis 0, finished with the axis weights, rebuild the map
    rows = fast.rows(data[1], 0, fill=fill)
    weights = fast.weights(0)
    full = rows[..., weights.lower] * (1 - weights.weight) + rows[..., weights.upper] * weights.weight
    full = np.moveaxis(full, -1, 0)
    full[~weights.inside] = fill
    np.testing.assert_allclose(full, ref[1], atol=2e-6, equal_nan=True)


def test_separable_fill_and_edge_band_2d_and_gradients():
    from medcam3d.space import Resampler, axis_parallel_maps

    src = Space((4, 5, 6), _affine(spacing=(2, 1, 3)))
    data = np.random.default_rng(6).random(src.shape).astype(np.float32)
    # target voxels at chosen source coordinates along axis 0: -0.6 (outside), -0.5 (edge of the
    # outer cell: inside), -0.25 (edge band: clamped), 0, 1.5, 3.25, 3.5 (inside), 3.6 (outside)
    coordinates = [-0.6, -0.5, -0.25, 0.0, 1.5, 3.25, 3.5, 3.6]
    for c in coordinates:
        dst = Space((1, 1, 1), src.affine @ _affine(origin=(c, 2, 3)))
        assert Resampler(dst, dst).identity
        resampler = Resampler(src, dst)
        assert resampler.separable
        value = float(resampler(data, fill=-7.0)[0, 0, 0])
        if c < -0.5 or c > 3.5:
            assert value == -7.0
        else:
            clamped = min(max(c, 0.0), 3.0)
            lower = min(int(np.floor(clamped)), 2)
            w = clamped - lower
            assert value == pytest.approx((1 - w) * data[lower, 2, 3] + w * data[lower + 1, 2, 3], abs=1e-6)
    # a 1-voxel source axis covers [-0.5, 0.5] with its one value
    thin = Space((4, 1, 6), _affine(spacing=(2, 1, 3)))
    across = Space((1, 5, 1), thin.affine @ _affine(spacing=(1, 0.3, 1), origin=(1, -0.6, 2)))
    values = Resampler(thin, across)(data[:, :1], fill=9.0)[0, :, 0]
    np.testing.assert_allclose(values, [9.0, data[1, 0, 2], data[1, 0, 2], data[1, 0, 2], 9.0], atol=1e-6)
    # oblique grids are not separable and keep grid_sample
    oblique = Space((5, 5, 5), _oblique(3, (1, 1, 1), (0, 0, 0)))
    assert axis_parallel_maps(src, oblique) is None and not Resampler(src, oblique).separable
    with pytest.raises(SpaceError, match="not parallel"):
        Resampler(src, oblique, separable=True)
    # 2D, flipped and transposed
    src2 = Space((5, 7), np.diag([3.0, 2.0, 1.0, 1.0]))
    a = np.zeros((4, 4))
    a[0, 1], a[1, 0], a[2, 2], a[3, 3] = -1.3, 0.7, 1.0, 1.0
    a[:2, 3] = [14.0, -1.0]
    dst2 = Space((17, 11), a)
    data2 = np.random.default_rng(7).random((3, 5, 7)).astype(np.float32)
    assert Resampler(src2, dst2).separable
    np.testing.assert_allclose(Resampler(src2, dst2)(data2, fill=0.5),
                               Resampler(src2, dst2, separable=False)(data2, fill=0.5), atol=2e-6)
    # differentiable like the grid_sample path
    dst3 = Space((9, 7, 11), src.affine @ _affine(spacing=(0.45, 0.7, 0.6), origin=(-0.3, 0.2, 0.1)))
    x = torch.from_numpy(data).requires_grad_(True)
    y = torch.from_numpy(data).requires_grad_(True)
    (Resampler(src, dst3)(x, fill=1.0) ** 2).sum().backward()
    (Resampler(src, dst3, separable=False)(y, fill=1.0) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------ nearest neighbour


def _nearest_reference(labels, src, dst, fill):
    """Independent nearest-neighbour pull-resampling: scipy's order-0 lookup of each target voxel
    centre (rounded to the nearest source voxel, the edge voxel beyond the outermost centres), ``fill``
    outside the field of view ``[-0.5, n - 0.5]``; and each coordinate's distance to a cell edge."""
    nd = len(src.shape)
    m = np.linalg.inv(src.affine) @ dst.affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in dst.shape], indexing="ij")).reshape(nd, -1)
    coords = m[:nd, :nd] @ idx + m[:nd, 3:4]
    n = np.array(src.shape, dtype=float)[:, None]
    inside = np.all((coords >= -0.5) & (coords <= n - 0.5), axis=0)
    out = map_coordinates(labels, coords, order=0, mode="nearest")
    out[~inside] = fill
    edge = np.abs(coords - 0.5 - np.round(coords - 0.5))  # cell edges (and the field of view's) are at k + 0.5
    return out.reshape(dst.shape), float(edge.min())


def test_resample_nearest_oblique_anisotropic_equals_reference():
    rng = np.random.default_rng(11)
    src = Space((11, 9, 7), _affine(spacing=(0.8, 1.3, 2.5), origin=(-10.0, 5.0, 3.0)))
    labels = rng.integers(0, 5, src.shape).astype(np.int16)
    rotation = Rotation.from_euler("xyz", [17, -23, 31], degrees=True).as_matrix()
    dst = Space((13, 10, 6), _affine(rotation, (1.1, 0.7, 1.9), (-9.3, 4.1, 1.7), flip=(1, -1, 1)))
    expected, edge = _nearest_reference(labels, src, dst, fill=-1)
    assert edge > 1e-6  # no centre on a cell edge: the rounding is unambiguous
    assert (expected == -1).any() and (expected != -1).any()  # partly outside the source's view
    resampler = Resampler(src, dst)
    assert not resampler.separable  # oblique: the target is processed in slabs
    out = resampler(labels, fill=-1, mode="nearest")
    assert out.dtype == np.int16 and out.shape == dst.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resample(labels, src, dst, fill=-1, mode="nearest"), expected)
    # slabs, leading axes, tensors, column-major layout and index subsets change nothing
    np.testing.assert_array_equal(resampler(labels, fill=-1, mode="nearest", chunk_voxels=37), expected)
    stacked = torch.from_numpy(np.stack([labels, labels + 5]))
    tout = resampler(stacked, fill=-1, mode="nearest", chunk_voxels=100)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.int16 and tout.shape == (2, *dst.shape)
    np.testing.assert_array_equal(tout[1].numpy(), np.where(expected == -1, -1, expected + 5))
    f = resampler(labels, fill=-1, mode="nearest", layout="F")
    assert f.flags.f_contiguous
    np.testing.assert_array_equal(f, expected)
    picks = [np.array([0, 5, 12]), np.array([9, 2]), np.arange(6)]
    np.testing.assert_array_equal(resampler(labels, fill=-1, mode="nearest", indices=picks), expected[np.ix_(*picks)])


def test_resample_nearest_axis_parallel_equals_reference():
    rng = np.random.default_rng(12)
    src = Space((11, 9, 7), _affine(spacing=(0.8, 1.3, 2.5), origin=(-10.0, 5.0, 3.0)))
    labels = rng.integers(0, 200, src.shape).astype(np.uint8)
    a = np.zeros((4, 4))  # target axes: world y, -x, z; anisotropic, partly outside the source
    a[1, 0], a[0, 1], a[2, 2], a[3, 3] = 1.1, -0.6, 1.7, 1.0
    a[:3, 3] = [-1.37, 3.73, 1.13]
    dst = Space((12, 14, 9), a)
    expected, edge = _nearest_reference(labels, src, dst, fill=0)
    assert edge > 1e-6 and (expected == 0).any()
    resampler = Resampler(src, dst)
    assert resampler.separable
    for out in (resampler(labels, mode="nearest"), Resampler(src, dst, separable=False)(labels, mode="nearest"),
                resampler(torch.from_numpy(labels), mode="nearest").numpy()):
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    # a mask stays a mask
    mask = labels > 100
    np.testing.assert_array_equal(resample(mask, src, dst, mode="nearest", fill=False), expected > 100)
    # 2D grids, flipped and transposed
    src2 = Space((5, 7), np.diag([3.0, 2.0, 1.0, 1.0]))
    a2 = np.zeros((4, 4))
    a2[0, 1], a2[1, 0], a2[2, 2], a2[3, 3] = -1.3, 0.7, 1.0, 1.0
    a2[:2, 3] = [14.03, -1.02]
    dst2 = Space((17, 11), a2)
    labels2 = rng.integers(0, 9, src2.shape)
    expected2, edge2 = _nearest_reference(labels2, src2, dst2, fill=-3)
    assert edge2 > 1e-6
    np.testing.assert_array_equal(resample(labels2, src2, dst2, mode="nearest", fill=-3), expected2)
    with pytest.raises(ValueError, match="mode"):
        resample(labels, src, dst, mode="cubic")
