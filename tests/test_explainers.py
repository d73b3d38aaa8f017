"""Explainer values: analytic identities and an independent reference per method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import SEResNet50
from torch import nn

import medcam3d
from medcam3d.methods import METHODS, get_method
from _models import densenet121_3d, flatten_linear_cnn, gap_linear_cnn, reference_activations_and_gradients, resnet18_3d


def spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize("dims, shape", [(3, (2, 1, 9, 12, 7)), (2, (2, 1, 15, 11))])
def test_cam_equals_gradcam_times_voxels_and_hirescam_equals_gradcam_on_gap_head(dims, shape):
    model = gap_linear_cnn(dims)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    cam = medcam3d.Explainer(model, "cam", layer="3")(x, "all", relu=False).maps
    grad_cam = medcam3d.Explainer(model, "gradcam", layer="3")(x, "all", relu=False).maps
    hires = medcam3d.Explainer(model, "hirescam", layer="3")(x, "all", relu=False).maps
    voxels = grad_cam[0, 0].numel()
    assert voxels > 1
    torch.testing.assert_close(cam, grad_cam * voxels, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hires, grad_cam, rtol=1e-5, atol=1e-7)
    assert cam.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("input_shape", [(1, 1, 9, 12, 7), (3, 1, 10, 8, 6), (2, 1, 13, 9)])
def test_hirescam_sums_to_logit_minus_bias_on_flatten_linear_head(input_shape):
    feature_shape = tuple((s + 1) // 2 for s in input_shape[2:])
    model = flatten_linear_cnn(feature_shape, classes=5)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(2))
    result = medcam3d.Explainer(model, "hirescam", layer="2")(x, "all", relu=False)
    assert result.feature_shape == feature_shape
    completeness = result.maps.flatten(start_dim=2).sum(dim=2)
    expected = result.logits - model[-1].bias.detach()
    relative = (completeness - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4
    # Grad-CAM is not complete on this head: the identity is what sets HiResCAM apart.
    grad_cam = medcam3d.Explainer(model, "gradcam", layer="2")(x, "all", relu=False).maps
    assert (grad_cam.flatten(start_dim=2).sum(dim=2) - expected).abs().max() / expected.abs().max() > 1e-2


# ------------------------------------------------------ independent reference
def reference_map(method: str, A: torch.Tensor, G: torch.Tensor, head_row: torch.Tensor | None) -> torch.Tensor:
    """Each method from its formula, one sample: A, G of shape (K, *spatial)."""
    axes = tuple(range(1, A.ndim))
    K = A.shape[0]
    per_channel = lambda w: w.reshape(K, *([1] * (A.ndim - 1)))  # noqa: E731
    if method == "cam":
        return (per_channel(head_row) * A).sum(0)
    if method == "gradcam":
        return (per_channel(G.mean(dim=axes)) * A).sum(0)
    if method == "hirescam":
        return (G * A).sum(0)
    if method == "layercam":
        return (torch.relu(G) * A).sum(0)
    if method == "xgradcam":
        sums = A.sum(dim=axes)
        alpha = torch.where(sums != 0, (G * A).sum(dim=axes) / torch.where(sums != 0, sums, 1.0), 0.0)
        return (per_channel(alpha) * A).sum(0)
    if method == "gradcam++":
        weights = []
        for k in range(K):  # literally per channel, as in the paper
            g, a = G[k], A[k]
            denominator = 2 * g**2 + a.sum() * g**3
            alpha = torch.where(g != 0, g**2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
            weights.append((alpha * torch.relu(g)).sum())
        return (per_channel(torch.stack(weights)) * A).sum(0)
    if method == "eigencam":
        flat = A.reshape(K, -1).double()
        _, vectors = torch.linalg.eigh(flat @ flat.T)  # eigenvectors of the channel Gram matrix
        v = vectors[:, -1]
        projection = (v[:, None] * flat).sum(0)
        projection = projection if projection.sum() >= 0 else -projection
        return projection.reshape(A.shape[1:]).float()
    raise AssertionError(method)


def densenet121():
    return densenet121_3d(classes=6)


def resnet18():
    return resnet18_3d(classes=6)


def seresnet50_3d():
    torch.manual_seed(0)
    return SEResNet50(spatial_dims=3, in_channels=1, num_classes=6).eval()


NETWORKS = {
    # name: (factory, target layer, input shape, head attribute for CAM)
    "densenet121-norm5": (densenet121, "features.norm5", (1, 1, 67, 75, 61), None),
    "densenet121-relu": (densenet121, "class_layers.relu", (1, 1, 67, 75, 61), "class_layers.out"),
    "resnet18": (resnet18, "layer4", (1, 1, 37, 45, 29), "fc"),
    "seresnet50": (seresnet50_3d, "layer4", (1, 1, 37, 45, 29), "last_linear"),
}


@pytest.fixture(scope="module", params=list(NETWORKS))
def network(request):
    factory, layer, shape, head = NETWORKS[request.param]
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    return request.param, model, layer, x, head


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if cls.level == "layer"])  # the CAM family
def test_each_method_matches_reference_on_monai_networks(network, method):
    name, model, layer, x, head = network
    if method == "cam" and head is None:
        # DenseNet's norm5 is followed by a ReLU, not GAP: CAM must refuse rather than guess.
        with pytest.raises(medcam3d.LayerError, match="global average pooling"):
            medcam3d.Explainer(model, method, layer=layer)(x, target=2)
        return
    result = medcam3d.Explainer(model, method, layer=layer)(x, target=[2, 4], relu=False)
    assert result.maps.shape[:2] == (1, 2)
    for t, class_index in enumerate([2, 4]):
        A, G = reference_activations_and_gradients(model, layer, x, lambda out: out[:, class_index].sum())
        head_row = dict(model.named_modules())[head].weight.detach()[class_index] if head else None
        expected = reference_map(method, A[0], G[0], head_row)
        scale = expected.abs().max()
        assert scale > 0
        torch.testing.assert_close(result.maps[0, t], expected, rtol=1e-4, atol=1e-5 * float(scale))


def test_inplace_relu_after_layer_uses_the_layers_own_output():
    """DenseNet's norm5 is followed by ReLU(inplace=True): activations must be pre-ReLU."""
    model = densenet121()
    x = torch.randn(1, 1, 67, 75, 61, generator=torch.Generator().manual_seed(4))
    norm5 = {}
    def keep(module, inputs, output):
        norm5["A"] = output.clone()  # returns None: the network keeps its own tensor

    handle = model.features.norm5.register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert (norm5["A"] < 0).any()  # the ReLU will change this tensor in place
    result = medcam3d.Explainer(model, "gradcam", layer="features.norm5")(x, target=1, relu=False)
    A, G = reference_activations_and_gradients(model, "features.norm5", x, lambda out: out[:, 1].sum())
    torch.testing.assert_close(A, norm5["A"])
    expected = (G.mean(dim=(2, 3, 4), keepdim=True) * A).sum(1)
    torch.testing.assert_close(result.maps[:, 0], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------- all classes, batches
@pytest.mark.parametrize("method", ["hirescam", "gradcam", "gradcam++", "layercam", "xgradcam", "cam"])
def test_all_classes_equal_one_by_one(method):
    model = resnet18()
    x = torch.randn(2, 1, 37, 45, 29, generator=torch.Generator().manual_seed(5))
    explainer = medcam3d.Explainer(model, method)
    together = explainer(x, target="all", relu=False)
    assert together.targets == list(range(6))
    for c in range(6):
        alone = explainer(x, target=c, relu=False)
        torch.testing.assert_close(together.maps[:, c], alone.maps[:, 0], rtol=1e-5, atol=1e-6)


def test_batched_vjp_equals_loop():
    model = resnet18()
    x = torch.randn(2, 1, 37, 45, 29, generator=torch.Generator().manual_seed(6))
    batched = medcam3d.Explainer(model)
    looped = medcam3d.Explainer(model)
    looped._batched_vjp = False
    torch.testing.assert_close(batched(x, "all", relu=False).maps, looped(x, "all", relu=False).maps)
    assert batched._batched_vjp  # the batched path was actually taken


def test_per_sample_targets_equal_samples_one_by_one():
    model = resnet18()
    x = torch.randn(3, 1, 37, 45, 29, generator=torch.Generator().manual_seed(7))
    explainer = medcam3d.Explainer(model, "gradcam")
    classes = torch.tensor([5, 0, 3])
    batch = explainer(x, target=classes)
    assert batch.targets == [[5], [0], [3]]
    for b in range(3):
        alone = explainer(x[b : b + 1], target=int(classes[b]))
        torch.testing.assert_close(batch.maps[b], alone.maps[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch.scores[b, 0], alone.logits[0, int(classes[b])])


def test_predicted_target_is_argmax_per_sample():
    model = resnet18()
    x = torch.randn(3, 1, 37, 45, 29, generator=torch.Generator().manual_seed(8))
    result = medcam3d.Explainer(model)(x, target="predicted")
    assert result.class_indices[:, 0].tolist() == result.logits.argmax(1).tolist()


def test_class_names_resolve():
    model = gap_linear_cnn(3, classes=3)
    x = torch.randn(1, 1, 8, 8, 8)
    explainer = medcam3d.Explainer(model, class_names=["nodule", "effusion", "normal"])
    by_name = explainer(x, target=["effusion", "nodule"])
    by_index = explainer(x, target=[1, 0])
    torch.testing.assert_close(by_name.maps, by_index.maps)
    assert by_name.target_names() == ["effusion", "nodule"]


def test_eigencam_is_class_agnostic_and_positive():
    model = resnet18()
    x = torch.randn(1, 1, 37, 45, 29, generator=torch.Generator().manual_seed(9))
    result = medcam3d.Explainer(model, "eigencam")(x, target="all", relu=False)
    assert torch.equal(result.maps[:, 0], result.maps[:, 5])
    assert result.maps.sum() > 0


def test_binary_single_logit_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1))
    x = torch.randn(2, 1, 6, 7, 5)
    explainer = medcam3d.Explainer(model, "hirescam", layer="1")
    both = explainer(x, target="all", relu=False)
    assert both.targets == [0, 1]
    torch.testing.assert_close(both.maps[:, 0], -both.maps[:, 1])
    torch.testing.assert_close(both.scores[:, 1], both.logits[:, 0])
    predicted = explainer(x, target="predicted")
    assert predicted.class_indices[:, 0].tolist() == (both.logits[:, 0] > 0).long().tolist()
    with pytest.raises(medcam3d.TargetIndexError, match="single-logit"):
        explainer(x, target=2)


