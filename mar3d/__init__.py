"""mar3d: an open implementation of MAR-3D (Progressive Masked Auto-regressor, CVPR 2025)."""

__version__ = "0.1.0"
