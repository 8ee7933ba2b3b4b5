"""Experiment configs: one flat, validated record that fixes everything a result depends on.

Recipes are YAML files of these keys (`recipes/`); `--set key=value` overrides single keys.
Every key is checked where it enters: unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["Config", "ConfigError", "load_recipe", "parse_overrides", "ALGORITHMS", "DATASETS"]

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "protonet")
DATASETS = ("omniglot", "sinusoid")
BACKBONES = ("conv4", "mlp")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A config key with a bad value, or an unknown key; the message names both and the fix."""


@dataclass(frozen=True)
class Config:
    """Everything a run depends on. Defaults: MAML on sinusoid regression (the embedded default).

    Example:
        >>> Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4"}).ways
        5
    """

    name: str | None = None
    algorithm: str = "maml"
    dataset: str = "sinusoid"
    data_root: str | None = None
    backbone: str = "mlp"
    ways: int = 5
    train_ways: int | None = None
    shots: int = 10
    queries: int = 10
    eval_queries: int = 100
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    inner_lr: float = 0.01
    meta_batch: int = 25
    optimizer: str = "adam"
    meta_lr: float = 1e-3
    schedule: str = "constant"
    schedule_step: int = 1000
    schedule_gamma: float = 0.5
    iterations: int = 10000
    log_every: int = 100
    validation_every: int = 0
    validation_episodes: int = 200
    validation_characters: int = 0
    early_stopping: int = 0
    checkpoint_every: int = 500
    eval_episodes: int = 1000
    seed: int = 0
    eval_seed: int = 0
    threads: int | None = None
    tensorboard: bool = False
    precision: str = "fp32"
    compile: bool = False
    checkpoint_inner_loop: bool = False

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """Validates `values` (unknown keys, types, ranges, combinations) and builds the config."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}; allowed keys: {', '.join(known)}")
        for key, value in values.items():
            _check_type(key, value, _TYPES[key])
        config = cls(**{k: float(v) if _TYPES[k] is float and v is not None else v for k, v in values.items()})
        config._check_values()
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some keys changed."""
        return Config.from_dict({**self.to_dict(), **changes})

    # -- derived ------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return "regression" if self.dataset == "sinusoid" else "classification"

    @property
    def effective_train_ways(self) -> int:
        return self.train_ways or self.ways

    @property
    def effective_eval_inner_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps

    def _check_values(self) -> None:
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        for key in ("ways", "shots", "queries", "eval_queries", "inner_steps", "meta_batch", "iterations",
                    "log_every", "checkpoint_every", "schedule_step"):
            _at_least(key, getattr(self, key), 1)
        for key in ("train_ways", "eval_inner_steps", "threads"):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 1)
        for key in ("validation_every", "validation_characters", "early_stopping", "seed", "eval_seed"):
            _at_least(key, getattr(self, key), 0)
        for key in ("validation_episodes", "eval_episodes"):
            _at_least(key, getattr(self, key), 2, "(a confidence interval needs at least 2 episodes)")
        for key in ("inner_lr", "meta_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.schedule_gamma <= 1:
            raise ConfigError(f"schedule_gamma must be in (0, 1], got {self.schedule_gamma!r}")
        expected = "mlp" if self.dataset == "sinusoid" else "conv4"
        if self.backbone != expected:
            raise ConfigError(f"backbone {self.backbone!r} does not fit dataset {self.dataset!r}; use backbone: {expected}")
        if self.dataset == "sinusoid" and self.algorithm == "protonet":
            raise ConfigError("algorithm 'protonet' needs a classification dataset; 'sinusoid' is regression")
        if self.dataset == "omniglot" and self.ways < 2:
            raise ConfigError(f"ways must be >= 2 for classification, got {self.ways}")
        if self.train_ways not in (None, self.ways) and self.algorithm != "protonet":
            raise ConfigError(f"train_ways={self.train_ways} differs from ways={self.ways}: only protonet can "
                              "train and test with different ways (the others have a ways-sized head)")
        if self.dataset == "omniglot" and self.validation_every and not self.validation_characters:
            raise ConfigError("validation_every > 0 on omniglot needs validation_characters > 0 "
                              "(the characters carved out of meta-training for validation), e.g. 100")
        if self.algorithm == "protonet" and (self.compile or self.checkpoint_inner_loop):
            raise ConfigError("compile and checkpoint_inner_loop apply to the gradient-based algorithms "
                              "(they have an inner loop); set them to false for protonet")
        if self.early_stopping and not self.validation_every:
            raise ConfigError("early_stopping needs validation_every > 0 (it counts validations without improvement)")


_TYPES: dict[str, type] = {
    "name": str, "data_root": str, "algorithm": str, "dataset": str, "backbone": str, "optimizer": str,
    "schedule": str, "inner_lr": float, "meta_lr": float, "schedule_gamma": float, "tensorboard": bool,
    "precision": str, "compile": bool, "checkpoint_inner_loop": bool,
}
_OPTIONAL = {"name", "data_root", "train_ways", "eval_inner_steps", "threads"}
for _f in fields(Config):
    _TYPES.setdefault(_f.name, int)


def _check_type(key: str, value: Any, expected: type) -> None:
    if value is None and key in _OPTIONAL:
        return
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        label = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[expected]
        nullable = " or null" if key in _OPTIONAL else ""
        raise ConfigError(f"{key} must be {label}{nullable}, got {value!r} ({type(value).__name__})")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: int, minimum: int, why: str = "") -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}" + (f" {why}" if why else ""))


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["shots=5", "meta_lr=0.003"]` -> `{"shots": 5, "meta_lr": 0.003}` (values read as YAML scalars).

    Example:
        >>> parse_overrides(["shots=5", "name=trial", "train_ways=null"])
        {'shots': 5, 'name': 'trial', 'train_ways': None}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key.strip()}: cannot read value {text!r} ({error})") from None
    return out


def load_recipe(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads a YAML recipe, applies `overrides`, validates.

    Example:
        >>> load_recipe("recipes/maml/sinusoid-10shot.yaml", {"iterations": 10}).iterations  # doctest: +SKIP
        10
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(values).__name__}")
    try:
        return Config.from_dict({**values, **(overrides or {})})
    except ConfigError as error:
        raise ConfigError(f"recipe {path}: {error}") from None
