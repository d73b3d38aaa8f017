"""Score-CAM with logits: a gradient-free reference on the target layer's grid."""

from __future__ import annotations

from typing import Any

import torch

from .passes import (
    PerturbationMethod,
    baseline_of,
    batches,
    check_budget,
    check_positive_int,
    check_sigma,
    explanation,
    feature_grid,
    onto,
    repeat_target,
    select_target,
)


class ScoreCAM(PerturbationMethod):
    r"""Score-CAM with logits: ``map^c = Σ_k s_k^c A_k``, ``s_k^c = y^c(x̄ + (x − x̄) ⊙ M_k) − y^c(x̄)``.

    Each channel ``A_k`` of the target layer, resampled linearly onto the input grid (its cells where
    the explanation places them: see ``placement`` of the explainer) and min–max scaled to
    ``[0, 1]``, is a mask ``M_k`` that shows the input where the channel is active and the
    baseline ``x̄`` elsewhere; the channel's weight is how much that view raises the class *logit*
    over the baseline's (raw logits, no softmax: a softmax over classes would mix every class's
    evidence into each weight, and the paper's softmax over channels would hide the scale). No
    gradients; every class map comes from the same forward passes. The maps lie on the target
    layer's grid, like the CAM family's.

    Cost: two inferences plus one forward pass per channel used and sample, ``batch_size`` at a
    time. Layers are often 512–2048 channels deep, so only the ``channels`` channels with the
    largest spatial standard deviation of each sample are used (a flat channel makes a flat mask
    and says nothing about *where*); ``channels=None`` uses them all. A call that would need more
    than ``max_forwards`` passes is refused before any work
    (:class:`~medcam3d.errors.MethodBudgetError`). ``Explanation.diagnostics`` records the channels
    used out of how many.

    Parameters
    ----------
    channels : int or None
        Channels used per sample (the cap); None: all.
    baseline : {"zero", "blur", "mean"} or float
        What the input shows outside a mask; ``"zero"`` (the paper's) by default.
    sigma : float
        Width of the ``"blur"`` baseline in input voxels.
    batch_size, max_forwards : int
        Masked inputs per forward pass, and the most forward passes one call may run
        (:class:`~medcam3d.methods.passes.PerturbationMethod`).

    References
    ----------
    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
    CVPR Workshops 2020, arXiv:1910.01279.
    """

    name = "scorecam"

    def __init__(self, channels: int | None = 64, baseline: str | float = "zero", sigma: float = 2.0,
                 batch_size: int = 4, max_forwards: int = 4096) -> None:
        self.channels = None if channels is None else check_positive_int(channels, "channels", self.name)
        super().__init__(baseline, batch_size, max_forwards)
        self.sigma = check_sigma(sigma, "sigma", self.name)

    def explain(self, engine: Any, inputs: torch.Tensor, x: object, target: object, *, relu: bool,
                input_affine: Any) -> Any:
        name, module = engine._target_layer(inputs)
        clean = engine._pass(inputs, ((name, module),), target, x=x, track=False)
        activations = clean.activations[0].float()  # (B, K, *feature_shape)
        spatial = tuple(int(n) for n in inputs.shape[2:])
        placement = engine._placement(name, inputs)
        cells, voxels = feature_grid(spatial, activations.shape[2:], placement[1]), feature_grid(spatial, spatial, None)
        batch, depth = activations.shape[:2]
        used = depth if self.channels is None else min(self.channels, depth)
        check_budget(self.name, batch * used, self.max_forwards,
                     f"{used} channels of layer {name!r} x {batch} samples",
                     "cap the channels (ScoreCAM(channels=...)) or explain fewer samples at a time")
        with torch.no_grad():
            reference = baseline_of(inputs, self.baseline, self.sigma)
        start = engine._pass(reference, (), clean.target, track=False, perturbed=True)
        with torch.no_grad():
            spread = activations.flatten(start_dim=2).std(dim=2)  # (B, K)
            chosen = spread.topk(used, dim=1).indices  # (B, used)
        pairs = [(b, int(k)) for b in range(batch) for k in chosen[b].tolist()]
        every = repeat_target(clean.target, used)
        gains = torch.zeros((batch, used, clean.scores.shape[1]), device=inputs.device, dtype=torch.float32)
        for chunk in batches(len(pairs), self.batch_size):
            rows = pairs[chunk]
            with torch.no_grad():
                samples = [b for b, _ in rows]
                selected = torch.stack([activations[b, k] for b, k in rows]).unsqueeze(1)  # (n, 1, *feature)
                masks = onto(selected, cells, voxels)  # on the input grid, cells where the explanation places them
                low = masks.flatten(start_dim=1).amin(dim=1).reshape(-1, *([1] * (masks.ndim - 1)))
                high = masks.flatten(start_dim=1).amax(dim=1).reshape(-1, *([1] * (masks.ndim - 1)))
                masks = torch.where(high > low, (masks - low) / (high - low).clamp_min(1e-12), torch.zeros_like(masks))
                masked = reference[samples] + (inputs[samples] - reference[samples]) * masks.to(inputs.dtype)
            run = engine._pass(masked, (), select_target(every, chunk), track=False, perturbed=True)
            gain = run.scores.float() - start.scores.float()[samples]  # (n, T)
            for row, position in enumerate(range(chunk.start, chunk.stop)):
                b, slot = divmod(position, used)
                gains[b, slot] = gain[row]
        with torch.no_grad():
            picked = torch.gather(activations, 1, chosen.reshape(batch, used, *([1] * (activations.ndim - 2)))
                                  .expand(-1, -1, *activations.shape[2:]))  # (B, used, *feature)
            maps = torch.einsum("bkt,bk...->bt...", gains, picked)
        diagnostics = {"channels_used": used, "channels": depth, "layer": name, "forwards": len(pairs) + 2}
        return explanation(engine, clean, inputs=inputs, input_affine=input_affine, maps=maps,
                           layer=name, relu=relu, placement=placement, diagnostics=diagnostics)

    def __repr__(self) -> str:
        return (f"ScoreCAM(channels={self.channels}, baseline={self.baseline!r}, batch_size={self.batch_size}, "
                f"max_forwards={self.max_forwards})")
