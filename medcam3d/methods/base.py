"""The method strategy: how channel weights come from activations and gradients.

Every CAM-family map is ``map = Σ_k W_k ⊙ A_k`` (then an optional ReLU).
A method only says what ``W`` is; :class:`medcam3d.Explainer` does the rest.
Shapes are rank-free: the same code serves 3D ``(D, V, U)`` and 2D ``(V, U)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Method", "MethodContext", "spatial_axes"]


def spatial_axes(tensor: torch.Tensor) -> tuple[int, ...]:
    """Axes of the spatial dimensions of a ``(B, T, K, *spatial)`` tensor."""
    return tuple(range(3, tensor.ndim))


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides activations and gradients.

    ``class_indices`` and ``signs`` ((B, T) each) are those of the resolved
    :class:`~medcam3d.targets.Target`: the class of each map, and −1 where its score is a negated
    logit. ``head_weight`` ((C, K) or None) is the weight of the Linear layer after global average
    pooling, which only :class:`~medcam3d.methods.cam.CAM` uses.
    """

    class_indices: torch.Tensor
    signs: torch.Tensor
    head_weight: torch.Tensor | None = None


class Method:
    """Base class of a CAM method.

    Subclasses set :attr:`name` and implement :meth:`weights`.

    Attributes
    ----------
    name : str
        Registry key.
    needs_gradients : bool
        False for methods that use activations only (CAM, Eigen-CAM): the
        explainer then skips the backward pass.
    needs_head : bool
        True when :meth:`weights` needs ``context.head_weight``.
    class_specific : bool
        False for methods whose map is the same for every class (Eigen-CAM).
    level : {"layer", "input", "layers", "perturbation"}
        ``"layer"`` (the CAM family): the engine runs one pass, captures the target layer and calls
        :meth:`combine`. Any other level: the engine hands the call to :meth:`explain`, which runs
        its own passes through the engine (input-level gradients, several layers, perturbations).
    """

    name: str = ""
    needs_gradients: bool = True
    needs_head: bool = False
    class_specific: bool = True
    level: str = "layer"

    def weights(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
        context: MethodContext,
    ) -> torch.Tensor:
        """Channel weights ``W`` for ``map = Σ_k W_k ⊙ A_k``.

        Parameters
        ----------
        activations : (B, 1, K, *spatial) Tensor
            Target-layer output ``A``.
        gradients : (B, T, K, *spatial) Tensor or None
            ``∂ score_t / ∂ A`` for each of the T targets (None when
            :attr:`needs_gradients` is False).
        context : MethodContext

        Returns
        -------
        Tensor
            Broadcastable to ``(B, T, K, *spatial)``.
        """
        raise NotImplementedError

    def combine(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
        context: MethodContext,
    ) -> torch.Tensor:
        """Signed maps ``Σ_k W_k ⊙ A_k`` of shape ``(B, T, *spatial)``."""
        weights = self.weights(activations, gradients, context)
        return (weights * activations).sum(dim=2)

    def explain(self, engine: Any, inputs: torch.Tensor, x: object, target: object, *, relu: bool,
                input_affine: Any) -> Any:
        """The whole explanation, for methods whose :attr:`level` is not ``"layer"``.

        Parameters
        ----------
        engine : Explainer
            The calling explainer (its model lock is held); passes run through ``engine._pass``.
        inputs : (B, C_in, *spatial) Tensor
            The checked input on the model's device and dtype.
        x : object
            What the user passed (a MetaTensor carries the input grid's affine).
        target : object
            The user's target specification.
        relu : bool
        input_affine : ndarray or None

        Returns
        -------
        Explanation
        """
        raise NotImplementedError(f"{type(self).__name__} is a layer method: the engine combines its weights.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
