"""mdsearch: architecture search and ablations for MobileDiffusion-family text-to-image UNets."""

__version__ = "0.1.0"
