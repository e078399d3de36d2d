"""Keep third-party import chatter (missing optional kernels, deprecations) off the user's screen."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party_imports() -> None:
    """torchao and bitsandbytes log missing optional kernels at import; that is not the user's concern."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch.utils._pytree")
