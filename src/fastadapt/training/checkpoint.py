"""Checkpoints users can trust: tensors in safetensors, the rest in JSON, both written atomically.

A checkpoint `NAME` is `NAME.safetensors` plus a manifest `NAME.json` written after it, holding
the tensors' sha256, names and shapes and the JSON state. Loading verifies all of it before
anything is used, and never unpickles. A crash while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..io import load_tensors, read_json, save_tensors, write_json

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "optimizer_to_tensors", "optimizer_from_tensors", "load_module_tensors", "step_name", "prune_checkpoints",
           "top_name", "ranked_validation_steps", "keep_top_checkpoints", "ensemble_checkpoints"]

FORMAT = "fastadapt-checkpoint-v1"
_STEP_PREFIX = "step-"
_TOP_PREFIX = "top-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, tampered with, or does not fit the model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(directory: Path, name: str, tensors: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Writes `name.safetensors` then its manifest `name.json`; returns the manifest path.

    Example:
        >>> save_checkpoint(Path("/tmp/ck"), "demo", {"w": torch.zeros(2)}, {"step": 1}).name  # doctest: +SKIP
        'demo.json'
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / f"{name}.safetensors"
    save_tensors(tensor_path, tensors)
    manifest = {
        "format": FORMAT,
        "tensors": tensor_path.name,
        "sha256": _sha256(tensor_path),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "state": state,
    }
    path = directory / f"{name}.json"
    write_json(path, manifest)
    return path


def load_checkpoint(manifest_path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verifies and loads a checkpoint: `(tensors, state)`; raises `CheckpointError` saying what is wrong."""
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint manifest not found: {manifest_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is truncated or not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a fastadapt checkpoint manifest (format {FORMAT!r} expected)")
    tensor_path = manifest_path.parent / manifest["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors missing: {tensor_path} (named by {manifest_path})")
    digest = _sha256(tensor_path)
    if digest != manifest["sha256"]:
        raise CheckpointError(f"checkpoint {tensor_path} is truncated or was modified: sha256 {digest}, "
                              f"its manifest {manifest_path.name} records {manifest['sha256']}")
    tensors = load_tensors(tensor_path)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != manifest["shapes"]:
        raise CheckpointError(f"checkpoint {tensor_path} holds tensors {shapes}, its manifest lists {manifest['shapes']}")
    return tensors, manifest["state"]


def latest_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """The newest valid `step-*` checkpoint; a corrupt newer one is reported (warning) and skipped."""
    manifests = sorted(directory.glob(f"{_STEP_PREFIX}*.json"), reverse=True)
    problems: list[str] = []
    for manifest in manifests:
        try:
            tensors, state = load_checkpoint(manifest)
        except CheckpointError as error:
            problems.append(str(error))
            warnings.warn(f"skipping a bad checkpoint: {error}", stacklevel=2)
            continue
        return tensors, state, manifest
    detail = "; ".join(problems) if problems else "there are none"
    raise CheckpointError(f"no valid checkpoint in {directory}: {detail}")


def step_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:09d}"


def top_name(step: int) -> str:
    """The name of the weights validated at `step`, kept while among the run's best (`keep_best`)."""
    return f"{_TOP_PREFIX}{step:09d}"


def ranked_validation_steps(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    """The validated steps of a metrics history, best first: highest accuracy where the rows have
    one (classification), else lowest loss; of equal scores the earlier step first (as `best`,
    which only a strictly better validation replaces).

    Example:
        >>> rows = [{"phase": "validation", "step": 5, "accuracy": 0.9, "loss": 0.3},
        ...         {"phase": "train", "step": 6, "accuracy": 0.99, "loss": 0.1},
        ...         {"phase": "validation", "step": 10, "accuracy": 0.95, "loss": 0.2},
        ...         {"phase": "validation", "step": 15, "accuracy": 0.9, "loss": 0.25}]
        >>> ranked_validation_steps(rows)
        [10, 5, 15]
    """
    scored = []
    for row in rows:
        if row["phase"] != "validation":
            continue
        accuracy = row.get("accuracy")
        has_accuracy = accuracy not in (None, "")
        score = float(accuracy) if has_accuracy else -float(row["loss"])
        scored.append((-score, int(row["step"])))
    return [step for _, step in sorted(scored)]


def keep_top_checkpoints(directory: Path, tensors: dict[str, Tensor], state: dict[str, Any],
                         best_steps: list[int]) -> None:
    """Saves the weights of `state["step"]` as `top-<step>` if that step is among `best_steps`, and
    deletes every other `top-*` checkpoint not among them."""
    if state["step"] in best_steps:
        save_checkpoint(directory, top_name(state["step"]), tensors, state)
    for manifest in directory.glob(f"{_TOP_PREFIX}*.json"):
        if int(manifest.stem[len(_TOP_PREFIX):]) not in best_steps:
            _delete_checkpoint(manifest)


def ensemble_checkpoints(directory: Path, ranked_steps: list[int], count: int) -> list[Path]:
    """The manifests of the `count` best validated steps (`ranked_validation_steps`): each step's
    `top-*`, `step-*` or `best` checkpoint. Raises `CheckpointError` naming a step whose weights
    were not kept, rather than substituting a worse one."""
    if count > len(ranked_steps):
        raise CheckpointError(f"an ensemble of {count} needs {count} validations; the run in {directory.parent} "
                              f"has {len(ranked_steps)}")
    best_step = None
    if (directory / "best.json").is_file():
        best_step = read_json(directory / "best.json")["state"]["step"]
    found = []
    for rank, step in enumerate(ranked_steps[:count], 1):
        candidates = [directory / f"{top_name(step)}.json", directory / f"{step_name(step)}.json"]
        if step == best_step:
            candidates.append(directory / "best.json")
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise CheckpointError(f"the run's validation number {rank} (step {step}) has no checkpoint left in "
                                  f"{directory}: train with keep_best >= {count} to ensemble {count}")
        found.append(path)
    return found


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Deletes all but the newest `keep` step checkpoints."""
    for manifest in sorted(directory.glob(f"{_STEP_PREFIX}*.json"), reverse=True)[keep:]:
        _delete_checkpoint(manifest)


def _delete_checkpoint(manifest: Path) -> None:
    """The manifest first: a crash in between leaves stray tensors, never a manifest without them."""
    manifest.unlink(missing_ok=True)
    manifest.with_suffix(".safetensors").unlink(missing_ok=True)


def load_module_tensors(module: nn.Module, tensors: dict[str, Tensor], prefix: str, source: Path) -> None:
    """Loads `prefix`-ed tensors into `module`, checking names and shapes first."""
    expected = module.state_dict()
    found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint {source} does not fit the model: missing {missing}, unexpected {extra}")
    for key, value in found.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"checkpoint {source}: tensor {key!r} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")
    module.load_state_dict(found)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Splits an optimizer state into tensors (for safetensors) and JSON-able rest."""
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": saved["param_groups"], "plain_state": plain}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict[str, Any]) -> None:
    """Inverse of `optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in rest["plain_state"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
