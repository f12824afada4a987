"""XY grid over adapter file x adapter weight: cells equal single generations, labelled grid saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import StudioError


def test_xy_grid_cells_equal_single_generations(tmp_path, tiny_sd1, sd1_pipe):
    from test_generate_engine import _lora_file

    from studio.generate.engine import AdapterChoice, GenerateRequest, generate
    from studio.generate.infotext import read_image_params
    from studio.generate.xy import parse_values, run_xy

    a = _lora_file(tmp_path, sd1_pipe, "run-000001", seed=1)
    b = _lora_file(tmp_path, sd1_pipe, "run-000002", seed=2)
    req = GenerateRequest(model=str(tiny_sd1), prompt="a dog", steps=1, seed=4, device="cpu", dtype=torch.float32,
                          adapters=[AdapterChoice(str(a), 1.0)], out_dir=str(tmp_path / "out"))
    res = run_xy(req, "Adapter weight", parse_values("Adapter weight", "0, 1"),
                 "Adapter file", parse_values("Adapter file", f"{a}\n{b}"))
    assert len(res.cells) == 2 and len(res.cells[0]) == 2
    assert res.grid.width > 2 * 64 and res.grid.height > 2 * 64
    single = generate(GenerateRequest(model=str(tiny_sd1), prompt="a dog", steps=1, seed=4, device="cpu",
                                      dtype=torch.float32, adapters=[AdapterChoice(str(b), 1.0)], save=False))
    assert np.array_equal(np.asarray(res.cells[1][1]), np.asarray(single.images[0]))
    assert np.array_equal(np.asarray(res.cells[0][0]), np.asarray(res.cells[1][0]))  # weight 0 = no adapter
    assert not np.array_equal(np.asarray(res.cells[0][1]), np.asarray(res.cells[1][1]))
    p = read_image_params(res.path)
    assert p.extra["X Type"] == "Adapter weight" and p.extra["Y Type"] == "Adapter file"
    with pytest.raises(StudioError, match="CFG values must be numbers"):
        parse_values("CFG", "7, high")
