"""``python -m studio merge / resize / extract`` end to end on small files."""

from __future__ import annotations

import json

import torch

from test_merge_util import random_lora_modules, rel, weight_shapes, weighted_sum, write_lora


def test_merge_resize_extract_commands(tmp_path, sd1_pipe, tiny_sd1_file, capsys):
    from studio.adapters import load_adapter
    from studio.cli import main
    from studio.fileio import read_safetensors_header
    from test_merge_util import dense_deltas

    shapes = weight_shapes(sd1_pipe)
    a = write_lora(tmp_path / "a.safetensors", random_lora_modules(shapes, 4, 4.0, seed=1))
    b = write_lora(tmp_path / "b.safetensors", random_lora_modules(shapes, 2, 1.0, seed=2))

    out = tmp_path / "m.safetensors"
    assert main(["merge", str(out), f"{a}:0.7", f"{b}:-0.3", "--concat", "--dtype", "fp32", "-q"]) == 0
    assert "Wrote m.safetensors" in capsys.readouterr().out
    want = weighted_sum([(a, 0.7), (b, -0.3)])
    got = dense_deltas(out)
    assert all(rel(got[n], want[n]) <= 1e-5 for n in want)
    recipe = json.loads(load_adapter(out).metadata["studio.merge_recipe"])
    assert [(e["name"], e["weight"]) for e in recipe["inputs"]] == [("a.safetensors", 0.7), ("b.safetensors", -0.3)]

    assert main(["merge", str(tmp_path / "r.safetensors"), str(a), f"{b}:0.5", "--rank", "3", "-q"]) == 0
    assert {m.rank for m in load_adapter(tmp_path / "r.safetensors").modules.values()} == {3}

    assert main(["resize", str(a), str(tmp_path / "small.safetensors"), "--rank", "2", "-q"]) == 0
    small = load_adapter(tmp_path / "small.safetensors")
    assert {(m.rank, m.alpha) for m in small.modules.values()} == {(2, 2.0)}

    baked = tmp_path / "baked.safetensors"
    assert main(["merge", str(baked), f"{a}:1.0", "--into", str(tiny_sd1_file), "--dtype", "fp32", "-q"]) == 0
    assert set(read_safetensors_header(baked).tensors) == set(read_safetensors_header(tiny_sd1_file).tensors)
    ex = tmp_path / "ex.safetensors"
    assert main(["extract", str(baked), str(tiny_sd1_file), str(ex), "--rank", "4", "--conv-rank", "4",
                 "--dtype", "fp32", "-q"]) == 0
    want, got = dense_deltas(a), dense_deltas(ex)
    assert set(got) == set(want) and all(rel(got[n], want[n]) <= 1e-4 for n in want)


def test_cli_errors_exit_2_with_a_message(tmp_path, sd1_pipe, capsys):
    from studio.cli import main

    a = write_lora(tmp_path / "a.safetensors", random_lora_modules(weight_shapes(sd1_pipe), 2, 2.0, seed=1))
    xl = write_lora(tmp_path / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1": {
        "lora_down.weight": torch.randn(2, 64), "lora_up.weight": torch.randn(128, 2), "alpha": torch.tensor(2.0)}},
        family="sdxl")
    assert main(["merge", str(tmp_path / "o.safetensors"), f"{a}:1", f"{xl}:1", "-q"]) == 2
    err = capsys.readouterr().err
    assert "a.safetensors" in err and "xl.safetensors" in err and "different model families" in err
    assert main(["merge", str(tmp_path / "o.safetensors"), str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "o.safetensors"), str(a), "--blocks", "wing=2"]) == 2
    assert "known key" in capsys.readouterr().err
