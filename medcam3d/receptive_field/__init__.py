"""Where each cell of a layer's output looks in the input: receptive-field step, centre and size.

Cell ``u`` of a target layer's output (per spatial axis) is centred on input voxel
``offset + step * u`` and reaches ``size`` input voxels. The feature grid of a map is placed there
(:func:`medcam3d.space.feature_space`), so a heatmap lands where the network looked, not where the
``F.interpolate(align_corners=False)`` convention puts it (``step = s``, ``offset = (s - 1) / 2``),
which is off by up to half a cell: on MONAI's ``resnet18`` ``layer4`` (stride 16) the convention
places cell 3 at input voxel 55.5, the network centres it on voxel 48.

Two ways to find it, both in :func:`measure` (behind :func:`medcam3d.layers.receptive_field`):

``"graph"`` (the fast path)
    One forward pass on *meta* tensors (shapes only: no computation, no memory, the model's
    parameters are never touched) under a :class:`torch.overrides.TorchFunctionMode` that follows
    every tensor from the input to the target layer's output and composes the geometry of each
    operation: convolutions and transposed convolutions (kernel, stride, padding, dilation, also
    ``padding="same"``), max/average/Lp pooling, adaptive pooling where it is a plain pooling,
    ``F.interpolate``/``nn.Upsample``, ``F.pad`` and crops, and every operation that keeps the
    spatial axes in place (activations, normalization, dropout, arithmetic, concatenation along
    channels, linear layers over the channels). The spatial axes may move: permutes and reshapes
    are followed (channel-last maps, a grid flattened into a token sequence and back, as in
    UNETR's and SwinUNETR's transformers), and so are strided slices (Swin's patch merging, whose
    eight shifted slices joined along channels make one 2-voxel window). A product of two
    input-dependent tensors (attention) mixes every position with every other by content: like a
    gate computed from the whole image, it does not move a cell, and the residual path that adds
    it back places it. For a layer with kernel ``k``, stride ``s``,
    left padding ``p`` and dilation ``d`` (``ke = d (k - 1) + 1``)::

        step'   = step * s
        offset' = offset + step * ((ke - 1) / 2 - p)
        size'   = size + (ke - 1) * step

    and for a transposed convolution ``step' = step / s``,
    ``offset' = offset + step * (p - d (k - 1) / 2) / s``. Paths that meet (residual additions,
    dense concatenations, U-Net skips) must agree on step and offset; channel gates computed from
    the whole image (squeeze-and-excitation) do not move a cell. The trace runs on a view of the
    model with none of the user's hooks (they never see meta tensors).

    This is the centre of the cell's receptive field. Far from the input's borders it is where the
    cell's gradient looks; a deep cell whose field is clipped by the borders leans toward the
    larger part of its feature maps (MONAI's DenseNet121 ``transition3`` on a 32-voxel input: 5
    voxels), which no placement of a regular grid follows.

``"probe"`` (the fallback, and the reference)
    Where the graph cannot be read (TorchScript, a custom op, paths that disagree, such as a U-Net
    decoder adding an upsampled path to a skip whose cells sit elsewhere), the gradient of a few
    cells' sums over channels with respect to seeded noise inputs (``PROBE_INPUTS`` of them, added
    up; eval mode, the model's own weights, never modified, none of the user's hooks run): a
    cell's centre is the midpoint of the gradient's support where that support lies inside the
    input (exact), else the ``|gradient|``-weighted mean position over the widest window symmetric
    about it inside the input; step and offset are fitted per axis by least squares over the cells
    (a fitted step within 15 % of a whole number, or of one over a whole number, is taken as that
    number), ``size`` is the support's extent (a lower bound where it reaches the input's borders).
    Where paths disagree, this is where this model's gradient looks (a mix of the paths' places,
    weighted by the model's weights). It costs ``PROBE_INPUTS`` forward passes up to the layer,
    one at a time, and one backward pass per cell and input.

One concept per module, each importing only those before it: ``field`` (:class:`ReceptiveField`),
``view`` (the hook-free view both ways run on), ``ops`` (the trace's vocabulary), ``graph`` (the trace),
``probe`` (the gradient probe), ``measuring`` (the cache and :func:`measure`).

Results are cached per model (weakly), layer and input shape; a graph result that no
shape-dependent operation (interpolation to a size, padding, cropping, adaptive pooling) took part
in is reused for every input size with the same channels and rank.
"""

from __future__ import annotations

from .field import PLACEMENTS, ReceptiveField
from .measuring import clear_cache, measure
from .probe import PROBE_INPUTS, PROBE_SEED

__all__ = ["ReceptiveField", "clear_cache", "measure", "PLACEMENTS", "PROBE_INPUTS", "PROBE_SEED"]
