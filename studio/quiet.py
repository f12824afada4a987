"""Keep library chatter out of what users read (the run log in the Train tab, the terminal).

transformers and diffusers log notices that are not the user's business (an optional torchvision
backend, deprecations inside their own code paths). Errors still come through. Call this before
importing them; it only sets defaults, so ``TRANSFORMERS_VERBOSITY=info`` etc. still win.
"""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module in ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
