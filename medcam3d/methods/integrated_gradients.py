"""Integrated Gradients from a local-contrast baseline, with its completeness error."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .base import Method
from .passes import baseline_of, batches, check_baseline, check_positive_int, check_sigma, explanation, repeat_target, select_target


class IntegratedGradients(Method):
    r"""Integrated Gradients: ``map^c = Σ_channels (x − x̄) ⊙ ∫_0^1 ∂y^c/∂x (x̄ + α (x − x̄)) dα``.

    The map is *complete*: it sums over voxels to ``y^c(x) − y^c(x̄)``, the change of the class
    logit from the baseline ``x̄`` to the input, up to the error of the quadrature. The integral is
    taken with the ``steps``-point Gauss–Legendre rule on ``[0, 1]`` (exact for integrands that are
    polynomials of degree < 2·steps; for ReLU networks the integrand is piecewise smooth and the
    error falls about as 1/steps). The achieved error is measured on every call and kept in
    ``Explanation.diagnostics``: ``completeness_error`` ``(B, T)`` = ``Σ map − (y(x) − y(x̄))``,
    ``score_change`` ``(B, T)`` = ``y(x) − y(x̄)`` and ``relative_completeness_error`` (the error over
    the largest ``|score_change|`` of the sample). A :class:`UserWarning` says when the relative error
    exceeds ``tolerance``: raise ``steps``.

    Baseline (default): the input blurred at lesion scale, as for
    :class:`~medcam3d.methods.gradxinput.GradientXInput`, so the path adds the local contrast to a
    lesion-free version of the same scan and the map attributes the logit's change to the voxels
    that stand out. ``baseline="zero"`` is the textbook black image (0 of the normalized input),
    which for CT-like windows is air, an out-of-distribution reference.

    Measured (label-only demo model ``data_samples/demo_model_weak.pt``, class given, the map's peak on
    the scan's grid after the whole path): the peak lies inside a lesion of the class for 1.00 of 20
    (case, class) pairs of the demo generator (median distance to the lesion centre 3.7 mm) and 0.90
    of 59 pairs of the harder held-out set (2.1 mm; ``bright_round`` 1.00, ``dark_elongated`` 0.79),
    against 0.00 (21.5 mm) for HiResCAM on the last layer. Of the methods here it localizes best:
    the recommended answer to "where in the patient" for a label-only classifier.

    Cost: two inferences (input and baseline) plus ``B · steps`` forward-and-backward passes from
    the input, ``batch_size`` at a time, each with one batched vector–Jacobian product for all T
    classes: about ``steps`` times :class:`~medcam3d.methods.gradxinput.GradientXInput`. Memory is
    that of gradient × input times ``batch_size`` (each path point holds the network's graph and
    its T gradients).

    Parameters
    ----------
    steps : int
        Quadrature points on the path.
    baseline, sigma
        As for :class:`~medcam3d.methods.gradxinput.GradientXInput`.
    batch_size : int
        Path points per forward/backward pass (memory grows with it; raise it on a GPU with room).
    tolerance : float
        Relative completeness error above which a warning is given (``inf``: never).

    References
    ----------
    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017, arXiv:1703.01365.
    """

    name = "integrated_gradients"
    level = "input"

    def __init__(self, steps: int = 16, baseline: str | float = "blur", sigma: float = 2.0, batch_size: int = 1,
                 tolerance: float = 0.05) -> None:
        self.steps = check_positive_int(steps, "steps", self.name)
        self.baseline = check_baseline(baseline, self.name)
        self.sigma = check_sigma(sigma, "sigma", self.name)
        self.batch_size = check_positive_int(batch_size, "batch_size", self.name)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise UsageError(f"{self.name}: tolerance must be a number >= 0 (inf: never warn), not {tolerance!r}.")
        self.tolerance = float(tolerance)

    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Gauss–Legendre points ``α`` on ``[0, 1]`` and their weights (summing to 1)."""
        points, weights = np.polynomial.legendre.leggauss(self.steps)
        return (points + 1.0) / 2.0, weights / 2.0

    def explain(self, engine: Any, inputs: torch.Tensor, x: object, target: object, *, relu: bool,
                input_affine: Any) -> Any:
        clean = engine._pass(inputs, (), target, x=x, track=False)  # the target, logits and scores
        with torch.no_grad():
            reference = baseline_of(inputs, self.baseline, self.sigma)
        start = engine._pass(reference, (), clean.target, track=False, perturbed=True)
        batch = inputs.shape[0]
        alphas, weights = self.nodes()
        rows = torch.arange(batch, device=inputs.device).repeat_interleave(self.steps)
        steps = np.tile(np.arange(self.steps), batch)
        every = repeat_target(clean.target, self.steps)
        difference = inputs - reference
        total: torch.Tensor | None = None
        for chunk in batches(len(rows), self.batch_size):
            index = rows[chunk]
            alpha = torch.as_tensor(alphas[steps[chunk]], device=inputs.device, dtype=inputs.dtype)
            weight = torch.as_tensor(weights[steps[chunk]], device=inputs.device, dtype=torch.float32)
            with torch.no_grad():
                points = reference[index] + alpha.reshape(-1, *([1] * (inputs.ndim - 1))) * difference[index]
            run = engine._pass(points, (), select_target(every, chunk), perturbed=True)
            assert run.gradients is not None
            gradients = run.gradients[0] * weight.reshape(-1, *([1] * (run.gradients[0].ndim - 1)))
            if total is None:
                total = gradients.new_zeros((batch, *gradients.shape[1:]))
            total.index_add_(0, index, gradients)
        assert total is not None
        with torch.no_grad():
            maps = (total * difference.float().unsqueeze(1)).sum(dim=2)
            change = clean.scores.float() - start.scores.float()
            error = maps.flatten(start_dim=2).sum(dim=2) - change
            scale = change.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
            relative = error.abs() / scale
        worst = float(relative.max())
        if worst > self.tolerance:
            message = (
                f"integrated_gradients with {self.steps} steps: the map sums to the logit change from the baseline "
                f"only within {worst:.1%} (tolerance {self.tolerance:.0%}); use more steps, e.g. "
                f"IntegratedGradients(steps={min(4 * self.steps, 256)})."
            )
            warnings.warn(message, UserWarning, stacklevel=5)
        diagnostics = {"completeness_error": error.cpu(), "score_change": change.cpu(),
                       "relative_completeness_error": relative.cpu(), "steps": self.steps}
        return explanation(engine, clean, inputs=inputs, input_affine=input_affine, maps=maps,
                           layer="input", relu=relu, diagnostics=diagnostics)

    def __repr__(self) -> str:
        return (f"IntegratedGradients(steps={self.steps}, baseline={self.baseline!r}, sigma={self.sigma:g}, "
                f"batch_size={self.batch_size}, tolerance={self.tolerance:g})")
