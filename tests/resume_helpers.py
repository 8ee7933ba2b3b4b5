"""A run that repeats and resumes exactly: the check several test files share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import fastadapt
from fastadapt.training.checkpoint import load_checkpoint, step_name


def assert_repeats_and_resumes_exactly(config: dict[str, Any], tmp_path: Path, cut_at: int) -> dict[str, torch.Tensor]:
    """Trains `config` twice (the same numbers), then once more cut after step `cut_at` (later
    checkpoints and results deleted, as a crash leaves it) and resumed: the same numbers and the
    same final weights. Returns the final checkpoint's tensors."""
    whole = fastadapt.train(config, tmp_path / "whole", progress=False)
    again = fastadapt.train(config, tmp_path / "again", progress=False)
    assert whole["mean"] == again["mean"]
    cut = tmp_path / "cut"
    fastadapt.train(config, cut, progress=False)
    for f in (cut / "checkpoints").iterdir():
        if not f.name.startswith(step_name(cut_at)):
            f.unlink()
    (cut / "results.json").unlink()
    resumed = fastadapt.train(out=cut, resume=True, progress=False)
    assert resumed["mean"] == whole["mean"]
    last = step_name(config["iterations"])
    a, _ = load_checkpoint(tmp_path / "whole" / "checkpoints" / f"{last}.json")
    b, _ = load_checkpoint(cut / "checkpoints" / f"{last}.json")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("learner."))
    return a
