"""medcam3d: class activation maps for 3D medical-imaging CNNs, in the scanner's own space."""

__version__ = "0.1.0"
