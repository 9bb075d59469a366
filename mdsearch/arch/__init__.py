"""Architecture: the spec, the builder, the presets and the cost model."""

from . import presets
from .cost import Cost, cost
from .spec import ArchSpec, Level, Path, SpecError
from .unet import UNet, build

__all__ = ["ArchSpec", "Cost", "Level", "Path", "SpecError", "UNet", "build", "cost", "presets"]
