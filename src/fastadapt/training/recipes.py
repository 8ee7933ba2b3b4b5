"""Recipes: YAML files of config keys, `--set key=value` overrides, saved configs, and the built-in
recipe of `fastadapt run` (`run.yaml` beside this module).

A recipe is read strictly: UTF-8 text, one YAML mapping, no key twice, not empty; every error names
the file.

Example:
    >>> run_recipe({"dataset": "omniglot", "algorithm": "protonet"}).train_ways
    20
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..data.registry import dataset_info
from .config import Config, ConfigError

__all__ = ["load_recipe", "parse_overrides", "saved_config", "read_yaml", "run_recipe", "RUN_RECIPE"]

RUN_RECIPE = Path(__file__).with_name("run.yaml")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that holds a key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str], what: str = "recipe") -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, non-UTF-8, invalid, empty or non-mapping file,
    or a key written twice, is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason}); "
                          "a recipe is a YAML file") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ", ".join(p for p in (error.context, error.problem) if p)
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if values is None:
        raise ConfigError(f"{what} {path} is empty; write the keys it sets (e.g. algorithm: maml, dataset: omniglot)")
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values, got {type(values).__name__}")
    return values


def load_recipe(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads a YAML recipe, applies `overrides`, validates.

    Example:
        >>> load_recipe("recipes/maml/sinusoid-10shot.yaml", {"iterations": 10}).iterations  # doctest: +SKIP
        10
    """
    values = read_yaml(path)
    try:
        return Config.from_dict({**values, **(overrides or {})})
    except ConfigError as error:
        raise ConfigError(f"recipe {path}: {error}") from None


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


def run_recipe(given: Mapping[str, Any]) -> Config:
    """The config of `fastadapt run`: the built-in recipe for the dataset and algorithm in `given`
    (`run.yaml`), then `given` (the flags set). Two rules keep a flag's intent: an `inner_steps`
    set without `eval_inner_steps` tests with at least as many steps (MAML++: exactly as many, its
    per-step rates exist for those only), and a `meta_lr` set under a default cosine floor keeps
    the floor's ratio to it. Logs 20 rows unless `log_every` is given.

    Example:
        >>> run_recipe({"algorithm": "maml++", "dataset": "omniglot", "meta_lr": 0.01}).min_meta_lr
        0.0001
    """
    dataset = given.get("dataset", Config.model_fields["dataset"].default)
    algorithm = given.get("algorithm", Config.model_fields["algorithm"].default)
    try:
        task = "regression" if dataset_info(dataset)[0].regression else "classification"
    except ValueError as error:
        raise ConfigError(f"dataset: {error}") from None
    built_in = read_yaml(RUN_RECIPE, "built-in recipe")[task]
    values = {**built_in.get("all", {}), **built_in.get(algorithm, {})}
    given = dict(given)
    if "inner_steps" in given and "eval_inner_steps" not in given:
        given["eval_inner_steps"] = (given["inner_steps"] if algorithm == "maml++"
                                     else max(given["inner_steps"], values.get("eval_inner_steps", 1)))
    if "min_meta_lr" in values and "meta_lr" in given:
        values["min_meta_lr"] *= given["meta_lr"] / values["meta_lr"]
    values.update(given)
    values.setdefault("log_every", max(1, values.get("iterations", Config.model_fields["iterations"].default) // 20))
    return Config.from_dict(values)
