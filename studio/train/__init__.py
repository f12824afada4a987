"""Training engine: LoRA-family adapter runs in their own process.

- ``config``: the run schema (the same as ``presets/*.json``), validation, presets, ``--set``.
- ``data``: dataset -> buckets -> batches; latent and text-embedding caches.
- ``engine``: the training loop (``train(cfg)``), readable top to bottom.
- ``events`` / ``checkpoint``: the run folder's event log and resumable checkpoints.
- ``runner``: what the UI uses to start, watch and cancel runs in a subprocess.
- ``estimate``: pre-flight VRAM / time estimate and the out-of-memory advice.
"""
