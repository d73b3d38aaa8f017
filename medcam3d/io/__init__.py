"""Read and write medical images as ``(array, Space)`` pairs in RAS+ world coordinates.

Formats
-------
- NIfTI (``.nii``, ``.nii.gz``) goes through nibabel; its affine (the sform when its code is
  > 0, else the qform, as nibabel chooses) is already voxel -> RAS+ mm. When the sform and the
  qform both have codes > 0 but place the grid differently, reading logs a warning naming both
  (viewers built on ITK, such as 3D Slicer, may use the qform and show the image elsewhere).
- DICOM series (a directory), NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``)
  go through SimpleITK, which works in LPS+. The affine is built from SimpleITK's direction,
  spacing and origin and converted to RAS+ with :func:`medcam3d.orientation.lps_to_ras`;
  :mod:`medcam3d.orientation` is the only module of medcam3d that converts between LPS and RAS
  (:func:`lps_to_ras` and :func:`ras_to_lps` are re-exported here).

Arrays are in NIfTI ``(i, j, k)`` order for every format (SimpleITK's ``(z, y, x)`` arrays are
transposed). By default :func:`read` returns float32 data (``dtype=None`` keeps the stored type,
e.g. integer label maps). :func:`write` is atomic: a temporary file in the target directory is
renamed over ``path`` only once it is complete. :func:`describe` lists what a file or DICOM folder
holds (format, grid, number of volumes, each DICOM series) from its headers, without reading voxels.

Untrusted files
---------------
A scan from someone else must never run code, read files elsewhere, or give silently wrong
geometry. :func:`read` therefore checks every file before it loads voxels:

- **Detached data files.** The data file named by a MetaImage (``ElementDataFile``) or NRRD
  (``data file``) header must lie in the header's own folder (or below it); absolute paths,
  ``..`` traversal, symbolic links leading out of the folder, and lists or patterns of several
  data files are refused unless ``trust=True``. The header text is parsed here, before
  SimpleITK opens anything. Lines end where the readers end them (``\n`` or ``\r\n``); a header
  holding a bare carriage return (``\r``, which ends a line for the NRRD reader and for MetaIO's
  keys but not for MetaIO's values) or a NUL byte is refused: readers would disagree on its lines,
  so no check could see every line each reader sees. DICOM files reached through links leading
  out of the folder are refused the same way.
- **Size.** The voxel bytes a header claims are compared with what the file can hold before
  anything is allocated: its size for raw data (NIfTI, MetaImage, NRRD, each file of a DICOM
  series in a native transfer syntax), 1032 times its size for gzip/zlib data (the most deflate
  can expand). Reading more than ``max_bytes`` (16 GiB by default) is refused, and so is a
  compressed file (gzip NIfTI, compressed MetaImage/NRRD, DICOM in a compressed transfer syntax)
  that would make reading allocate more than ``max_expansion`` (100) times its own size, beyond
  the first :data:`EXPANSION_FREE_BYTES` (1 GiB): a tiny file that expands to gigabytes is a
  decompression bomb far more often than a scan. A DICOM folder may hold at most ``max_slices``
  (5000) files, counted before any is opened (every file's header is read, a few ms each). A
  4D file read with ``volume=`` loads only that volume. All: :class:`ImageTooLargeError`.
- **Geometry.** DICOM slices must share one orientation, one in-plane size and spacing, and lie
  evenly spaced along the slice normal, without duplicates, gaps or in-plane drift (tolerance 1 %
  of the slice spacing plus 1e-3 mm); otherwise :class:`GeometryError`, unless
  ``allow_uneven_slices=True``. Each file's PixelSpacing must hold two positive sizes, and its
  ImageOrientationPatient six numbers: two unit vectors (within 1e-3) at right angles (cosine
  within 1e-3), never silently replaced or orthonormalised (:class:`GeometryError` always). The
  grid of a DICOM series is built from these headers by one function, for :func:`read` and
  :func:`describe` alike. Voxel sizes must be finite, positive and between :data:`MIN_VOXEL_MM`
  and ``max_voxel_mm`` (:data:`MAX_VOXEL_MM`, 100 mm: real scans have slices of at most a few
  cm); NIfTI ``pixdim`` values that nibabel would silently replace (0, -0, negative) are refused
  when the qform or the default affine uses them. A singular voxel -> world matrix (a zero
  TransformMatrix or NRRD space directions) is refused by name.
- **Voxel types.** Complex and RGB (structured) voxels are refused (:class:`ImageReadError`):
  medcam3d explains scalar intensity images.

Every NIfTI medcam3d writes follows one header rule (sform and qform codes, units), set by
:func:`set_nifti_geometry` and described in :mod:`medcam3d.io.nifti`.

Modules
-------
One concept per module; every public name is importable from ``medcam3d.io``:

- :mod:`medcam3d.io.reading`: :func:`read`, :func:`read_volumes`, :func:`read_space`, :func:`read_in_slabs`
  (a 3D NIfTI read slab by slab, for progress and cancelling);
- :mod:`medcam3d.io.channels`: :func:`read_channels` (several scans of one case stacked as channels on
  the first one's grid);
- :mod:`medcam3d.io.writing`: :func:`write`;
- :mod:`medcam3d.io.info`: :func:`describe`, :class:`ImageInfo`, :class:`SeriesInfo`;
- :mod:`medcam3d.io.nifti`: NIfTI reading and the header rule (:func:`set_nifti_geometry`,
  :func:`nifti_header` for streamed files, :func:`like_header`, :func:`descrip_bytes`; a descrip
  longer than 80 bytes is kept whole in a header extension, :func:`descrip_extensions`, read back
  by :func:`full_descrip`);
- :mod:`medcam3d.io.streaming`: volumes streamed into NIfTI files slab by slab, gzip members
  compressed in threads, written atomically (:func:`write_nifti_files`, :class:`Volume`,
  :class:`Scaling`);
- :mod:`medcam3d.io.itk_headers`: NRRD and MetaImage headers, checked before SimpleITK opens
  anything (:func:`detached_data_file`);
- :mod:`medcam3d.io.itk`: SimpleITK reading and what its C++ readers print;
- :mod:`medcam3d.io.dicom`: DICOM series (listing, header geometry, reading);
- :mod:`medcam3d.io.limits`: the size, voxel and slice limits (:func:`set_read_limits`);
- ``medcam3d.io._common``: the formats and the helpers the others share.

Imports go one way: ``_common`` <- ``limits`` <- ``streaming`` <- ``nifti``, ``itk_headers`` <- ``itk`` <- ``dicom`` <-
``reading`` <- ``info``, ``channels``; ``writing`` uses ``nifti`` and ``itk``; this package imports them all.
"""

