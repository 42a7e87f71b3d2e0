"""tgan-ray: label-free segmentation of nanoparticles in electron micrographs, on Ray."""

__version__ = "0.1.0"
