"""napari plugin (npe2) for medcam3d: open scans in scanner space, explain, threshold, save.

Contributions (see ``napari.yaml``):

- a reader for NIfTI, NRRD, MetaImage and DICOM folders that places each scan in RAS mm (axes
  R, A, S in mm, opened in the axial view), showing oblique scans resampled onto an axis-aligned
  grid because napari cannot draw out-of-plane rotations in 2D (:mod:`._reader`, :mod:`._grid`);
  label maps (ground truth, segmentations, masks; the rule is in :mod:`._labels`) open as Labels
  layers resampled by nearest neighbour, medcam3d's saved maps (``--four-d`` files too, one per
  class) as heatmaps (:mod:`._outputs`);
- the *Explain* dock widget: class activation maps on the grid the scan is shown on, computed in
  a cancellable worker thread, a shared colour scale, the model's field of view, and
  heatmap -> mask thresholding into new layers (:mod:`._widget`, :mod:`._view`);
- writers that save scans (in their own voxel type), heatmaps (float32) and masks (uint8) on the
  scan's original grid with its affine (:mod:`._writer`);
- the demo case and an oblique demo case as sample data (:mod:`._sample_data`).

Every layer made here keeps its placement in ``layer.metadata``: ``"medcam3d"`` (``"scan"``,
``"heatmap"``, ``"mask"``, ``"labels"``, ``"fov"``, ``"lesions"``), ``"affine"`` (4x4 float64, voxel -> RAS mm,
for the array as held in ``layer.data``), ``"axes"`` (how ``layer.data``'s axes relate to the
file's: ``layer.data = file_array.transpose(axes)``, the identity unless the file stores its axes
in another order than R-A-S, e.g. coronal slices; None when resampled), ``"resampled"``,
``"file_shape"`` and ``"file_affine"`` (the file's own grid) and ``"path"`` (the source file).

Needs the ``[napari]`` extra (``pip install "medcam3d[napari]"``); the core package never imports
napari.
"""

from __future__ import annotations

__all__: list[str] = []
