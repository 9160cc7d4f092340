"""SAM-UNet network and its parts; weight loading and key mapping."""

from .sam_unet import SAMUNet
from .weights import LoadReport, load_weights, read_state_dict

__all__ = ["SAMUNet", "LoadReport", "load_weights", "read_state_dict"]
