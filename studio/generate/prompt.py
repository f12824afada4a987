"""The webUI prompt language, and prompt embeddings computed the way AUTOMATIC1111 computes them.

Three steps, each a plain function so it can be tested alone:

1. ``extract_network_tags``: ``<lora:name:0.8>`` (also ``<lora:name:te:unet>``, ``te=``/``unet=``,
   and ``<lyco:...>``) are taken out of the prompt and returned as ``NetworkTag`` s.
2. ``parse_prompt_attention``: A1111's attention syntax, the same algorithm as its
   ``prompt_parser.parse_prompt_attention``: ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.5)``,
   nesting multiplies, ``\\(`` escapes, unclosed brackets close at the end, ``BREAK`` starts a new
   75-token chunk. A weight that is not a number (``(word:1.2.3)``) is a StudioError, not a crash.
3. ``encode_prompt``: tokens in 75-token chunks (split at the last comma when one is within 20
   tokens, as A1111 does), each chunk wrapped in BOS/EOS and padded with the tokenizer's pad token,
   textual-inversion vectors put in place of their token, per-token weights multiplied in and the
   chunk's mean restored ("Original" emphasis). SD1/SD2 use the ``clip_skip``-th last layer with the
   final layer norm; SDXL concatenates the penultimate layers of both encoders (clip skip 1 and 2
   are the same there, as in A1111 and ComfyUI) and takes the pooled vector of the first chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from studio.errors import StudioError

CHUNK = 75  # tokens per chunk, without BOS/EOS
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"

# --------------------------------------------------------------------------------------------
# 1. <lora:...> tags


@dataclass
class NetworkTag:
    kind: str  # "lora" (a <lyco:...> tag is read as "lora" too, as A1111 does)
    name: str
    te: float = 1.0
    unet: float = 1.0
    text: str = ""  # the tag as written


_RE_TAG = re.compile(r"<(\w+):([^>]+)>")


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise StudioError(f"Bad weight {value.strip()!r} in {tag}: a weight must be a number.",
                          "Write it like <lora:name:0.8> (or <lora:name:te_weight:unet_weight>).") from None


def extract_network_tags(prompt: str) -> tuple[str, list[NetworkTag], list[str]]:
    """Remove ``<kind:...>`` tags from ``prompt``: (prompt without tags, lora tags, warnings)."""
    tags: list[NetworkTag] = []
    warnings: list[str] = []

    def take(m: re.Match) -> str:
        kind, args, text = m.group(1).lower(), m.group(2), m.group(0)
        if kind not in ("lora", "lyco"):
            warnings.append(f"{text}: '{kind}' networks are not supported here; the tag was ignored.")
            return ""
        parts = args.split(":")
        name = parts[0].strip()
        if not name:
            raise StudioError(f"{text} has no adapter name.", "Write it like <lora:name:0.8>.")
        positional = [p for p in parts[1:] if "=" not in p]
        named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        unknown = set(k.strip() for k in named) - {"te", "unet", "dyn"}
        if unknown:
            raise StudioError(f"{text}: unknown setting {', '.join(sorted(unknown))}.",
                              "Only te=, unet= (and dyn=, ignored) are understood.")
        if len(positional) > 2:
            raise StudioError(f"{text} has too many weights.", "At most two: <lora:name:te_weight:unet_weight>.")
        te = _number(named.get("te", positional[0] if positional else "1"), text)
        unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), text)
        if "dyn" in named:
            warnings.append(f"{text}: dyn= (DyLoRA rank) is ignored.")
        tags.append(NetworkTag("lora", name, te, unet, text))
        return ""

    clean = _RE_TAG.sub(take, prompt)
    for m in re.finditer(r"<(lora|lyco):[^>]*$", clean, re.I | re.M):
        warnings.append(f"'{m.group(0)[:40]}' has no closing '>': it is read as plain text.")
    return clean, tags, warnings


def lora_tag(name: str, te: float, unet: float | None = None) -> str:
    """The tag a webUI reads back: ``<lora:name:0.8>`` or ``<lora:name:te:unet>``."""
    fmt = lambda w: f"{w:g}"  # noqa: E731
    if unet is None or unet == te:
        return f"<lora:{name}:{fmt(te)}>"
    return f"<lora:{name}:{fmt(te)}:{fmt(unet)}>"


# --------------------------------------------------------------------------------------------
# 2. attention weights

_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = -1.0  # weight that marks a BREAK fragment


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``"a (b:1.5) [c]"`` -> ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 0.909...)]``.

    Same result as A1111's parser (fragments of equal weight merged; ``("BREAK", -1)`` marks a
    BREAK); a weight that is not a number raises StudioError naming it.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                value = float(weight)
            except ValueError:
                raise StudioError(f"Bad attention weight {weight!r} in the prompt (near {text[max(0, m.start() - 20):m.end()]!r}).",
                                  "Write a weight like (word:1.2).") from None
            multiply_range(round_brackets.pop(), value)
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", BREAK])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def prompt_warnings(text: str) -> list[str]:
    """Things a webUI silently accepts but the user probably did not mean (unbalanced brackets)."""
    out = []
    depth = {"(": 0, "[": 0}
    closers = {")": "(", "]": "["}
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in depth:
            depth[c] += 1
        elif c in closers:
            if depth[closers[c]] == 0:
                out.append(f"A '{c}' at position {i} closes nothing; it is read as text.")
            else:
                depth[closers[c]] -= 1
        i += 1
    for opener, n in depth.items():
        if n:
            out.append(f"{n} '{opener}' never closed: the weight runs to the end of the prompt.")
    return out


# --------------------------------------------------------------------------------------------
# 3. chunks and embeddings


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, object]] = field(default_factory=list)  # (position incl. BOS, vectors [n, dim])


def tokenize_chunks(fragments: list[tuple[str, float]], tokenizer, embeddings: dict | None = None) -> list[Chunk]:
    """A1111's ``tokenize_line``: fragments -> 77-token chunks with weights and embedding positions.

    ``embeddings``: token text -> tensor ``[n_vectors, dim]`` for this tokenizer's encoder.
    """
    embeddings = embeddings or {}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer(",", add_special_tokens=False)["input_ids"]
    comma = comma[-1] if comma else None
    # embedding name -> its token ids, longest first so a longer name wins
    emb_ids = sorted(((tokenizer(name, add_special_tokens=False)["input_ids"], vec) for name, vec in embeddings.items()),
                     key=lambda x: -len(x[0]))
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        fill = CHUNK - len(chunk.tokens)
        # BOS, the text, EOS, then padding: what the tokenizer itself gives with padding="max_length"
        # (A1111 pads SD1 with EOS, which is SD1's pad token too).
        chunk.tokens = [bos] + chunk.tokens + [eos] + [pad] * fill
        chunk.weights = [1.0] + chunk.weights + [1.0] * (fill + 1)
        chunk.fixes = [(pos + 1, vec) for pos, vec in chunk.fixes]
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    texts = [t for t, _ in fragments]
    tokenized = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"] if texts else []
    for tokens, (text, weight) in zip(tokenized, fragments):
        if weight == BREAK and text == "BREAK":
            next_chunk()
            continue
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                moved_t, moved_w = chunk.tokens[cut:], chunk.weights[cut:]
                moved_f = [(p - cut, v) for p, v in chunk.fixes if p >= cut]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.fixes = [(p, v) for p, v in chunk.fixes if p < cut]
                next_chunk()
                chunk.tokens, chunk.weights, chunk.fixes = moved_t, moved_w, moved_f
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            match = next(((ids, vec) for ids, vec in emb_ids if ids and tokens[pos:pos + len(ids)] == ids), None)
            if match is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            ids, vec = match
            n = int(vec.shape[0])
            if n > CHUNK:
                raise StudioError(f"An embedding has {n} vectors, more than fit in one 75-token chunk.",
                                  "Use an embedding with fewer vectors.")
            if len(chunk.tokens) + n > CHUNK:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), vec))
            chunk.tokens += [pad] * n
            chunk.weights += [weight] * n
            pos += len(ids)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks


def _final_norm(te):
    return te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm


def _encode_chunk(te, chunk: Chunk, layer: int, final_norm: bool, want_pooled: bool):
    """Hidden states of one chunk (weights not applied) and, if asked, the projected pooled vector."""
    import torch

    device = te.device
    ids = torch.tensor([chunk.tokens], device=device)
    emb_module = te.get_input_embeddings()
    handle = None
    if chunk.fixes:
        def put_vectors(_module, _inputs, output):
            output = output.clone()
            for pos, vec in chunk.fixes:
                output[0, pos:pos + vec.shape[0]] = vec.to(output.device, output.dtype)
            return output

        handle = emb_module.register_forward_hook(put_vectors)
    try:
        out = te(ids, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    z = out.hidden_states[-layer]
    if final_norm:
        z = _final_norm(te)(z)
    pooled = out.text_embeds if want_pooled and hasattr(out, "text_embeds") else None
    return z, pooled


def _weighted(z, weights):
    """A1111 "Original" emphasis: multiply by the weights, then restore the chunk's mean."""
    import torch

    if all(w == 1.0 for w in weights):
        return z  # what the formula gives, without its 0/0 when the mean is exactly 0
    w = torch.tensor(weights, device=z.device, dtype=z.dtype).reshape(1, -1, 1)
    original_mean = z.mean()
    z = z * w
    new_mean = z.mean()
    return z * (original_mean / new_mean) if new_mean != 0 else z


