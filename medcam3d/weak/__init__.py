"""A learned weakly-supervised 3D segmenter: seed, expand, constrain (SEC) from image labels only.

:func:`medcam3d.segment.segment` expands one case's class maps at test time and learns nothing.
This module trains an ordinary MONAI segmentation network (``UNet`` or ``SegResNet``) from a
trained classifier and scans that carry **image-level labels only** (which classes are present),
with the three losses of SEC (Kolesnikov & Lampert, "Seed, Expand and Constrain", ECCV 2016) in 3D:

1. **seed loss** (:func:`seed_loss`): cross-entropy on the *seeds* only, unlabelled voxels
   ignored. Seeds (:func:`find_seeds`) come from the classifier's class maps (any ``method=`` of
   :class:`~medcam3d.Explainer`; default :data:`DEFAULT_SEED_METHOD`): the local maxima of each
   present class's smoothed map at or above an **absolute level** calibrated on the training scans
   (:func:`calibrate_levels`: a high quantile of the map's maximum over the scans *without* that
   class, so a peak this high is rare where the class is absent), each grown to a small confident
   region around it. Every lesion whose peak clears the level gets seeds, a second lesion of a
   class included. Confident background: voxels far from every seed where every present class's
   map is low, and every voxel of a scan labelled with no class.
2. **expand loss** (:func:`expand_loss`): global weighted rank pooling (:func:`gwrp`) of each
   class's probability against the image labels: present classes must reach a high pooled score
   (the decay ``d`` sets the size prior, between max pooling, ``d = 0``, and the mean, ``d = 1``),
   absent classes are pushed to zero everywhere (max pooling), background as a present class.
3. **constrain loss** (:func:`constrain_loss`): the Kullback-Leibler divergence from a
   boundary-aware refinement of the network's own output (:func:`refine`) to that output.

A **size prior** (:func:`size_loss`, ``TrainSettings.size_weight``) keeps a present class
lesion-sized: its mean probability over the scan may not exceed a bound calibrated on the training
scans (:func:`size_bounds`: the median extent of the seeded peaks in the smoothed maps,
:func:`map_extent`). Without it nothing in the three losses keeps a present class small: the
seed loss weighs the ~7 seed voxels of a class as much as the whole background, the expand loss
asks only that a present class's top voxels be high and pushes an absent class down at its
maximum alone, and the CRF sharpens edges without shrinking; a network trained so labels a fixed
blob of tens of thousands of voxels in every scan, with or without the class
(``docs/weak_segmentation.md``). Optionally (``SeedSettings.background_reach``) every voxel far
from all seeds of a fully seeded scan is background too.

The refinement is a local mean-field CRF (a "convolutional CRF": the dense CRF's mean-field update
of Krähenbühl & Koltun with its Gaussian appearance and smoothness kernels restricted to a window
of neighbours), written here in torch. A 3D dense CRF from the package registry was the first
choice: ``SimpleCRF`` 0.2.1.1 (the only one with a 3D dense CRF) ships as source only and does not
build against NumPy 2 (``NPY_IN_ARRAY`` is gone) nor without a C++ toolchain, and
``pydensecrf``/``pydensecrf2`` are 2D. The random walker (:mod:`skimage`) was the second: it
takes about a second per 64³ volume, which would dominate a training step, while the local CRF
costs tens of milliseconds and runs on the batch as it is.

The trained segmenter is written as a plain medcam3d config (``task: segmentation``, the network's
class and arguments, the classifier's preprocessing) and a ``state_dict`` that loads with
``torch.load(weights_only=True)`` (:func:`save_segmenter`), so :func:`medcam3d.models.load_model`,
``medcam3d explain`` and ``medcam3d segment`` (:func:`segment_scan`: label maps and lesion boxes on
the scan's grid, the same files as ``--segment``) use it like any other network.

One concept per module, each importing only those before it (``tests/test_layering.py``):
:mod:`~medcam3d.weak.seeds` (seeds from class maps), :mod:`~medcam3d.weak.losses` (SEC's losses
and the size prior), :mod:`~medcam3d.weak.refinement` (the local CRF),
:mod:`~medcam3d.weak.training_set` (scans and image labels), :mod:`~medcam3d.weak.training`
(:func:`train_segmenter`), :mod:`~medcam3d.weak.segmenter_files` (saving and loading) and
:mod:`~medcam3d.weak.prediction` (:func:`segment_scan`). Everything public is imported from
``medcam3d.weak``.
"""

from __future__ import annotations

from .losses import constrain_loss, expand_loss, gwrp, seed_loss, size_loss
from .prediction import SegmenterSettings, label_voxels, predict, segment_scan
from .refinement import refine
from .seeds import (DEFAULT_SEED_METHOD, IGNORE, SeedSettings, Seeds, calibrate_levels, class_maps, find_seeds, map_extent,
                    seed_maps, seed_methods, smooth_map)
from .segmenter_files import load_segmenter, save_segmenter
from .training import (NETWORKS, TrainSettings, WeakSegmenter, compute_seeds, make_network, network_args, set_prior_bias,
                       size_bounds, train_segmenter)
from .training_set import TrainingSet, cohort_training_set, demo_training_set

__all__ = [
    "DEFAULT_SEED_METHOD",
    "IGNORE",
    "NETWORKS",
    "SeedSettings",
    "Seeds",
    "TrainSettings",
    "TrainingSet",
    "WeakSegmenter",
    "SegmenterSettings",
    "calibrate_levels",
    "class_maps",
    "cohort_training_set",
    "compute_seeds",
    "constrain_loss",
    "demo_training_set",
    "expand_loss",
    "find_seeds",
    "gwrp",
    "label_voxels",
    "load_segmenter",
    "make_network",
    "map_extent",
    "network_args",
    "predict",
    "refine",
    "save_segmenter",
    "seed_loss",
    "size_loss",
    "seed_maps",
    "seed_methods",
    "segment_scan",
    "set_prior_bias",
    "size_bounds",
    "smooth_map",
    "train_segmenter",
]
