"""The webUI prompt language: <lora:...> tags, A1111 attention weights, chunking, embeddings."""

from __future__ import annotations

import pytest
import torch

from studio.errors import StudioError
from studio.generate.prompt import (extract_network_tags, lora_tag, parse_prompt_attention, prompt_warnings,
                                    tokenize_chunks)


def _approx(parsed):
    return [(t, round(w, 4)) for t, w in parsed]


def test_lora_tags_are_extracted_with_weights():
    clean, tags, warnings = extract_network_tags("a photo <lora:mydog:0.8> of sks <lora:style:0.5:1.2>"
                                                 "<lyco:old:te=0.3:unet=0.9> dog <lora:plain>")
    assert clean == "a photo  of sks  dog "
    got = [(t.name, t.te, t.unet) for t in tags]
    assert got == [("mydog", 0.8, 0.8), ("style", 0.5, 1.2), ("old", 0.3, 0.9), ("plain", 1.0, 1.0)]
    assert warnings == []


@pytest.mark.parametrize("prompt, message", [
    ("x <lora:mydog:abc>", "Bad weight 'abc' in <lora:mydog:abc>"),
    ("x <lora::0.5>", "has no adapter name"),
    ("x <lora:a:1:2:3>", "too many weights"),
    ("x <lora:a:foo=1>", "unknown setting foo"),
])
def test_malformed_lora_tags_say_what_is_wrong(prompt, message):
    with pytest.raises(StudioError, match=message):
        extract_network_tags(prompt)


def test_unclosed_tag_and_other_networks_are_warnings_not_errors():
    clean, tags, warnings = extract_network_tags("a <hypernet:x:1> dog <lora:mydog:0.8")
    assert tags == [] and clean == "a  dog <lora:mydog:0.8"
    assert any("hypernet" in w for w in warnings) and any("no closing '>'" in w for w in warnings)


def test_lora_tag_round_trips():
    for te, unet in [(0.8, None), (0.5, 1.25), (1.0, 1.0)]:
        _, tags, _ = extract_network_tags(lora_tag("n", te, unet))
        assert (tags[0].te, tags[0].unet) == (te, te if unet is None else unet)


