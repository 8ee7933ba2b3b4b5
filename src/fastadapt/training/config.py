"""Experiment configs: one flat, validated record that fixes everything a result depends on.

Recipes are YAML files of these keys (`recipes/`); `--set key=value` overrides single keys.
Every key is checked where it enters: unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..algorithms.mamlpp import MSL_ITERATIONS
from ..algorithms.reptile import INNER_STATES
from ..data.registry import DataOptions, dataset_info

__all__ = ["Config", "ConfigError", "load_recipe", "saved_config", "parse_overrides", "ALGORITHMS", "DATASETS",
           "DEVICE_PATTERN"]

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "protonet", "imaml", "baseline", "maml++", "reptile",
              "matchingnet")
DATASETS = ("omniglot", "mnist", "mini-imagenet", "folder:PATH", "sinusoid")  # data.registry
BACKBONES = ("conv4", "conv4-strided", "resnet12", "mlp")  # conv4-strided: Conv4(pooling="stride")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step", "linear")
PRECISIONS = ("fp32", "bf16")
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
HEADS = ("linear", "cosine")
IMAML_PROXIMAL = ("every_step", "pull_back")
# the MAML family: one GradientLearner with options (algorithms.gradient)
_MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "maml++")
# algorithms whose inner loop can run another optimizer than SGD (inner_optimizer)
_INNER_OPTIMIZER_ALGORITHMS = ("imaml", "reptile", *_MAML_FAMILY)
# algorithms that train tasks (or task groups) in threads (task_workers)
_TASK_WORKER_ALGORITHMS = (*_MAML_FAMILY, "imaml")
SIMILARITIES = ("cosine", "scaled-cosine")
DEVICE_PATTERN = r"cpu|cuda(:\d+)?"  # where a run lives: cpu, cuda or cuda:N


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
    # images of folder datasets are decoded at this size and channel count (null: the dataset's own;
    # mini-imagenet: 84, RGB)
    image_size: int | None = None
    channels: int | None = None
    backbone: str = "mlp"
    # resnet12: DropBlock rate after its last two blocks (0: none; MetaOptNet: 0.1)
    drop_rate: float = 0.0
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
    # how many of the best validated weights to keep (checkpoints/top-*), for `fastadapt eval --ensemble K`
    keep_best: int = 1
    checkpoint_every: int = 500
    eval_episodes: int = 1000
    seed: int = 0
    eval_seed: int = 0
    threads: int | None = None
    # MAML family and imaml on conv4 (CPU): tasks (task groups) train, and episode batches evaluate,
    # this many at once in Python threads with one intra-op thread each: a one-thread run's numbers
    # bit for bit (not part of what a result depends on, like threads: a run resumes with another count)
    task_workers: int = 1
    # where the learner and its episodes live: cpu, cuda or cuda:N (not part of what a result depends
    # on: a run trained on a GPU resumes and evaluates on a CPU and back)
    device: str = "cpu"
    tensorboard: bool = False
    precision: str = "fp32"
    compile: bool = False
    checkpoint_inner_loop: bool = False
    # iMAML (Rajeswaran et al. 2019): proximal strength lambda, conjugate-gradient iterations and damping
    imaml_lambda: float = 2.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    # iMAML's proximal strength at test time (evaluation, validation); null: imaml_lambda; 0: plain
    # fine-tuning from the meta-parameters (the authors' measure_accuracy.py)
    eval_imaml_lambda: float | None = None
    # where iMAML's proximal term acts: every_step (the paper) or pull_back (the authors' code)
    imaml_proximal: str = "every_step"
    inner_optimizer: str = "sgd"
    # Baseline (linear head) / Baseline++ (cosine head), Chen et al. 2019
    head: str = "linear"
    # MAML++ (Antoniou et al. 2019) options of the MAML family; null: the algorithm's default
    # (on for maml++: per-step rates, multi-step loss over 5000 iterations, per-step BN weights)
    per_step_inner_lr: bool | None = None
    multi_step_loss_iterations: int | None = None
    per_step_bn_weights: bool | None = None
    per_step_bn_statistics: bool = False
    first_order_iterations: int = 0
    # floor of the cosine outer learning-rate schedule (schedule: cosine)
    min_meta_lr: float = 0.0
    # support examples per class in training episodes; null: shots (Reptile trains on 10, Nichol et al.)
    train_shots: int | None = None
    # momentum of the outer SGD; null: 0.9 (Reptile's interpolation step needs 0)
    meta_momentum: float | None = None
    # Reptile: inner mini-batch size in training (null: the whole support set) and at test time
    # (null: inner_batch)
    inner_batch: int | None = None
    eval_inner_batch: int | None = None
    # Reptile's inner Adam state: fresh for every task, or persistent (carried across tasks and into
    # evaluation, as the authors' code)
    inner_state: str = "fresh"
    # Matching Networks: full context embeddings with K processing steps, and the similarity
    fce: bool = False
    fce_steps: int = 5
    similarity: str = "cosine"

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
        return "regression" if dataset_info(self.dataset)[0].regression else "classification"

    def data_options(self) -> DataOptions:
        """How the dataset is read (`data.registry.DataOptions`): root, image size, channels, validation."""
        return DataOptions(root=self.data_root, image_size=self.image_size, channels=self.channels,
                           validation=self.validation_characters)

    @property
    def effective_train_ways(self) -> int:
        return self.train_ways or self.ways

    @property
    def effective_train_shots(self) -> int:
        return self.train_shots or self.shots

    @property
    def effective_eval_inner_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps

    @property
    def effective_eval_imaml_lambda(self) -> float:
        """iMAML's proximal strength at test time: `eval_imaml_lambda`, else `imaml_lambda`."""
        return self.imaml_lambda if self.eval_imaml_lambda is None else self.eval_imaml_lambda

    def mamlpp_options(self) -> dict[str, Any]:
        """The MAML++ options of the gradient learner, nulls resolved: on for maml++ (per-step BN
        weights where the backbone has BatchNorm), off for the rest of the MAML family.

        Example:
            >>> Config(algorithm="maml++", dataset="omniglot", backbone="conv4").mamlpp_options()["per_step_inner_lr"]
            True
        """
        plus = self.algorithm == "maml++"

        def resolved(value: Any, default: Any) -> Any:
            return default if value is None else value

        return {
            "per_step_inner_lr": resolved(self.per_step_inner_lr, plus),
            "multi_step_loss_iterations": resolved(self.multi_step_loss_iterations, MSL_ITERATIONS if plus else 0),
            "per_step_bn_weights": resolved(self.per_step_bn_weights, plus and self.backbone != "mlp"),
            "per_step_bn_statistics": self.per_step_bn_statistics,
            "first_order_iterations": self.first_order_iterations,
        }

    def _check_values(self) -> None:
        _choice("algorithm", self.algorithm, ALGORITHMS)
        try:
            dataset_info(self.dataset)
        except ValueError as e:
            raise ConfigError(f"dataset: {e}") from None
        _choice("backbone", self.backbone, BACKBONES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _choice("head", self.head, HEADS)
        _choice("imaml_proximal", self.imaml_proximal, IMAML_PROXIMAL)
        _check_device(self.device)
        for key in ("ways", "shots", "queries", "eval_queries", "inner_steps", "meta_batch", "iterations",
                    "log_every", "checkpoint_every", "schedule_step", "cg_steps", "keep_best", "task_workers"):
            _at_least(key, getattr(self, key), 1)
        if self.image_size is not None:
            _at_least("image_size", self.image_size, 16, "(Conv4's four 2x2 poolings)")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 (grey), 3 (RGB) or null (the dataset's own), got {self.channels!r}")
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
        if not self.imaml_lambda > 0:
            raise ConfigError("imaml_lambda (iMAML's proximal regularisation strength) must be > 0, "
                              f"got {self.imaml_lambda!r}")
        if not self.cg_damping >= 0:
            raise ConfigError(f"cg_damping must be >= 0, got {self.cg_damping!r}")
        if self.eval_imaml_lambda is not None and not self.eval_imaml_lambda >= 0:
            raise ConfigError("eval_imaml_lambda (iMAML's proximal strength at test time) must be >= 0, or null "
                              f"for imaml_lambda, got {self.eval_imaml_lambda!r}")
        changed = [k for k, default in (("imaml_lambda", 2.0), ("cg_steps", 5), ("cg_damping", 0.0),
                                        ("eval_imaml_lambda", None), ("imaml_proximal", "every_step"))
                   if getattr(self, k) != default]
        if changed and self.algorithm != "imaml":
            raise ConfigError(f"{', '.join(changed)} apply to algorithm 'imaml', not {self.algorithm!r}; "
                              "leave them at their defaults")
        if self.inner_optimizer != "sgd" and self.algorithm not in _INNER_OPTIMIZER_ALGORITHMS:
            raise ConfigError(f"inner_optimizer={self.inner_optimizer!r} applies to "
                              f"{', '.join(_INNER_OPTIMIZER_ALGORITHMS)}; the inner loop of {self.algorithm!r} "
                              "is SGD (inner_optimizer: sgd)")
        if self.head != "linear" and self.algorithm != "baseline":
            raise ConfigError(f"head={self.head!r} applies to algorithm 'baseline' (cosine = Baseline++), "
                              f"not {self.algorithm!r}")
        self._check_mamlpp()
        self._check_reptile_matching()
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.drop_rate and self.backbone != "resnet12":
            raise ConfigError(f"drop_rate (DropBlock) applies to backbone resnet12, not {self.backbone!r}")
        if not 0 < self.schedule_gamma <= 1:
            raise ConfigError(f"schedule_gamma must be in (0, 1], got {self.schedule_gamma!r}")
        expected = ("mlp",) if self.task == "regression" else ("conv4", "conv4-strided", "resnet12")
        if self.backbone not in expected:
            raise ConfigError(f"backbone {self.backbone!r} does not fit dataset {self.dataset!r}; use backbone: "
                              f"{' or '.join(expected)}")
        if self.task == "regression" and self.algorithm in ("protonet", "baseline", "matchingnet"):
            raise ConfigError(f"algorithm {self.algorithm!r} needs a classification dataset; {self.dataset!r} is "
                              "regression (use dataset: omniglot, --dataset omniglot)")
        if self.task == "classification" and self.ways < 2:
            raise ConfigError(f"ways must be >= 2 for classification, got {self.ways}")
        if self.train_ways not in (None, self.ways) and self.algorithm not in ("protonet", "baseline", "matchingnet"):
            raise ConfigError(f"train_ways={self.train_ways} differs from ways={self.ways}: only protonet, matchingnet "
                              "and baseline can train and test with different ways (the others have a ways-sized head)")
        if self.dataset == "omniglot" and self.validation_every and not self.validation_characters:
            raise ConfigError("validation_every > 0 on omniglot needs validation_characters > 0 "
                              "(the characters carved out of meta-training for validation), e.g. 100")
        if self.algorithm in ("protonet", "imaml", "baseline", "reptile", "matchingnet") and (
                self.compile or self.checkpoint_inner_loop):
            raise ConfigError("compile and checkpoint_inner_loop apply to the MAML family (an unrolled inner loop); "
                              f"set them to false for {self.algorithm}")
        if self.algorithm in ("imaml", "baseline", "reptile", "matchingnet") and self.precision != "fp32":
            raise ConfigError(f"precision {self.precision!r} is not implemented for {self.algorithm}; "
                              "use precision: fp32")
        if self.early_stopping and not self.validation_every:
            raise ConfigError("early_stopping needs validation_every > 0 (it counts validations without improvement)")
        if self.keep_best > 1 and not self.validation_every:
            raise ConfigError(f"keep_best={self.keep_best} needs validation_every > 0 (it keeps the best validated weights)")
        self._check_task_workers()

    def _check_task_workers(self) -> None:
        """task_workers > 1 needs a learner that trains tasks in threads (the MAML family, imaml); where
        its plan cannot use them (another backbone, compile, per-step statistics) it runs one at a time."""
        if self.task_workers == 1:
            return
        if self.algorithm not in _TASK_WORKER_ALGORITHMS:
            raise ConfigError(f"task_workers={self.task_workers} trains tasks in threads; not with algorithm "
                              f"{self.algorithm!r} ({', '.join(_TASK_WORKER_ALGORITHMS)}). Set task_workers: 1")

    def _check_reptile_matching(self) -> None:
        """train_shots, the outer momentum, and the Reptile and Matching Networks keys."""
        for key in ("train_shots", "inner_batch", "eval_inner_batch"):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 1)
        _at_least("fce_steps", self.fce_steps, 1)
        _choice("similarity", self.similarity, SIMILARITIES)
        if self.meta_momentum is not None:
            if not 0 <= self.meta_momentum < 1:
                raise ConfigError(f"meta_momentum must be in [0, 1), got {self.meta_momentum!r}")
            if self.optimizer != "sgd":
                raise ConfigError(f"meta_momentum is the momentum of the outer SGD; optimizer is {self.optimizer!r} "
                                  "(use optimizer: sgd, or meta_momentum: null)")
        _choice("inner_state", self.inner_state, INNER_STATES)
        if self.inner_state == "persistent" and (self.algorithm, self.inner_optimizer) != ("reptile", "adam"):
            raise ConfigError("inner_state 'persistent' carries Reptile's inner Adam state across tasks; got "
                              f"algorithm {self.algorithm!r} with inner_optimizer {self.inner_optimizer!r} (use algorithm: "
                              "reptile with inner_optimizer: adam, or inner_state: fresh)")
        batches = [k for k in ("inner_batch", "eval_inner_batch") if getattr(self, k) is not None]
        if batches and self.algorithm != "reptile":
            raise ConfigError(f"{' and '.join(batches)} (inner mini-batches) only apply to algorithm 'reptile', "
                              f"not {self.algorithm!r}; leave them unset (null)")
        matching = [k for k, on in (("fce", self.fce), ("fce_steps", self.fce_steps != 5),
                                    ("similarity", self.similarity != "cosine")) if on]
        if matching and self.algorithm != "matchingnet":
            raise ConfigError(f"{', '.join(matching)}: only algorithm 'matchingnet' has these options, not "
                              f"{self.algorithm!r}; leave them at their defaults (fce: false, fce_steps: 5, "
                              "similarity: cosine)")

    def _check_mamlpp(self) -> None:
        """The inner optimizer, MAML++ options and cosine floor: ranges and combinations."""
        if self.algorithm == "imaml" and self.inner_optimizer == "momentum":
            raise ConfigError("inner_optimizer 'momentum' is not implemented for imaml; use sgd or adam")
        for key in ("multi_step_loss_iterations", "first_order_iterations"):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 0)
        if not 0 <= self.min_meta_lr < self.meta_lr:
            raise ConfigError(f"min_meta_lr must be >= 0 and below meta_lr={self.meta_lr}, got {self.min_meta_lr!r}")
        if self.min_meta_lr and self.schedule != "cosine":
            raise ConfigError(f"min_meta_lr is the floor of the cosine schedule; schedule is {self.schedule!r} "
                              "(use schedule: cosine, or min_meta_lr: 0)")
        options = self.mamlpp_options()
        chosen = [key for key, value in options.items() if value]
        if chosen and self.algorithm not in _MAML_FAMILY:
            raise ConfigError(f"{', '.join(chosen)} apply to the MAML family ({', '.join(_MAML_FAMILY)}), "
                              f"not {self.algorithm!r}")
        if options["per_step_inner_lr"] and self.algorithm == "metasgd":
            raise ConfigError("per_step_inner_lr and metasgd both learn the inner rates (per step and tensor, "
                              "per entry); use algorithm maml++ or set per_step_inner_lr: false")
        if options["first_order_iterations"] and self.algorithm == "fomaml":
            raise ConfigError("first_order_iterations anneals from first to second order; fomaml is first order "
                              "throughout (set it to 0, or use maml / maml++)")
        per_step_norm = [k for k in ("per_step_bn_weights", "per_step_bn_statistics") if options[k]]
        if per_step_norm and self.backbone == "mlp":
            raise ConfigError(f"{', '.join(per_step_norm)} need BatchNorm layers; backbone {self.backbone!r} has "
                              "none (set them to false)")
        per_step = [k for k in ("per_step_inner_lr", *per_step_norm) if options[k]]
        if per_step and self.effective_eval_inner_steps > self.inner_steps:
            raise ConfigError(f"eval_inner_steps={self.eval_inner_steps} exceeds inner_steps={self.inner_steps}, but "
                              f"{', '.join(per_step)} exist only for the {self.inner_steps} training steps")


