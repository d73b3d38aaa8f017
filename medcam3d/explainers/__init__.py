"""Old name of :mod:`medcam3d.methods` (the CAM method strategies); kept so that old imports work.

``medcam3d.explainers`` and its submodules are the very same module objects as
``medcam3d.methods`` and its submodules, so classes and the registry are shared.
"""

import sys as _sys

from .. import methods as _methods
from ..methods import base, cam, eigen_cam, grad_cam, grad_cam_pp, hires_cam, layer_cam, xgrad_cam  # noqa: F401
from ..methods import fused, gradxinput, integrated_gradients, occlusion, passes, scorecam, smoothgrad  # noqa: F401

for _name in ("base", "cam", "eigen_cam", "grad_cam", "grad_cam_pp", "hires_cam", "layer_cam", "xgrad_cam",
              "fused", "gradxinput", "integrated_gradients", "occlusion", "passes", "scorecam", "smoothgrad"):
    _sys.modules[f"{__name__}.{_name}"] = getattr(_methods, _name)
_sys.modules[__name__] = _methods
