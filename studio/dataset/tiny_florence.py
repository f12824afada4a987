"""A tiny, randomly initialised Florence-2 (transformers' native classes), built offline: for tests and
trying the Florence-2 path without a download. Its captions are random words.

The folder looks like a converted hub checkpoint (``florence-community/Florence-2-base``): config and
weights, a ``Florence2Processor`` with a PIL image processor (no torchvision needed) and a byte-level
BPE BART tokenizer whose vocabulary and merges are generated here, with the ``<image>`` token the
processor fills with one placeholder per image feature.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0..3
WORDS = ("a the dog cat sitting on grass red blue photo of with ball and image describe in detail what is "
         "shown describe does").split()
IMAGE_TOKEN = "<image>"


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols byte-level BPE starts from."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        current = word[0]
        for ch in word[1:]:
            merged = current + ch
            if merged not in vocab:
                merges.append((current, ch))
                vocab[merged] = len(vocab)
            current = merged
    for word in WORDS:  # then " word": Ġ (a leading space) joins the whole word, after the word's own merges
        if "\u0120" + word not in vocab:
            merges.append(("\u0120", word))
            vocab["\u0120" + word] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return vocab, merges


def save_tiny_florence(out: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """Write a Florence-2 folder (config, weights, processor, tokenizer) that ``Florence2Captioner`` loads.

    ``image_size`` must be a multiple of 8 (the vision tower downsamples by 4, then by 2).
    """
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, not {image_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": IMAGE_TOKEN})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    side = image_size // 8
    image_seq_length = side * side + 1  # one token per feature-map cell, plus the temporal (mean) token
    d_model = 32
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=d_model, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                         forced_bos_token_id=0, forced_eos_token_id=2),
        vision_config=dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                           patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 2), num_groups=(2, 2),
                           window_size=2, drop_path_rate=0.0, projection_dim=d_model,
                           max_position_embeddings=max(side, 8), max_temporal_embeddings=8),
        image_token_id=image_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    with torch.no_grad():  # predict only " word" tokens (and </s>): the random captions read as words
        keep = torch.tensor([tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(["\u0120" + w for w in WORDS]))
        weight = model.lm_head.weight
        weight.copy_(torch.zeros_like(weight).index_copy_(0, keep, weight[keep]))
    model.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False, crop_size=None,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=image_seq_length)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
