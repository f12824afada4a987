"""Merging adapters: blend N LoRAs exactly or re-ranked, bake into checkpoints, resize, extract.

- ``blend``: the maths (exact concat, factored SVD re-rank, dynamic rank, per-block weights);
- ``lora_merge``: ``merge_adapters`` / ``resize_adapter`` (files in, one webUI LoRA out);
- ``ckptmap``: webUI module names -> tensors of a single-file checkpoint;
- ``bake``: add adapters into a checkpoint, streaming tensor by tensor;
- ``extract``: a LoRA from the difference of two checkpoints;
- ``recipe``: the metadata saying what a merged file was made from;
- ``cli``: ``studio merge`` / ``studio resize`` / ``studio extract``.

Importing this package is cheap: torch is imported by the submodules.
"""