_TYPES: dict[str, type] = {
    "name": str, "data_root": str, "algorithm": str, "dataset": str, "backbone": str, "optimizer": str,
    "schedule": str, "inner_lr": float, "meta_lr": float, "schedule_gamma": float, "tensorboard": bool,
    "precision": str, "compile": bool, "checkpoint_inner_loop": bool,
    "imaml_lambda": float, "eval_imaml_lambda": float, "imaml_proximal": str, "cg_damping": float,
    "inner_optimizer": str, "head": str,
    "per_step_inner_lr": bool, "per_step_bn_weights": bool, "per_step_bn_statistics": bool, "min_meta_lr": float,
    "meta_momentum": float, "drop_rate": float, "fce": bool, "similarity": str, "device": str, "inner_state": str,
}
_OPTIONAL = {"name", "data_root", "image_size", "channels", "train_ways", "eval_inner_steps", "threads", "eval_imaml_lambda",
             "per_step_inner_lr", "multi_step_loss_iterations", "per_step_bn_weights",
             "train_shots", "meta_momentum", "inner_batch", "eval_inner_batch"}
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


def _check_device(value: str) -> None:
    """cpu, cuda or cuda:N; whether that device exists is checked where the run starts."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ConfigError(f"device must be cpu, cuda or cuda:N (N a GPU index), got {value!r}")


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


def saved_config(values: Any, source: str | os.PathLike[str]) -> Config:
    """The config a run saved in `source` (its config.json or a checkpoint), validated; keys added
    to the library since then take their defaults. A config this version cannot read (a key it no
    longer knows, a value it no longer allows) is a ConfigError naming the file.

    Example:
        >>> saved_config({"iterations": 10}, "run/config.json").iterations
        10
    """
    try:
        return Config.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{source} holds a config this version of fastadapt cannot read (made with "
                          f"another version?): {error}") from None
