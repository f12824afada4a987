"""Textual Inversion (method ``ti``): a new word whose embedding rows are the only weights that train.

As diffusers' ``textual_inversion.py``: the token (and, for N vectors, ``token_1`` ... ``token_{N-1}``)
is added to the tokenizer(s), the text encoders' token-embedding matrices grow by N rows
initialised from the init word's vectors, and the whole matrix is the trained parameter. Two
guards keep every other row bit-for-bit equal: their gradients are zeroed before clipping and
the optimizer step (so the gradient norm is the new rows' alone), and after each step they are
copied back from the original (AdamW's weight decay would otherwise shrink them). SDXL trains
the rows of both text encoders. The result is a webUI embedding named after the token:
``emb_params`` (SD1/SD2) or ``clip_l`` + ``clip_g`` (SDXL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError


def token_names(token: str, n: int) -> list[str]:
    """The tokens one N-vector word becomes (diffusers' ``load_textual_inversion`` naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand(text: str, token: str, n: int, prepend: bool = False) -> str:
    """``token`` -> ``token token_1 ...`` in ``text``; with ``prepend`` a text without it gets it in front."""
    word = re.compile(rf"(?<![\w-]){re.escape(token)}(?![\w-])")
    if not word.search(text):
        if not prepend:
            return text
        text = f"{token}, {text}" if text.strip() else token
    return word.sub(" ".join(token_names(token, n)), text)


@dataclass
class NewRows:
    """The trained rows ``[start:]`` of one text encoder's token-embedding matrix."""
    weight: object  # the nn.Parameter [vocab + n, dim]
    start: int
    original: object  # a copy of the rows that must not change, [start, dim]

    def mask_gradient(self) -> None:
        if self.weight.grad is not None:
            self.weight.grad[:self.start] = 0

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            self.weight[:self.start] = self.original

    def vectors(self):
        return self.weight.detach()[self.start:].float().cpu().clone()


def add_tokens(cfg, tokenizers: list, text_encoders: list) -> list[NewRows]:
    """Add ``cfg.token``'s N tokens to every tokenizer, grow the embeddings, initialise from ``cfg.init_word``."""
    import torch

    names = token_names(cfg.token, cfg.num_vectors)
    rows, done = [], set()
    for tok, te in zip(tokenizers, text_encoders):
        init_ids = tok.encode(cfg.init_word, add_special_tokens=False)
        if not init_ids:
            raise StudioError(f"Config key 'init_word': {cfg.init_word!r} gives no tokens.", "Use an ordinary word.")
        if id(tok) not in done:  # (a pipeline may share one tokenizer between its encoders)
            vocab = tok.get_vocab()  # (CLIP spells a whole word "dog</w>")
            clash = [n for n in names if n in vocab or f"{n.lower()}</w>" in vocab]
            if clash:
                raise StudioError(f"Config key 'token': {clash[0]!r} is already a word the tokenizer knows.",
                                  "Pick a made-up word the model has never seen, e.g. 'mycat-ti'.")
            tok.add_tokens(names)
            done.add(id(tok))
        start = te.get_input_embeddings().weight.shape[0]
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        weight = te.get_input_embeddings().weight
        with torch.no_grad():
            for i in range(cfg.num_vectors):  # a multi-token init word fills the vectors in turn
                weight[start + i] = weight[init_ids[i % len(init_ids)]]
        weight.requires_grad_(True)
        rows.append(NewRows(weight, start, weight.detach()[:start].clone()))
    return rows


def vectors_by_key(rows: list[NewRows]) -> dict:
    """The webUI tensors: ``emb_params`` for one text encoder, ``clip_l`` + ``clip_g`` for SDXL's two."""
    if len(rows) == 1:
        return {"emb_params": rows[0].vectors()}
    return {"clip_l": rows[0].vectors(), "clip_g": rows[1].vectors()}


def save(path: Path, rows: list[NewRows], family: str, cfg, step: int, base_name: str, dtype) -> Path:
    from studio.adapters import save_embedding

    meta = {"ti_token": cfg.token, "ti_init_word": cfg.init_word, "ti_num_vectors": str(cfg.num_vectors),
            "ss_steps": str(step), "ss_sd_model_name": base_name, "ss_learning_rate": str(cfg.learning_rate),
            "ss_training_comment": "textual inversion trained with Adapter Studio"}
    return save_embedding(path, vectors_by_key(rows), family, metadata=meta, dtype=dtype)