def _encode_one(te, tokenizer, fragments, embeddings, layer, final_norm, want_pooled):
    chunks = tokenize_chunks(fragments, tokenizer, embeddings)
    zs, pooled = [], None
    for i, chunk in enumerate(chunks):
        z, p = _encode_chunk(te, chunk, layer, final_norm, want_pooled and i == 0)
        zs.append(_weighted(z, chunk.weights))
        if i == 0:
            pooled = p
    import torch

    return torch.cat(zs, dim=1), pooled


@dataclass
class PromptEmbeds:
    embeds: object  # [1, 77*k, dim]
    pooled: object = None  # SDXL only: [1, dim2]


def pipe_family(pipe) -> str:
    """'sdxl', 'sd2' or 'sd1' from the pipeline's classes and configs."""
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
        return "sdxl"
    te_cfg = pipe.text_encoder.config
    if getattr(pipe.unet.config, "cross_attention_dim", 768) == 1024 or getattr(te_cfg, "hidden_act", "") == "gelu":
        return "sd2"
    return "sd1"


def encode_prompt(pipe, text: str, clip_skip: int = 1, embeddings: dict | None = None) -> PromptEmbeds:
    """Embeddings of a prompt (no ``<lora:...>`` tags in it) as A1111 computes them.

    ``embeddings``: token text -> ``{"emb_params": T}`` (SD1/SD2) or ``{"clip_l": T, "clip_g": T}`` (SDXL).
    """
    import torch

    if clip_skip < 1:
        raise StudioError(f"Clip skip must be 1 or more, not {clip_skip}.", "Use 1 (no skip) or 2.")
    fragments = parse_prompt_attention(text)
    embeddings = embeddings or {}
    with torch.no_grad():
        if pipe_family(pipe) != "sdxl":
            n_layers = pipe.text_encoder.config.num_hidden_layers
            layer = min(clip_skip, n_layers)
            vecs = {k: _pick(v, "emb_params", k) for k, v in embeddings.items()}
            z, _ = _encode_one(pipe.text_encoder, pipe.tokenizer, fragments, vecs, layer, True, False)
            return PromptEmbeds(z)
        layer = max(2, clip_skip)
        z1, _ = _encode_one(pipe.text_encoder, pipe.tokenizer, fragments,
                            {k: _pick(v, "clip_l", k) for k, v in embeddings.items()}, layer, False, False)
        z2, pooled = _encode_one(pipe.text_encoder_2, pipe.tokenizer_2, fragments,
                                 {k: _pick(v, "clip_g", k) for k, v in embeddings.items()}, layer, False, True)
        if z1.shape[1] != z2.shape[1]:  # the two tokenizers chunked differently: pad the shorter
            empty1 = _encode_one(pipe.text_encoder, pipe.tokenizer, [("", 1.0)], {}, layer, False, False)[0]
            empty2 = _encode_one(pipe.text_encoder_2, pipe.tokenizer_2, [("", 1.0)], {}, layer, False, False)[0]
            z1, z2 = pad_to_same_length(z1, z2, empty1, empty2)
        return PromptEmbeds(torch.cat([z1, z2.to(z1.dtype)], dim=-1), pooled)


def _pick(vectors: dict, key: str, name: str):
    if key in vectors:
        return vectors[key]
    if len(vectors) == 1 and key == "emb_params":
        return next(iter(vectors.values()))
    raise StudioError(f"Embedding '{name}' has no '{key}' vectors (it has {', '.join(vectors)}).",
                      "Use an embedding made for this base model's family.")


def pad_to_same_length(a, b, empty_a, empty_b):
    """Append empty-prompt chunks to the shorter of two chunked embeddings (A1111's ``pad_cond``)."""
    import torch

    na, nb = a.shape[1] // 77, b.shape[1] // 77
    if na < nb:
        a = torch.cat([a] + [empty_a] * (nb - na), dim=1)
    elif nb < na:
        b = torch.cat([b] + [empty_b] * (na - nb), dim=1)
    return a, b


def empty_embeds(pipe, clip_skip: int = 1) -> PromptEmbeds:
    return encode_prompt(pipe, "", clip_skip)
