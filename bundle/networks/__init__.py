"""SAM-UNet network and its parts; the model contract, pixel normalisation, weight loading and key mapping."""

from .contract import ContractEntry, make_contract
from .feature_decoder import FeatureDecoder
from .interface import PromptableNetwork, PromptableNetworkMixin, unwrap
from .sam_unet import SAMUNet, resolve_network_args
from .weights import LoadReport, load_weights, read_checkpoint, read_state_dict, read_weights

__all__ = [
    "ContractEntry",
    "FeatureDecoder",
    "LoadReport",
    "PromptableNetwork",
    "PromptableNetworkMixin",
    "SAMUNet",
    "load_weights",
    "make_contract",
    "read_checkpoint",
    "read_state_dict",
    "read_weights",
    "resolve_network_args",
    "unwrap",
]
