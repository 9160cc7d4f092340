"""CPU inference setting that keeps a network's results bit for bit (measured in docs/benchmarks.md).

:func:`tune_malloc`: glibc's malloc hands every buffer above its mmap threshold (at most 32 MiB) back to the
  kernel when it is freed, so each of TinyViT's 64 MiB activation maps (256 channels at 256 x 256) comes back as
  fresh pages that the kernel must fault in and zero, on every call: about 40% of a LiteMedSAM encoder call on 2 cores
  is spent there. Raising the mmap and trim thresholds keeps freed buffers in the heap for reuse (what jemalloc or
  tcmalloc, the allocators PyTorch's CPU tuning guide recommends, do by design). Results are bit-identical.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_malloc(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed buffers up to ``threshold_bytes`` in glibc's heap (``mallopt`` mmap and trim thresholds).

    Affects allocations made after the call, process-wide. Returns False, changing nothing, where the C library is
    not glibc (macOS, Windows, musl) or refuses the setting. Environment alternative before Python starts:
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    threshold = int(min(threshold_bytes, 2**31 - 1))
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    if not done:
        logger.warning("mallopt refused the mmap/trim thresholds; large tensors keep their default allocation")
    return done
