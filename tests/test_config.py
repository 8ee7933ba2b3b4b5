"""The config schema: one declaration per key (type, range, default, help), the flags generated from
it, the built-in recipe of `fastadapt run`, files written by an earlier release, and bad input files
refused with one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastadapt
from fastadapt.cli import build_parser
from fastadapt.training.config import SECTIONS, Config, ConfigError
from fastadapt.training.recipes import RUN_RECIPE, load_recipe, read_yaml, run_recipe, saved_config

DATA = Path(__file__).parent / "data"
SRC = Path(fastadapt.__file__).parent


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastadapt.cli", *args], capture_output=True, text=True, cwd=cwd)


def _refused(done: subprocess.CompletedProcess, *named: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("fastadapt: error:")]
    assert len(error) == 1, done.stderr
    for text in named:
        assert text in error[0], error[0]


def test_every_key_is_declared_once_in_one_section_and_every_flag_comes_from_it():
    owners: dict[str, str] = {}
    for section in SECTIONS:
        for key in section.model_fields:
            assert key not in owners, f"{key} in {owners.get(key)} and {section.__name__}"
            owners[key] = section.__name__
            assert section.model_fields[key].description, f"{key} has no help"
    assert set(owners) == set(Config.model_fields)
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest: a for a in run._actions if a.dest in Config.model_fields}
    assert set(flags) == set(Config.model_fields)
    # no default is written twice: a flag left unset is None (the recipe or the schema decides)
    assert all(action.default is None for action in flags.values())
    assert "RUN_DEFAULTS" not in (SRC / "cli.py").read_text()


def test_the_built_in_recipe_sets_only_schema_keys_and_differs_from_the_schema_defaults():
    recipe = read_yaml(RUN_RECIPE, "built-in recipe")
    assert set(recipe) == {"regression", "classification"}
    for task, layers in recipe.items():
        for algorithm, values in layers.items():
            assert algorithm == "all" or algorithm in Config.model_fields["algorithm"].annotation.__args__
            for key, value in values.items():
                assert key in Config.model_fields, key
            config = run_recipe({"dataset": "sinusoid" if task == "regression" else "omniglot",
                                 **({} if algorithm == "all" else {"algorithm": algorithm})})
            assert config.iterations >= 1
    # the embedded default is the schema's defaults (plus its log interval): nothing written twice
    assert run_recipe({}).to_dict() == {**Config().to_dict(), "log_every": 500}


def test_run_flags_override_the_built_in_recipe_and_keep_its_rules():
    parse = build_parser().parse_args
    from fastadapt.cli import _run_config

    config = _run_config(parse(["run", "--algo", "protonet", "--dataset", "omniglot", "--shots", "5", "--no-tensorboard"]))
    assert (config.train_ways, config.shots, config.meta_batch, config.tensorboard) == (20, 5, 1, False)
    assert _run_config(parse(["run", "--dataset", "mnist"])).inner_lr == 0.4  # any image dataset: the classification layer
    assert _run_config(parse(["run", "--dataset", "omniglot", "--inner-steps", "5"])).eval_inner_steps == 5
    assert _run_config(parse(["run", "--algo", "maml++", "--dataset", "omniglot", "--inner-steps", "2"])).eval_inner_steps == 2
    assert _run_config(parse(["run", "--iterations", "40", "--log-every", "3"])).log_every == 3


def test_print_config_is_a_recipe_that_trains_the_same_config(tmp_path):
    done = _cli("run", "--algo", "maml++", "--dataset", "omniglot", "--meta-lr", "0.002", "--print-config")
    assert done.returncode == 0, done.stderr
    recipe = tmp_path / "printed.yaml"
    recipe.write_text(done.stdout)
    config = load_recipe(recipe)
    assert config.meta_lr == 0.002 and config.min_meta_lr == pytest.approx(2e-5) and config.algorithm == "maml++"


def test_types_are_strict_and_errors_name_key_value_and_what_is_allowed():
    assert Config(meta_lr=1).meta_lr == 1.0 and isinstance(Config(meta_lr=1).meta_lr, float)
    for values, message in [
        ({"shots": "5"}, "shots must be an integer >= 1, got '5' (str)"),
        ({"shots": 5.0}, "shots must be an integer >= 1, got 5.0 (float)"),
        ({"fce": 1}, "fce must be true or false, got 1 (int)"),
        ({"train_ways": 0}, "train_ways must be an integer >= 1, or null, got 0"),
        ({"channels": 2}, "channels must be one of 1, 3, or null; got 2"),
        ({"meta_lr": float("inf")}, "meta_lr must be a number > 0, got inf"),
        ({"drop_rate": 1.0}, "drop_rate must be a number >= 0 and < 1, got 1.0"),
        ({"meta_lrr": 0.1}, "unknown config key 'meta_lrr' (did you mean 'meta_lr'?)"),
        ({1: 2}, "unknown config key 1"),
        ({"dataset": "minst"}, "dataset: unknown dataset 'minst' (did you mean 'mnist'?)"),
        ({"fce_steps": 3}, "fce_steps=3 applies to algorithm 'matchingnet', not 'maml'; leave it at its default "
                           "(fce_steps: 5)"),
        ({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4", "per_step_bn_statistics": True},
         "per_step_bn_statistics=True applies to the MAML family (maml, fomaml, metasgd, anil, maml++), not 'protonet'"),
    ]:
        with pytest.raises(ConfigError) as error:
            Config.from_dict(values)
        assert message in str(error.value)


def test_a_run_directory_of_the_previous_release_loads_evaluates_and_resumes(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(DATA / "saved-runs" / "maml-sinusoid-b1eb256", run)
    learner = fastadapt.load(run)
    assert sum(p.numel() for p in learner.parameters()) > 0
    result = fastadapt.evaluate(run, episodes=2)
    stored = json.loads((run / "results.json").read_text())
    assert result["mean"] == pytest.approx(stored["mean"], rel=1e-6)  # the same numbers as when it was written
    config = json.loads((run / "config.json").read_text())
    assert "image_size" not in config  # keys added since then take their defaults
    assert fastadapt.api.run_config(run).image_size is None
    (run / "results.json").unlink()
    resumed = fastadapt.train(out=run, resume=True, progress=False)  # its checkpoint, optimizer and random state
    assert resumed["mean"] == pytest.approx(stored["mean"], rel=1e-6) and resumed["steps"] == stored["steps"]


def test_maml_plus_plus_options_switched_off_under_another_algorithm_still_load():
    """Earlier versions accepted a MAML++ option set to false or 0 (off) under any algorithm."""
    config = Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4",
                               "per_step_inner_lr": False, "multi_step_loss_iterations": 0})
    assert config.per_step_inner_lr is False
    with pytest.raises(ConfigError, match="per_step_inner_lr=True applies to the MAML family"):
        Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4", "per_step_inner_lr": True})


def test_every_config_the_previous_release_wrote_still_loads():
    configs = json.loads((DATA / "run-configs-b1eb256.json").read_text())
    assert len(configs) >= 17
    for name, values in configs.items():
        config = saved_config(values, f"{name}/config.json")
        assert {k: v for k, v in config.to_dict().items() if k in values} == values, name


def test_bad_input_files_are_refused_with_one_line_naming_the_file(tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    _refused(_cli("run", "--iterations", "2", "--out", str(existing)), str(existing), "is a file")
    assert existing.read_text() == "keep me"

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    _refused(_cli("train", str(empty), "--out", str(tmp_path / "e")), str(empty), "is empty")

    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _refused(_cli("train", str(latin), "--out", str(tmp_path / "l")), str(latin), "is not UTF-8 text")

    twice = tmp_path / "twice.yaml"
    twice.write_text("algorithm: maml\nshots: 5\ninner_lr: 0.1\nshots: 1\n")
    _refused(_cli("train", str(twice), "--out", str(tmp_path / "t")), str(twice), "'shots' appears twice",
             "first on line 2")
    with pytest.raises(ConfigError, match="line 4"):
        load_recipe(twice)
    assert not any((tmp_path / d).exists() for d in ("e", "l", "t"))

    run = tmp_path / "run"
    shutil.copytree(DATA / "saved-runs" / "maml-sinusoid-b1eb256", run)
    (run / "config.json").write_text('{"algorithm": "maml", "shots": ')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _refused(_cli("train", "--resume", str(run)), str(run / "config.json"), "truncated or not JSON")
    _refused(_cli("eval", str(run), "--episodes", "2"), str(run / "config.json"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
