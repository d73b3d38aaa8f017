"""Sanity checks: the model-parameter randomization test (Adebayo et al., 2018), in 3D.

A map that explains the *model* must change when the model's weights are replaced by random
ones. :func:`randomization_test` re-initializes the layers of a deep copy of the model from the
output down, cumulatively (cascading), and compares each method's map on every randomized copy
with the map on the trained model: Spearman rank correlation and SSIM (MONAI's, Gaussian window, 2D or 3D).
HiResCAM and Grad-CAM pass (their maps decorrelate); Guided Backprop and Guided Grad-CAM fail
(their maps stay close to an edge map of the input whatever the weights are). Those two are here
only for this comparison and warn when used.

The user's model is never modified: every method that needs different hooks or re-initialized
weights works on ``copy.deepcopy(model)``, copied while holding :func:`medcam3d.hooks.model_lock`
(so never mid-way through another thread's explanation). The re-initialization draws from a
private copy of the random state: the caller's global RNG is left as it was.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import forward_hooks, model_lock
from ..model_io import first_tensor, model_output, to_model_input

__all__ = [
    "GUIDED_GRADCAM_WARNING",
    "GUIDED_WARNING",
    "RandomizationReport",
    "guided_backprop",
    "guided_gradcam",
    "method_maps",
    "randomization_test",
    "spearman",
    "ssim",
]

GUIDED_GRADCAM_WARNING = (
    "Guided Grad-CAM inherits Guided Backprop's failure of the model-parameter randomization test (Adebayo "
    "et al., 2018): its fine detail is Guided Backprop's, which barely changes when the model's weights are "
    "randomized (only the coarse Grad-CAM factor responds). medcam3d provides it only for that comparison "
    "(medcam3d.metrics.sanity.randomization_test); use method='hirescam' to explain a model."
)
GUIDED_WARNING = (
    "{name} fails the model-parameter randomization test (Adebayo et al., 2018): its map barely changes when "
    "the model's weights are randomized, so it shows structure of the input (edges), not what the model "
    "used. medcam3d provides it only for that comparison (medcam3d.metrics.sanity.randomization_test); "
    "use method='hirescam' to explain a model."
)


# ------------------------------------------------------------------------------- similarities
def _flat(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def spearman(a: object, b: object) -> float:
    """Spearman rank correlation of two maps of the same shape (ties get average ranks).

    Returns
    -------
    float
        In [-1, 1]. A constant map has no ranking: 1.0 when the maps are equal, else 0.0.
    """
    from scipy.stats import rankdata

    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"Maps of shapes {a.shape} and {b.shape} cannot be compared; compute both on one grid.")
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(np.clip(np.dot(ra, rb) / np.sqrt(np.dot(ra, ra) * np.dot(rb, rb)), -1.0, 1.0))


def ssim(a: object, b: object, *, sigma: float = 1.5, data_range: float | None = None) -> float:
    """Mean structural similarity of two maps (2D or 3D) with a Gaussian window (MONAI's SSIM).

    :class:`monai.metrics.SSIMMetric` averages over the voxels whose window fits inside the
    map, which leaves nothing of a small feature-grid map (e.g. 6³ with an 11-voxel window).
    The maps are therefore mirrored by the window's radius first (edge voxel repeated), so
    that every voxel gets a full window and the mean runs over the map's own voxels.

    Parameters
    ----------
    a, b : (*shape) arrays
        Two maps of one shape, 2D or 3D.
    sigma : float
        Standard deviation of the Gaussian window in voxels; the window is truncated at
        ``3.5 σ`` (11 voxels for σ = 1.5).
    data_range : float, optional
        Dynamic range L for the constants ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``; default
        ``max(a, b) − min(a, b)`` (1.0 when both are constant).

    Returns
    -------
    float
        In [-1, 1]; 1.0 for identical maps.
    """
    from monai.metrics import SSIMMetric

    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"Maps of shapes {a.shape} and {b.shape} cannot be compared; compute both on one grid.")
    if a.ndim not in (2, 3):
        raise ValueError(f"SSIM compares 2D or 3D maps, not maps of shape {a.shape}; pass one map per call.")
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min())) or 1.0
    radius = int(3.5 * sigma + 0.5)
    # Scaled to a unit range (SSIM is invariant to a common scale with L), then computed in float32 by MONAI.
    padded = [torch.as_tensor(np.pad(v / data_range, radius, mode="symmetric"))[None, None] for v in (a, b)]
    metric = SSIMMetric(spatial_dims=a.ndim, data_range=1.0, kernel_type="gaussian", win_size=2 * radius + 1,
                        kernel_sigma=sigma)
    return float(cast(torch.Tensor, metric(*padded)).mean())  # a tensor for tensor inputs


def _unit(value: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1]; a flat map becomes zeros."""
    low, high = float(value.min()), float(value.max())
    return (value - low) / (high - low) if high > low else np.zeros_like(value)


# ---------------------------------------------------------------------------- guided methods
def _class_scores(outputs: object, target: object) -> torch.Tensor:
    outputs = first_tensor(outputs)
    if outputs.ndim != 2:
        raise ValueError(f"Guided Backprop here needs a classifier with (B, C) logits, not {tuple(outputs.shape)}.")
    batch = outputs.shape[0]
    index = torch.as_tensor(target, device=outputs.device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch or int(index.min()) < 0 or int(index.max()) >= outputs.shape[1]:
        raise ValueError(f"target must be one class index in [0, {outputs.shape[1]}) or one per sample, not {target!r}.")
    return outputs.gather(1, index[:, None]).sum()


def _guided_gradients(model: nn.Module, x: torch.Tensor, target: object) -> torch.Tensor:
    """Input gradients with the guided ReLU rule, on a deep copy. (B, C_in, *spatial)."""
    with model_lock(model):  # copy a model at rest, not one mid-way through another thread's call
        guided = copy.deepcopy(model).eval()
    for parameter in guided.parameters():
        parameter.requires_grad_(False)  # input gradients only
    relus = [m for m in guided.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU modules, so there is no guided rule to apply "
                         "(functional relu calls cannot be hooked).")
    handles = []
    for relu in relus:
        relu.inplace = False  # on the copy only: full backward hooks need out-of-place outputs
        # the ReLU's own backward already zeroes where its input was ≤ 0; keep positive gradients only
        handles.append(relu.register_full_backward_hook(lambda _m, grad_in, _out: (cast("tuple[torch.Tensor, ...]", grad_in)[0].clamp_min(0),)))
    inputs = to_model_input(x, guided).requires_grad_(True)
    try:
        with torch.enable_grad():
            score = _class_scores(guided(inputs), target)
            (gradients,) = torch.autograd.grad(score, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return gradients.detach()


def guided_backprop(model: nn.Module, x: torch.Tensor, target: object, *, absolute: bool = False) -> torch.Tensor:
    """Guided Backprop (Springenberg et al., 2015) — for the randomization comparison only.

    Backpropagates the class logit to the input, with every ``nn.ReLU``'s backward replaced by
    the guided rule (pass only positive gradients where the input was positive), via hooks on a
    deep copy of the model. Emits a ``UserWarning``: it fails the randomization test.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    x : (B, C_in, *spatial) Tensor
    target : int or (B,) class indices
    absolute : bool
        Sum of absolute values over input channels; default: the signed sum (the raw method,
        which resembles the input image — the reason it fails the randomization test).

    Returns
    -------
    (B, *spatial) Tensor, on the input grid
    """
    warnings.warn(GUIDED_WARNING.format(name="Guided Backprop"), UserWarning, stacklevel=2)
    gradients = _guided_gradients(model, x, target)
    return (gradients.abs() if absolute else gradients).sum(dim=1).float()


def guided_gradcam(model: nn.Module, x: torch.Tensor, target: object, *, layer: str | nn.Module = "auto") -> torch.Tensor:
    """Guided Grad-CAM: Guided Backprop × Grad-CAM upsampled to the input grid — comparison only.

    Emits a ``UserWarning``: it fails the randomization test.

    Returns
    -------
    (B, *spatial) Tensor, on the input grid
    """
    from ..explainer import Explainer

    warnings.warn(GUIDED_GRADCAM_WARNING, UserWarning, stacklevel=2)
    gradients = _guided_gradients(model, x, target).sum(dim=1)
    target_tensor = torch.as_tensor(target).long().reshape(-1)
    cam = Explainer(model, method="gradcam", layer=layer)(x, target=target_tensor if target_tensor.numel() > 1 else int(target_tensor))
    maps = cam.maps[:, :1].to(gradients.device)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.ndim - 2]
    upsampled = F.interpolate(maps, size=tuple(gradients.shape[1:]), mode=mode, align_corners=False)[:, 0]
    return (gradients * upsampled).float()


def method_maps(model: nn.Module, method: str, x: torch.Tensor, target: object, *, layer: str | nn.Module = "auto",
                relu: bool = True, grid_shape: Sequence[int] | None = None) -> np.ndarray:
    """One map per sample for ``target`` from any CAM method, ``guided_backprop`` or ``guided_gradcam``.

    Parameters
    ----------
    relu : bool
        For the CAM methods (False: signed maps).
    grid_shape : sequence of int, optional
        Average-pool the guided methods' input-grid maps onto this grid (e.g. the CAM feature
        grid, so that all methods are compared at one resolution).

    Returns
    -------
    (B, *spatial) float ndarray
        CAM methods: on the target layer's grid. Guided methods: their magnitude (``|·|``, as
        they are displayed), on the input grid or on ``grid_shape``.
    """
    key = method.lower().replace("-", "_").replace(" ", "_")
    if key in ("guided_backprop", "guidedbackprop", "gbp", "guided_gradcam", "guidedgradcam"):
        if "cam" in key:
            maps = guided_gradcam(model, x, target, layer=layer).abs()
        else:
            maps = guided_backprop(model, x, target, absolute=True)
        if grid_shape is not None and tuple(maps.shape[1:]) != tuple(grid_shape):
            pool: Callable[[torch.Tensor, Any], torch.Tensor] = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[maps.ndim - 1]
            maps = pool(maps[:, None], tuple(int(n) for n in grid_shape))[:, 0]
        return maps.cpu().numpy()
    from ..explainer import Explainer

    target_tensor = torch.as_tensor(target).long().reshape(-1)
    explainer = Explainer(model, method=method, layer=layer)
    explanation = explainer(x, target=target_tensor if target_tensor.numel() > 1 else int(target_tensor), relu=relu)
    return explanation.maps[:, 0].cpu().numpy()


# -------------------------------------------------------------------------- randomization test
@dataclass
class RandomizationReport:
    """Similarity of each method's map to its original after cascading randomization.

    Attributes
    ----------
    steps : list of str
        Label of each cascade step: the lowest (closest to the input) module re-initialized so far.
    randomized : list of list of str
        The modules re-initialized at each step (cumulative: step s includes all of 0 … s).
    spearman, ssim : dict method -> (S,) ndarray
        Mean over samples of the similarity between the original and the randomized map
        (SSIM on maps min–max scaled to [0, 1]).
    threshold : float
        A method passes when its mean ``|spearman|`` over the cascade steps is below it.
    layer : str
        Target layer of the CAM methods.
    relu : bool
        Whether the CAM maps compared were ReLU'd (default: signed).
    grid_shape : tuple of int or None
        The grid the guided methods' maps were pooled onto (None: their input grid).
    """

    steps: list[str]
    randomized: list[list[str]]
    spearman: dict[str, np.ndarray] = field(default_factory=dict)
    ssim: dict[str, np.ndarray] = field(default_factory=dict)
    threshold: float = 0.5
    layer: str = ""
    relu: bool = False
    grid_shape: tuple[int, ...] | None = None

    @property
    def methods(self) -> list[str]:
        """Methods in the report."""
        return list(self.spearman)

    def final_spearman(self, method: str) -> float:
        """``spearman`` after the last (full) randomization step."""
        return float(self.spearman[method][-1])

    def mean_abs_spearman(self, method: str) -> float:
        """Mean ``|spearman|`` over the cascade steps."""
        return float(np.mean(np.abs(self.spearman[method])))

    def passes(self, method: str) -> bool:
        """True when the map decorrelated along the cascade: mean ``|spearman|`` over the steps < threshold.

        A map that explains the model must change as soon as the upper layers are random, not
        only once the input layer's filters are (which changes any input-gradient map).
        """
        return self.mean_abs_spearman(method) < self.threshold

    def rows(self) -> list[dict]:
        """One row per (method, step) for a CSV."""
        return [
            {"method": method, "step": index + 1, "randomized_down_to": label, "modules": len(self.randomized[index]),
             "spearman": round(float(self.spearman[method][index]), 4), "ssim": round(float(self.ssim[method][index]), 4)}
            for method in self.methods for index, label in enumerate(self.steps)
        ]

    def to_markdown(self) -> str:
        """A Markdown table: per method, the similarity after the first and the last step, and pass/fail."""
        lines = [
            "| method | Spearman, top layer random | mean \\|Spearman\\| over the cascade | Spearman, all random | "
            "SSIM, all random | test |",
            "|---|---|---|---|---|---|",
        ]
        for method in self.methods:
            verdict = "passes" if self.passes(method) else "**FAILS**"
            lines.append(f"| {method} | {self.spearman[method][0]:.3f} | {self.mean_abs_spearman(method):.3f} | "
                         f"{self.spearman[method][-1]:.3f} | {self.ssim[method][-1]:.3f} | {verdict} |")
        return "\n".join(lines) + "\n"


def _parameter_modules_in_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, in the order they first run in a forward pass."""
    owners = {module: name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))}
    order: list[nn.Module] = []
    seen: set[int] = set()

    def record(module, _inputs, _output):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    with model_lock(model), forward_hooks((module, record) for module in owners), torch.no_grad():
        model_output(model, to_model_input(x, model))
    return [(owners[m], m) for m in order]


@contextmanager
def _private_rng(module: nn.Module, seed: int) -> Iterator[None]:
    """Seed the generators of the module's devices for a block; the caller's RNG states are restored after."""
    devices = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device()
                      for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


def _reinitialize(module: nn.Module, generator_seed: int) -> None:
    with _private_rng(module, generator_seed):
        _reset(module)


def _reset(module: nn.Module) -> None:
    """Random parameters for one module (``nn.init`` draws from the global generators)."""
    if hasattr(module, "reset_parameters"):
        reset: Callable[[], None] = getattr(module, "reset_parameters")  # nn.Module.__getattr__ is typed Tensor | Module
        reset()
        if isinstance(module, nn.modules.batchnorm._NormBase):
            # reset_parameters gives γ=1, β=0 (an identity in eval): draw them instead, so that the
            # layer's learned scale is really replaced by random values
            with torch.no_grad():
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
        return
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            nn.init.normal_(parameter, std=0.02)


def randomization_test(
    model: nn.Module,
    x: torch.Tensor,
    target: object,
    *,
    methods: Sequence[str] = ("hirescam", "gradcam", "guided_backprop"),
    layer: str | nn.Module = "auto",
    max_steps: int | None = None,
    threshold: float = 0.5,
    relu: bool = False,
    common_grid: bool = True,
    ssim_sigma: float = 1.5,
    seed: int = 0,
) -> RandomizationReport:
    """Cascading model-parameter randomization test on a deep copy of the model.

    Parameters
    ----------
    model : nn.Module
        Never modified (its ``state_dict`` is unchanged afterwards).
    x : (B, C_in, *spatial) Tensor
    target : int or (B,) class indices
        The class explained (the same on the original and the randomized copies).
    methods : sequence of str
        CAM methods (``hirescam``, ``gradcam``, ...) and ``guided_backprop`` / ``guided_gradcam``.
    layer : str, nn.Module or "auto"
        Target layer of the CAM methods, resolved once on the original model.
    max_steps : int, optional
        Group the parameterized modules (top to bottom) into at most this many cascade steps;
        default one step per module.
    threshold : float
        Pass/fail bound on the mean ``|spearman|`` over the cascade steps.
    relu : bool
        Compare the CAM methods' maps after ReLU. Default False: signed maps, which keep a ranking
        where a ReLU map would be all zero (a randomized head often makes every value negative,
        which would make the test trivially pass).
    common_grid : bool
        Average-pool the guided methods' input-grid maps onto the CAM feature grid, so that every
        method is compared at one resolution (the voxel-level checkerboard of strided
        convolutions then does not decide the outcome).
    ssim_sigma : float
        Gaussian window of the SSIM, voxels.
    seed : int
        Seed of the re-initialization.

    Returns
    -------
    RandomizationReport

    Notes
    -----
    Each method is compared in the form it is read: CAM maps signed (before the display ReLU;
    the sign is evidence for or against the class), Guided Backprop and Guided Grad-CAM as
    magnitudes (how they are displayed; Adebayo et al.'s absolute-value variant).
    """
    from ..explainer import Explainer

    with model_lock(model):  # the probe and the copy see the model at rest
        probe = Explainer(model, method="gradcam", layer=layer)(x, target=_first_target(target))
        working = copy.deepcopy(model).eval()
    layer_name = probe.layer
    grid_shape = tuple(probe.feature_shape) if common_grid else None
    modules = list(reversed(_parameter_modules_in_order(working, x)))  # output first
    if not modules:
        raise ValueError(f"{type(model).__name__} has no parameters to randomize.")
    groups = [list(g) for g in np.array_split(np.arange(len(modules)), min(max_steps or len(modules), len(modules)))]

    def maps_of(net: nn.Module) -> dict[str, np.ndarray]:
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the guided methods' notice, emitted once below
            for method in methods:
                out[method] = method_maps(net, method, x, target, layer=layer_name, relu=relu, grid_shape=grid_shape)
        return out

    for method in methods:
        if "guided" in method.lower():
            text = GUIDED_GRADCAM_WARNING if "cam" in method.lower() else GUIDED_WARNING.format(name="Guided Backprop")
            warnings.warn(text, UserWarning, stacklevel=2)
    original = maps_of(working)
    report = RandomizationReport(steps=[], randomized=[], threshold=threshold, layer=layer_name, relu=relu,
                                  grid_shape=grid_shape)
    similarity: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    done: list[str] = []
    for step, group in enumerate(groups):
        for index in group:
            name, module = modules[index]
            _reinitialize(module, seed * 100003 + 7919 * step + int(index))
            done.append(name or type(module).__name__)
        report.steps.append(done[-1])
        report.randomized.append(list(done))
        randomized = maps_of(working)
        for method in methods:
            pairs = [(spearman(a, b), ssim(_unit(a), _unit(b), sigma=ssim_sigma, data_range=1.0))
                     for a, b in zip(original[method], randomized[method])]
            similarity[method].append(tuple(np.mean(pairs, axis=0)))
    for method in methods:
        values = np.asarray(similarity[method], dtype=np.float64)
        report.spearman[method] = values[:, 0]
        report.ssim[method] = values[:, 1]
    return report


def _first_target(target: object) -> int:
    return int(torch.as_tensor(target).reshape(-1)[0])