from __future__ import annotations

from ..errors import _IMAGE_ERRORS
from ..errors import ImageReadError, ImageNotFoundError, UnsupportedFormatError, VolumeError, VolumeIndexError, NonFiniteError, ImageWriteError, UnwritableImageError, OutputPermissionError, OutputDirectoryError, ShearWarning, SpaceError, GeometryError, ImageTooLargeError, UntrustedFileError, UsageError  # noqa: F401  (re-exported)
from ..orientation import lps_to_ras, ras_to_lps
from ._common import READ_FORMATS, WRITE_FORMATS
from .limits import (DEFAULT_MAX_BYTES, DEFAULT_MAX_EXPANSION, DEFAULT_MAX_SLICES, EXPANSION_FREE_BYTES, LIMIT_FLAGS,
                     MAX_VOXEL_MM, MIN_VOXEL_MM, set_read_limits)
from .streaming import COMPRESS_LEVEL, STORAGE_DTYPES, Constant, Scaling, Volume, slab_ranges, write_nifti_files
from .nifti import descrip_bytes, descrip_extensions, full_descrip, like_header, nifti_header, set_nifti_geometry
from .itk_headers import detached_data_file
from .reading import read, read_in_slabs, read_space, read_volumes
from .info import ImageInfo, SeriesInfo, describe
from .channels import CHANNEL_ATOL_MM, as_channel_paths, read_channels
from .writing import write

__all__ = [
    "read",
    "read_space",
    "read_in_slabs",
    "read_volumes",
    "read_channels",
    "as_channel_paths",
    "CHANNEL_ATOL_MM",
    "describe",
    "ImageInfo",
    "SeriesInfo",
    "write",
    "set_nifti_geometry",
    "nifti_header",
    "like_header",
    "write_nifti_files",
    "Volume",
    "Constant",
    "Scaling",
    "slab_ranges",
    "STORAGE_DTYPES",
    "COMPRESS_LEVEL",
    "descrip_bytes",
    "descrip_extensions",
    "full_descrip",
    "detached_data_file",
    "lps_to_ras",
    "ras_to_lps",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "DEFAULT_MAX_BYTES",
    "LIMIT_FLAGS",
    "set_read_limits",
    "DEFAULT_MAX_EXPANSION",
    "EXPANSION_FREE_BYTES",
    "DEFAULT_MAX_SLICES",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "ShearWarning",
    *_IMAGE_ERRORS,
]