def test_metatensor_input_keeps_affine():
    from monai.data import MetaTensor

    model = gap_linear_cnn(3)
    affine = torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.randn(1, 1, 8, 8, 8), affine=affine)
    result = medcam3d.Explainer(model, layer="3")(x, target=0)
    assert isinstance(result.maps, torch.Tensor) and not hasattr(result.maps, "affine")
    assert result.input_affine is not None
    assert (result.input_affine.reshape(-1, 4, 4)[0] == affine.numpy()).all()
    # the explanation owns its affine: moving the input's affine to shared memory (as a queue to another
    # process does) or editing it in place must not change it
    recorded = result.input_affine.copy()
    x.affine.share_memory_()
    x.affine.mul_(0)
    np.testing.assert_array_equal(result.input_affine, recorded)


def test_registry_names_and_did_you_mean():
    assert set(METHODS) == {"cam", "gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "eigencam",
                            "fused", "gradxinput", "smoothgrad", "integrated_gradients", "occlusion", "scorecam"}
    assert {name for name, cls in METHODS.items() if cls.level == "layer"} == {
        "cam", "gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "eigencam"}
    assert get_method("Grad-CAM++").name == "gradcam++"
    assert get_method("HiResCAM").name == "hirescam"
    with pytest.raises(medcam3d.MethodNotFoundError, match="Did you mean 'hirescam'"):
        get_method("hirescan")
    with pytest.raises(ValueError, match="Available methods"):
        medcam3d.Explainer(gap_linear_cnn(), method="nonsense")


def test_the_model_loader_owns_the_preprocessing(tmp_path, monkeypatch):
    """A config's own preprocessing has one owner, the loader (``ConfiguredModel.preprocessing``): an nnU-Net
    folder's plans.json is read once per explainer however it was made, and ``Explainer.preprocess`` gives the
    tensor and grid that the CLI's path (``load_configured``) gives."""
    pytest.importorskip("nnunetv2", reason="needs the extra medcam3d[nnunet] (.ci/run installs it)")
    from pathlib import Path

    from medcam3d.config import load_config
    from medcam3d.demo.nnunet_folder import write_model_folder, write_scan
    import medcam3d.models
    from medcam3d.models import load_configured, load_preprocessing

    folder = write_model_folder(tmp_path / "models", folds=(0,))
    scan = write_scan(tmp_path / "scan.nii.gz")
    config = tmp_path / "nnunet.yaml"
    config.write_text(f"model:\n  nnunet: {folder}\n  folds: [0]\n", encoding="utf-8")
    reads: list[str] = []
    read_text = Path.read_text

    def counted(path, *args, **kwargs):
        reads.append(path.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    configured = load_configured(load_config(config))  # what the CLI's Runner reads with
    expected, expected_space = configured.preprocessing(scan)
    assert reads.count("plans.json") == 1

    reads.clear()
    explainer = medcam3d.Explainer.from_config(config)
    first, space = explainer.preprocess(scan)
    again, _ = explainer.preprocess(scan)
    assert reads.count("plans.json") == 1 and reads.count("dataset.json") == 1  # with the model, and only then

    reads.clear()
    asked = []

    def loader(config, **kwargs):  # the loader's own function: the explainer builds no preprocessing itself
        asked.append(config.model.nnunet)
        return load_preprocessing(config, **kwargs)

    monkeypatch.setattr(medcam3d.models, "load_preprocessing", loader)
    given = medcam3d.Explainer.from_config(config, model=configured.model)
    (own, own_space), _ = given.preprocess(scan), given.preprocess(scan)
    assert reads.count("plans.json") == 1 and asked == [folder]  # read by the loader once, on the first call

    for x in (first, again, own):
        assert torch.equal(x.as_tensor(), expected.as_tensor())
        np.testing.assert_array_equal(np.asarray(x.affine), np.asarray(expected.affine))
    assert space == expected_space and own_space == expected_space
