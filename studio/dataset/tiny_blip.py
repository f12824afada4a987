"""A tiny, randomly initialised BLIP captioning model, built offline: for tests, the benchmark and
trying the BLIP path without a download. Its captions are random words."""

from __future__ import annotations

import os
from pathlib import Path

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + \
    "a the dog cat sitting on grass red blue photo of with ball and".split()


def save_tiny_blip(out: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """Write a BLIP folder (config, weights, processor, tokenizer) that ``BlipCaptioner`` can load."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=image_size, patch_size=8),
        projection_dim=32)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                  tokenizer=tokenizer).save_pretrained(out)
    vocab.unlink()  # the saved tokenizer.json stands on its own
    return out