def test_attention_syntax_matches_a1111():
    # The expected values are those of A1111's documented examples (modules/prompt_parser.py).
    assert _approx(parse_prompt_attention("normal text")) == [("normal text", 1.0)]
    assert _approx(parse_prompt_attention("an (important) word")) == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert _approx(parse_prompt_attention("(unbalanced")) == [("unbalanced", 1.1)]
    assert _approx(parse_prompt_attention("\\(literal\\]")) == [("(literal]", 1.0)]
    assert _approx(parse_prompt_attention("(unnecessary)(parens)")) == [("unnecessaryparens", 1.1)]
    assert _approx(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")) == [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]  # one '(' of '(((' is never closed
    assert _approx(parse_prompt_attention("[[nested]] (x:0.5) ((y:2))")) == [
        ("nested", 0.8264), (" ", 1.0), ("x", 0.5), (" ", 1.0), ("y", 2.2)]
    assert _approx(parse_prompt_attention("a BREAK b")) == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert _approx(parse_prompt_attention("a: b) c")) == [("a: b) c", 1.0)]  # stray ':' and ')' are text
    assert parse_prompt_attention("") == [("", 1.0)]


def test_bad_attention_weight_is_a_clear_error():
    with pytest.raises(StudioError, match=r"Bad attention weight '1\.2\.3'"):
        parse_prompt_attention("a (word:1.2.3) b")


def test_unbalanced_brackets_are_reported():
    assert prompt_warnings("(a [b] c) \\(ok\\)") == []
    w = prompt_warnings("((a) b] c [d")
    assert any("'(' never closed" in x for x in w)
    assert any("'[' never closed" in x for x in w)
    assert any("']' at position 6 closes nothing" in x for x in w)


def test_chunks_break_and_comma_backtrack(sd1_pipe):
    tok = sd1_pipe.tokenizer
    one = tokenize_chunks(parse_prompt_attention("a dog"), tok)
    assert len(one) == 1 and len(one[0].tokens) == 77
    assert one[0].tokens[:4] == [tok.bos_token_id, *tok("a dog", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert len(tokenize_chunks(parse_prompt_attention("a dog BREAK a cat"), tok)) == 2
    words = ", ".join(["red dog"] * 30)  # > 75 tokens, commas every 3 tokens
    chunks = tokenize_chunks(parse_prompt_attention(words), tok)
    assert len(chunks) == 2 and all(len(c.tokens) == 77 for c in chunks)
    comma = tok(",", add_special_tokens=False).input_ids[0]
    first = chunks[0].tokens[1:chunks[0].tokens.index(tok.eos_token_id)]
    assert first[-1] == comma  # the first chunk was cut after its last comma, as A1111 does
    weighted = tokenize_chunks(parse_prompt_attention("(dog:1.5)"), tok)[0]
    n = len(tok("dog", add_special_tokens=False).input_ids)
    assert weighted.weights[1:1 + n] == [1.5] * n and weighted.weights[0] == 1.0


def test_plain_prompt_equals_diffusers_encoding(sd1_pipe, sdxl_pipe):
    from studio.generate.prompt import encode_prompt

    ours = encode_prompt(sd1_pipe, "a photo of a dog").embeds
    theirs, _ = sd1_pipe.encode_prompt("a photo of a dog", "cpu", 1, False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    skip2 = encode_prompt(sd1_pipe, "a photo of a dog", clip_skip=2).embeds
    # (diffusers' own clip_skip path reads text_encoder.text_model, gone in transformers 5: done by hand)
    ids = sd1_pipe.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd1_pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        theirs2 = sd1_pipe.text_encoder.final_layer_norm(hidden[-2])
    assert torch.allclose(skip2, theirs2, atol=1e-5) and not torch.allclose(skip2, ours, atol=1e-3)
    xl = encode_prompt(sdxl_pipe, "a photo of a dog")
    t_embeds, _, t_pooled, _ = sdxl_pipe.encode_prompt("a photo of a dog", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(xl.embeds, t_embeds, atol=1e-5) and torch.allclose(xl.pooled, t_pooled, atol=1e-5)


def test_weights_scale_tokens_and_keep_the_mean(sd1_pipe):
    from studio.generate.prompt import encode_prompt

    plain = encode_prompt(sd1_pipe, "a photo of a dog").embeds
    assert torch.allclose(encode_prompt(sd1_pipe, "a photo of a (dog:1.0)").embeds, plain, atol=1e-6)
    w = encode_prompt(sd1_pipe, "a photo of a (dog:1.5)").embeds
    n = 1 + len(sd1_pipe.tokenizer("a photo of a", add_special_tokens=False).input_ids)
    # the weighted token is 1.5x its plain value relative to every other token (whatever the mean rescale)
    rel = (w[0, n] / plain[0, n]) / (w[0, 1] / plain[0, 1])
    assert torch.allclose(rel, torch.full_like(rel, 1.5), atol=1e-4)


def test_emphasis_restores_the_chunk_mean():
    from studio.generate.prompt import _weighted

    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.3
    weights = [1.0] * 5 + [1.5, 1.5] + [0.8] * 70
    got = _weighted(z, weights)
    scaled = z * torch.tensor(weights).view(1, -1, 1)
    assert torch.allclose(got.mean(), z.mean(), atol=1e-6)
    assert torch.allclose(got, scaled * (z.mean() / scaled.mean()), atol=1e-6)


def test_long_prompts_are_chunked(sd1_pipe):
    from studio.generate.prompt import encode_prompt

    plain = encode_prompt(sd1_pipe, "a photo of a dog").embeds
    long = encode_prompt(sd1_pipe, ", ".join(["red dog"] * 30)).embeds
    assert long.shape == (1, 154, plain.shape[-1])


def test_embedding_by_token_equals_diffusers_textual_inversion(tiny_sd1):
    from studio.generate.prompt import encode_prompt
    from studio.models.loader import load_pipeline

    pipe = load_pipeline(str(tiny_sd1), "cpu", torch.float32).pipe
    vec = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ours = encode_prompt(pipe, "a photo of mytoken dog", embeddings={"mytoken": {"emb_params": vec}}).embeds
    pipe.load_textual_inversion({"mytoken": vec}, token="mytoken")  # mutates this pipe: our own copy
    theirs, _ = pipe.encode_prompt("a photo of mytoken dog", "cpu", 1, False)
    assert torch.allclose(ours, theirs, atol=1e-5)
