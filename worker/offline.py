"""No network the operator didn't ask for: worker processes never fetch code from the hub.

The `kernels` package (a dependency of transformers 5) downloads compiled kernels from the
Hugging Face hub. transformers' `from_pretrained` swaps layers for hub kernels by default
(`use_kernels`, unless USE_HUB_KERNELS says no), and bitsandbytes (0.50) fetches its CPU 4-bit
kernel (`kernels-community/quantization-bitsandbytes`) when it is imported on a CPU with
AVX512-BF16: six lookups in one service log, each failing without a network. Importing this
module turns both off in its process: USE_HUB_KERNELS=NO for transformers (inherited by every
process it starts), and `kernels` hidden from bitsandbytes (`import kernels` raises ImportError,
`find_spec` answers None; inherited by the processes it forks). Both then run the code they
ship. The worker's entry points (app.cli's `worker`, `sampler` and `doctor`) import it before
anything imports bitsandbytes; FINETUNE_HUB_KERNELS=true leaves both as they are.
"""

from __future__ import annotations

import logging
import os
import sys

from app.settings import get_settings

log = logging.getLogger(__name__)

HUB_KERNELS = "kernels"


def keep_hub_kernels_out() -> bool:
    """Turn hub kernels off in this process unless the operator allows them; whether they are."""
    if get_settings().hub_kernels:
        return False
    os.environ["USE_HUB_KERNELS"] = "NO"
    if sys.modules.get(HUB_KERNELS) is not None:  # imported already: too late to hide
        log.warning("the `kernels` package was imported before the worker could hide it")
        return False
    if "bitsandbytes" in sys.modules:
        log.warning("bitsandbytes was imported before the worker hid `kernels` from it")
    sys.modules[HUB_KERNELS] = None  # type: ignore[assignment]  # Python's way to make an import fail
    return True


keep_hub_kernels_out()
