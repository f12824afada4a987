"""Adapter Studio: train, merge, inspect and test Stable Diffusion adapters.

Everything the studio does lives in this package; the UI (``ui/``, ``app.py``) and the
command line (``python -m studio``) are thin views over it. Importing ``studio`` is cheap:
torch, diffusers, transformers and peft are imported only by the functions that need them.
"""

__version__ = "0.1.0"
