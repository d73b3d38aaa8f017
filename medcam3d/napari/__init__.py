"""napari plugin (npe2) for medcam3d: open scans in scanner space, explain, threshold, save.

Contributions (see ``napari.yaml``):

- a reader for NIfTI, NRRD, MetaImage and DICOM folders that places each scan with its
  voxel -> RAS mm affine (:mod:`._reader`);
- the *Explain* dock widget: class activation maps on the scan's own grid, computed in a worker
  thread, and heatmap -> mask thresholding (:mod:`._widget`);
- writers that save heatmaps (float32) and masks (uint8) with the scanner affine (:mod:`._writer`);
- the demo case as sample data (:mod:`._sample_data`).

Every layer made here keeps its placement in ``layer.metadata``: ``"affine"`` (4x4 float64,
voxel -> RAS mm, for the array as held in ``layer.data``), ``"axes"`` (how ``layer.data``'s axes
relate to the file's: ``layer.data = file_array.transpose(axes)``, the identity unless the file
stores its axes in another order than R-A-S, e.g. coronal slices) and ``"path"`` (the source file).

Needs the ``[napari]`` extra (``pip install "medcam3d[napari]"``); the core package never imports
napari.
"""

from __future__ import annotations

__all__: list[str] = []
