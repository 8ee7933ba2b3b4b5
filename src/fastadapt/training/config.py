"""The experiment schema: typed sections of keys that fix everything a result depends on.

Every key is declared once, in one section, with its type, its allowed range, its default and a
line of help; validation (pydantic, strict), the command line's flags (`fastadapt run --help`) and
the error messages all come from that declaration. A recipe or a saved `config.json` is one flat
mapping of these keys; the sections group them, and a section that belongs to some algorithms
(iMAML's keys, MAML++'s, ...) refuses values other than its defaults for the rest.

Example:
    >>> Config.from_dict({"algorithm": "protonet", "dataset": "omniglot", "backbone": "conv4"}).ways
    5
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union, get_args, get_origin

import annotated_types
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ..algorithms.mamlpp import MSL_ITERATIONS
from ..data.registry import DataOptions, dataset_info

__all__ = ["Config", "ConfigError", "SECTIONS", "EXECUTION_KEYS", "ALGORITHMS", "MAML_FAMILY", "PROBABILISTIC", "field_check", "describe_expected",
           "key_kind"]

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "protonet", "imaml", "baseline", "maml++", "reptile",
              "matchingnet", "vampire", "platipus", "bmaml")
# probabilistic learners: predictions average several weight samples or particles (fastadapt.probabilistic)
PROBABILISTIC = ("vampire", "platipus", "bmaml")
# the samples per task in training where `samples` is left out
_DEFAULT_SAMPLES = {"vampire": 2, "platipus": 1, "bmaml": 5}
# the MAML family: one GradientLearner with options (algorithms.gradient)
MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "maml++")
# algorithms whose inner loop can run another optimizer than SGD (inner_optimizer)
_INNER_OPTIMIZER_ALGORITHMS = ("imaml", "reptile", *MAML_FAMILY)
# algorithms that train tasks (or task groups) in threads (task_workers)
_TASK_WORKER_ALGORITHMS = (*MAML_FAMILY, "imaml")
# algorithms that train robustly on attacked inputs (robust_training)
ROBUST_ALGORITHMS = (*MAML_FAMILY, "protonet", "matchingnet")
# algorithms without an unrolled inner loop (no compile, no inner-loop checkpointing)
_METRIC_OR_FINE_TUNING = ("protonet", "matchingnet", "baseline")
_DEVICE_PATTERN = r"cpu|cuda(:\d+)?"  # where a run lives: cpu, cuda or cuda:N


class ConfigError(ValueError):
    """A config key with a bad value, or an unknown key; the message names both and the fix."""


def _registered_dataset(name: str) -> str:
    try:
        dataset_info(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return name


Dataset = Annotated[str, AfterValidator(_registered_dataset)]


class _Section(BaseModel):
    """Keys of one concern. `applies_to`: the algorithms whose options these are (None: every one)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
    applies_to: ClassVar[tuple[str, ...] | None] = None
    title: ClassVar[str] = ""
    # a falsy value means "off" like the default (MAML++'s options: false or 0 under protonet is no option)
    falsy_is_default: ClassVar[bool] = False


class RunKeys(_Section):
    title: ClassVar[str] = "run"
    name: str | None = Field(None, description="run name (default run directory: runs/<name>)")
    algorithm: Literal[ALGORITHMS] = Field("maml", description="the meta-learning algorithm")
    seed: int = Field(0, ge=0, description="seed of the initial weights and the training episodes")
    eval_seed: int = Field(0, ge=0, description="seed of the test episodes (shared by all runs)")
    iterations: int = Field(10000, ge=1, description="outer steps")
    log_every: int = Field(100, ge=1, description="outer steps between logged metrics rows")
    validation_every: int = Field(0, ge=0, description="outer steps between validations (0: none)")
    validation_episodes: int = Field(200, ge=2, description="episodes of each validation")
    early_stopping: int = Field(0, ge=0, description="stop after this many validations without improvement (0: never)")
    keep_best: int = Field(1, ge=1, description="best validated weights kept, for `fastadapt eval --ensemble K`")
    checkpoint_every: int = Field(500, ge=1, description="outer steps between checkpoints")
    eval_episodes: int = Field(1000, ge=2, description="fixed test episodes at the end (a 95%% CI needs >= 2)")
    # keys marked `execution` say where and how fast a run computes, not what: a run resumes with others
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)",
                                json_schema_extra={"execution": True})
    task_workers: int = Field(1, ge=1, description="MAML family and imaml on conv4, CPU: train this many tasks "
                              "(task groups) and evaluate this many episode batches at once, one thread each "
                              "(a one-thread run's numbers)", json_schema_extra={"execution": True})
    data_workers: int = Field(0, ge=0, description="processes that draw (and decode) the next task batches while "
                              "the learner trains, for datasets that read their items lazily (0: drawn in the "
                              "training process); the same batches for any count", json_schema_extra={"execution": True})
    device: str = Field("cpu", pattern=rf"^(?:{_DEVICE_PATTERN})$", json_schema_extra={"execution": True},
                        description="where the learner and episodes live: cpu, cuda or cuda:N")
    tensorboard: bool = Field(False, description="also write TensorBoard event files")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: bf16 autocast, float32 weights and "
                                               "meta-gradients")
    compile: bool = Field(False, description="torch.compile the inner loop (MAML family)")
    checkpoint_inner_loop: bool = Field(False, description="recompute the inner loop in the backward pass "
                                        "(MAML family: less memory, more time)")


class DataKeys(_Section):
    title: ClassVar[str] = "data"
    dataset: Dataset = Field("sinusoid", description="omniglot, mnist, mini-imagenet, folder:PATH or sinusoid "
                             "(fastadapt.data.registry)")
    data_root: str | None = Field(None, description="folder holding omniglot/, mnist/, mini-imagenet/ "
                                  "(default: $FASTADAPT_DATA)")
    image_size: int | None = Field(None, ge=16, description="folder datasets: decode images at this size "
                                   "(default: their own; mini-imagenet 84)")
    channels: Literal[1, 3] | None = Field(None, description="folder datasets: 1 (grey) or 3 (RGB) "
                                           "(default: their own)")
    validation_characters: int = Field(0, ge=0, description="omniglot: characters carved out of meta-training "
                                       "for validation")
    ways: int = Field(5, ge=1, description="classes per test episode (classification)")
    train_ways: int | None = Field(None, ge=1, description="classes per training episode or pre-training batch "
                                   "(protonet, matchingnet, baseline; default: ways)")
    shots: int = Field(10, ge=1, description="support examples per class")
    train_shots: int | None = Field(None, ge=1, description="support examples per class in training episodes "
                                    "(default: shots)")
    queries: int = Field(10, ge=1, description="query examples per class in training episodes")
    eval_queries: int = Field(100, ge=1, description="query examples per class in test episodes")


class ModelKeys(_Section):
    title: ClassVar[str] = "model"
    backbone: Literal["conv4", "conv4-strided", "resnet12", "mlp"] = Field(
        "mlp", description="mlp (sinusoid), conv4 (images, max-pooling), conv4-strided (stride-2 convolutions, "
        "the Reptile paper's network) or resnet12 (64-160-320-640 channels)")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="resnet12: DropBlock rate after its last two blocks "
                             "(MetaOptNet: 0.1)")
    likelihood: Literal["point", "gaussian"] = Field("point", description="regression: point predictions (MSE), or "
                                                     "a Gaussian per target (mean and std; NLL): calibrated intervals")


class OuterKeys(_Section):
    title: ClassVar[str] = "outer loop"
    meta_batch: int = Field(25, ge=1, description="tasks per outer step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="the outer optimizer")
    meta_lr: float = Field(1e-3, gt=0, description="learning rate of the outer optimizer")
    meta_momentum: float | None = Field(None, ge=0, lt=1, description="momentum of the outer SGD "
                                        "(default 0.9; Reptile's interpolation step needs 0)")
    schedule: Literal["constant", "cosine", "step", "linear"] = Field("constant", description="outer "
                                                                      "learning-rate schedule")
    schedule_step: int = Field(1000, ge=1, description="step schedule: outer steps between decays")
    schedule_gamma: float = Field(0.5, gt=0, le=1, description="step schedule: factor of each decay")
    min_meta_lr: float = Field(0.0, ge=0, description="cosine schedule: its floor")


class InnerKeys(_Section):
    title: ClassVar[str] = "inner loop"
    inner_steps: int = Field(1, ge=1, description="inner optimizer steps in training")
    eval_inner_steps: int | None = Field(None, ge=1, description="inner optimizer steps at test time "
                                         "(default: inner_steps)")
    inner_lr: float = Field(0.01, gt=0, description="inner learning rate")
    inner_optimizer: Literal["sgd", "momentum", "adam"] = Field("sgd", description="inner optimizer "
                                                                "(MAML family, imaml, reptile)")
    inner_trim: float = Field(0.0, ge=0, lt=1, description="MAML family: the inner loss leaves out this fraction "
                              "of the support examples with the largest loss (noisy labels; 0: the plain loss)")


class MamlPlusPlusKeys(_Section):
    """MAML++ (Antoniou et al. 2019) options of the MAML family; null: the algorithm's default (on for
    maml++: per-step rates, multi-step loss over 5000 iterations, per-step BatchNorm weights)."""

    title: ClassVar[str] = "MAML family (MAML++ options)"
    applies_to: ClassVar[tuple[str, ...] | None] = MAML_FAMILY
    falsy_is_default: ClassVar[bool] = True
    per_step_inner_lr: bool | None = Field(None, description="a learned inner rate per step and tensor")
    multi_step_loss_iterations: int | None = Field(None, ge=0, description="outer steps of the multi-step loss "
                                                   "(annealed to the last step's)")
    per_step_bn_weights: bool | None = Field(None, description="BatchNorm weights per inner step")
    per_step_bn_statistics: bool = Field(False, description="BatchNorm running statistics per inner step")
    first_order_iterations: int = Field(0, ge=0, description="outer steps of first order before second order")


class ImamlKeys(_Section):
    """iMAML (Rajeswaran et al. 2019): the proximal inner problem and its conjugate-gradient solve."""

    title: ClassVar[str] = "iMAML"
    applies_to: ClassVar[tuple[str, ...] | None] = ("imaml",)
    imaml_lambda: float = Field(2.0, gt=0, description="strength of the proximal term")
    cg_steps: int = Field(5, ge=1, description="conjugate-gradient iterations")
    cg_damping: float = Field(0.0, ge=0, description="damping of the conjugate-gradient system")
    eval_imaml_lambda: float | None = Field(None, ge=0, description="proximal strength at test time (default: "
                                            "imaml_lambda; 0: plain fine-tuning, the authors' measure_accuracy.py)")
    imaml_proximal: Literal["every_step", "pull_back"] = Field(
        "every_step", description="the proximal term in every inner step (the paper) or one pull-back step after "
        "plain steps (the authors' code)")


class ReptileKeys(_Section):
    title: ClassVar[str] = "Reptile"
    applies_to: ClassVar[tuple[str, ...] | None] = ("reptile",)
    inner_batch: int | None = Field(None, ge=1, description="inner mini-batch size in training (default: the "
                                    "whole support set)")
    eval_inner_batch: int | None = Field(None, ge=1, description="inner mini-batch size at test time "
                                         "(default: inner_batch)")
    inner_state: Literal["fresh", "persistent"] = Field(
        "fresh", description="the inner Adam state: fresh for every task, or persistent (carried across tasks "
        "and into evaluation, as the authors' code)")


class BaselineKeys(_Section):
    title: ClassVar[str] = "Baseline (Chen et al. 2019)"
    applies_to: ClassVar[tuple[str, ...] | None] = ("baseline",)
    head: Literal["linear", "cosine"] = Field("linear", description="linear (Baseline) or cosine (Baseline++)")


class ProtoNetKeys(_Section):
    title: ClassVar[str] = "Prototypical Networks"
    applies_to: ClassVar[tuple[str, ...] | None] = ("protonet",)
    aggregation: Literal["mean", "median", "trimmed-mean", "weighted"] = Field(
        "mean", description="a class's prototype from its support embeddings: the mean (the paper), or robust to "
        "noisy labels: the median, the mean without the top and bottom fifth, or a mean weighted by closeness to "
        "the median")


class MatchingKeys(_Section):
    title: ClassVar[str] = "Matching Networks"
    applies_to: ClassVar[tuple[str, ...] | None] = ("matchingnet",)
    fce: bool = Field(False, description="full context embeddings")
    fce_steps: int = Field(5, ge=1, description="processing steps of the full context embeddings")
    similarity: Literal["cosine", "scaled-cosine"] = Field("cosine", description="similarity of query and "
                                                           "support embeddings")


class RobustKeys(_Section):
    """Robust meta-training (`robust.RobustTraining`): the outer loss on attacked inputs."""

    title: ClassVar[str] = "robust training (attacks, noisy labels)"
    applies_to: ClassVar[tuple[str, ...] | None] = ROBUST_ALGORITHMS
    robust_training: Literal["none", "aq", "adml", "trades"] = Field(
        "none", description="none; aq: attacked queries in the outer loss (adversarial querying); adml: attacked "
        "support and query sets (MAML family); trades: clean loss + trades_beta x KL(clean || attacked)")
    robust_attack: Literal["fgsm", "pgd"] = Field("fgsm", description="the training attack: fgsm (from a random "
                                                  "start, step 1.25 eps) or pgd (robust_steps steps, random start)")
    robust_eps: float = Field(8 / 255, gt=0, description="radius of the training attack (inputs in [0, 1])")
    robust_norm: Literal["linf", "l2"] = Field("linf", description="the training attack's ball")
    robust_steps: int = Field(1, ge=1, description="pgd: steps of the training attack (fgsm: 1)")
    trades_beta: float = Field(6.0, ge=0, description="trades: weight of the KL term")


class ProbabilisticKeys(_Section):
    """Probabilistic learners (`fastadapt.probabilistic`): samples, priors and their KL terms."""

    title: ClassVar[str] = "probabilistic learners"
    applies_to: ClassVar[tuple[str, ...] | None] = PROBABILISTIC
    samples: int | None = Field(None, ge=1, description="weight samples per task in training (vampire: 2, platipus: "
                                "1); bmaml: the particles, 5 (default: those)")
    eval_samples: int | None = Field(None, ge=1, description="weight samples per test episode (default 10; bmaml: "
                                     "its particles)")
    kl_weight: float = Field(1e-6, ge=0, description="vampire, platipus: weight of KL(posterior || prior), summed "
                             "over every weight, in the loss")
    prior_std: float = Field(0.01, gt=0, description="vampire, platipus: initial standard deviation of the prior "
                             "over the weights (initialisations)")
    posterior_std: float = Field(0.01, gt=0, description="platipus: initial standard deviation of the posterior "
                                 "over initialisations")
    chaser_steps: int = Field(1, ge=1, description="bmaml: the leader's further SVGD steps on support and query set")


SECTIONS: tuple[type[_Section], ...] = (RunKeys, DataKeys, ModelKeys, OuterKeys, InnerKeys, MamlPlusPlusKeys,
                                        ImamlKeys, ReptileKeys, BaselineKeys, ProtoNetKeys, MatchingKeys, RobustKeys,
                                        ProbabilisticKeys)


class Config(ProbabilisticKeys, RobustKeys, MatchingKeys, ProtoNetKeys, BaselineKeys, ReptileKeys, ImamlKeys, MamlPlusPlusKeys, InnerKeys, OuterKeys,
             ModelKeys, DataKeys, RunKeys):
    """Everything a run depends on: the keys of every section. Defaults: MAML on sinusoid regression
    (the embedded default). Construction validates; a bad key or value is a `ConfigError`.

    Example:
        >>> Config(algorithm="maml++", dataset="omniglot", backbone="conv4").mamlpp_options()["per_step_inner_lr"]
        True
    """

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_explain(error, values)) from None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """Validates `values` (unknown keys, types, ranges, combinations) and builds the config."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
        for key in values:
            if not isinstance(key, str) or key not in cls.model_fields:
                raise ConfigError(_unknown_key(key))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some keys changed."""
        return Config.from_dict({**self.to_dict(), **changes})

    # -- derived ------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return "regression" if dataset_info(self.dataset)[0].regression else "classification"

    @property
    def learner_task(self) -> str:
        """What the learner is built for: classification, regression or gaussian (a Gaussian output)."""
        return "gaussian" if self.likelihood == "gaussian" else self.task

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

    @property
    def effective_samples(self) -> int:
        """Weight samples per task in training (bmaml: its particles)."""
        return self.samples or _DEFAULT_SAMPLES.get(self.algorithm, 1)

    @property
    def effective_eval_samples(self) -> int:
        """Weight samples per test episode (bmaml: its particles)."""
        return self.effective_samples if self.algorithm == "bmaml" else self.eval_samples or 10

    def mamlpp_options(self) -> dict[str, Any]:
        """The MAML++ options of the gradient learner, nulls resolved: on for maml++ (per-step BN
        weights where the backbone has BatchNorm), off for the rest of the MAML family."""
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

    # -- combinations (types and ranges are the fields' own) ----------------------------------
    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        _check_sections(self)
        _check_data_and_model(self)
        _check_optimizers(self)
        _check_mamlpp(self)
        _check_execution(self)
        _check_robust(self)
        _check_probabilistic(self)
        return self

    def robust_options(self) -> Any:
        """The `robust.RobustTraining` of `robust_training` (seeded by `seed`), or None for none."""
        if self.robust_training == "none":
            return None
        from ..robust import RobustTraining, fgsm, pgd

        attack = (fgsm(self.robust_eps, random_start=True) if self.robust_attack == "fgsm"
                  else pgd(self.robust_eps, norm=self.robust_norm, steps=self.robust_steps))
        return RobustTraining(self.robust_training, attack, beta=self.trades_beta, seed=self.seed)


# the keys that say where and how fast a run computes, not what (a run resumes with other values)
EXECUTION_KEYS = tuple(k for k, f in Config.model_fields.items() if (f.json_schema_extra or {}).get("execution"))


def _check_sections(config: Config) -> None:
    """The keys of an algorithm's section keep their defaults under any other algorithm."""
    for section in SECTIONS:
        if section.applies_to is None or config.algorithm in section.applies_to:
            continue
        changed = {k: getattr(config, k) for k, f in section.model_fields.items()
                   if getattr(config, k) != f.default and not (section.falsy_is_default and not getattr(config, k))}
        if changed:
            owner = (f"algorithm {section.applies_to[0]!r}" if len(section.applies_to) == 1
                     else f"the MAML family ({', '.join(section.applies_to)})" if section.applies_to == MAML_FAMILY
                     else f"algorithms {', '.join(section.applies_to)}")
            defaults = ", ".join(f"{k}: {_yaml(section.model_fields[k].default)}" for k in changed)
            raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in changed.items())} "
                              f"appl{'ies' if len(changed) == 1 else 'y'} to {owner}, not {config.algorithm!r}; "
                              f"leave {'it at its default' if len(changed) == 1 else 'them at their defaults'} "
                              f"({defaults})")


def _check_data_and_model(config: Config) -> None:
    expected = ("mlp",) if config.task == "regression" else ("conv4", "conv4-strided", "resnet12")
    if config.backbone not in expected:
        raise ConfigError(f"backbone {config.backbone!r} does not fit dataset {config.dataset!r}; use backbone: "
                          f"{' or '.join(expected)}")
    if config.likelihood == "gaussian" and config.task != "regression":
        raise ConfigError(f"likelihood 'gaussian' is a regression output (mean and std); {config.dataset!r} is "
                          "classification (likelihood: point)")
    if config.drop_rate and config.backbone != "resnet12":
        raise ConfigError(f"drop_rate (DropBlock) applies to backbone resnet12, not {config.backbone!r}")
    if config.task == "regression" and config.algorithm in _METRIC_OR_FINE_TUNING:
        raise ConfigError(f"algorithm {config.algorithm!r} needs a classification dataset; {config.dataset!r} is "
                          "regression (use dataset: omniglot, --dataset omniglot)")
    if config.task == "classification" and config.ways < 2:
        raise ConfigError(f"ways must be >= 2 for classification, got {config.ways}")
    if config.train_ways not in (None, config.ways) and config.algorithm not in _METRIC_OR_FINE_TUNING:
        raise ConfigError(f"train_ways={config.train_ways} differs from ways={config.ways}: only protonet, matchingnet "
                          "and baseline can train and test with different ways (the others have a ways-sized head)")
    if config.dataset == "omniglot" and config.validation_every and not config.validation_characters:
        raise ConfigError("validation_every > 0 on omniglot needs validation_characters > 0 "
                          "(the characters carved out of meta-training for validation), e.g. 100")
    if config.early_stopping and not config.validation_every:
        raise ConfigError("early_stopping needs validation_every > 0 (it counts validations without improvement)")
    if config.keep_best > 1 and not config.validation_every:
        raise ConfigError(f"keep_best={config.keep_best} needs validation_every > 0 (it keeps the best validated weights)")


def _check_optimizers(config: Config) -> None:
    if config.inner_optimizer != "sgd" and config.algorithm not in _INNER_OPTIMIZER_ALGORITHMS:
        raise ConfigError(f"inner_optimizer={config.inner_optimizer!r} applies to "
                          f"{', '.join(_INNER_OPTIMIZER_ALGORITHMS)}; the inner loop of {config.algorithm!r} "
                          "is SGD (inner_optimizer: sgd)")
    if config.algorithm == "imaml" and config.inner_optimizer == "momentum":
        raise ConfigError("inner_optimizer 'momentum' is not implemented for imaml; use sgd or adam")
    if config.inner_state == "persistent" and config.inner_optimizer != "adam":
        raise ConfigError("inner_state 'persistent' carries Reptile's inner Adam state across tasks; got "
                          f"inner_optimizer {config.inner_optimizer!r} (use inner_optimizer: adam, or inner_state: fresh)")
    if config.meta_momentum is not None and config.optimizer != "sgd":
        raise ConfigError(f"meta_momentum is the momentum of the outer SGD; optimizer is {config.optimizer!r} "
                          "(use optimizer: sgd, or meta_momentum: null)")
    if not config.min_meta_lr < config.meta_lr:
        raise ConfigError(f"min_meta_lr must be below meta_lr={config.meta_lr}, got {config.min_meta_lr!r}")
    if config.min_meta_lr and config.schedule != "cosine":
        raise ConfigError(f"min_meta_lr is the floor of the cosine schedule; schedule is {config.schedule!r} "
                          "(use schedule: cosine, or min_meta_lr: 0)")


def _check_mamlpp(config: Config) -> None:
    if config.algorithm not in MAML_FAMILY:
        return
    options = config.mamlpp_options()
    if options["per_step_inner_lr"] and config.algorithm == "metasgd":
        raise ConfigError("per_step_inner_lr and metasgd both learn the inner rates (per step and tensor, "
                          "per entry); use algorithm maml++ or set per_step_inner_lr: false")
    if options["first_order_iterations"] and config.algorithm == "fomaml":
        raise ConfigError("first_order_iterations anneals from first to second order; fomaml is first order "
                          "throughout (set it to 0, or use maml / maml++)")
    per_step_norm = [k for k in ("per_step_bn_weights", "per_step_bn_statistics") if options[k]]
    if per_step_norm and config.backbone == "mlp":
        raise ConfigError(f"{', '.join(per_step_norm)} need BatchNorm layers; backbone {config.backbone!r} has "
                          "none (set them to false)")
    per_step = [k for k in ("per_step_inner_lr", *per_step_norm) if options[k]]
    if per_step and config.effective_eval_inner_steps > config.inner_steps:
        raise ConfigError(f"eval_inner_steps={config.eval_inner_steps} exceeds inner_steps={config.inner_steps}, but "
                          f"{', '.join(per_step)} exist only for the {config.inner_steps} training steps")


def _check_execution(config: Config) -> None:
    """Options of the unrolled inner loop, precision and task threads: where each has a meaning."""
    if config.algorithm not in MAML_FAMILY and (config.compile or config.checkpoint_inner_loop):
        raise ConfigError("compile and checkpoint_inner_loop apply to the MAML family (an unrolled inner loop); "
                          f"set them to false for {config.algorithm}")
    if config.algorithm in ("imaml", "baseline", "reptile", "matchingnet", *PROBABILISTIC) and config.precision != "fp32":
        raise ConfigError(f"precision {config.precision!r} is not implemented for {config.algorithm}; "
                          "use precision: fp32")
    if config.task_workers > 1 and config.algorithm not in _TASK_WORKER_ALGORITHMS:
        raise ConfigError(f"task_workers={config.task_workers} trains tasks in threads; not with algorithm "
                          f"{config.algorithm!r} ({', '.join(_TASK_WORKER_ALGORITHMS)}). Set task_workers: 1")


def _check_probabilistic(config: Config) -> None:
    """Each probabilistic key where its learner has it."""
    if config.algorithm not in PROBABILISTIC:
        return
    owners = {"kl_weight": ("vampire", "platipus"), "prior_std": ("vampire", "platipus"),
              "posterior_std": ("platipus",), "chaser_steps": ("bmaml",)}
    for key, algorithms in owners.items():
        if config.algorithm not in algorithms and getattr(config, key) != ProbabilisticKeys.model_fields[key].default:
            raise ConfigError(f"{key}={getattr(config, key)!r} applies to {', '.join(algorithms)}, not "
                              f"{config.algorithm!r}; leave it at its default "
                              f"({_yaml(ProbabilisticKeys.model_fields[key].default)})")
    if config.algorithm == "bmaml" and config.eval_samples not in (None, config.effective_samples):
        raise ConfigError(f"bmaml predicts with its {config.effective_samples} particles (samples); eval_samples="
                          f"{config.eval_samples} cannot differ (leave eval_samples out, or set samples)")


def _check_robust(config: Config) -> None:
    """Robust training's keys: on a classification task, each where it has a meaning."""
    if config.inner_trim and config.algorithm not in MAML_FAMILY:
        raise ConfigError(f"inner_trim trims the inner loss of the MAML family; {config.algorithm!r} has none of "
                          "its own (protonet: aggregation median, trimmed-mean or weighted)")
    others = {k: getattr(config, k) for k in RobustKeys.model_fields
              if k != "robust_training" and getattr(config, k) != RobustKeys.model_fields[k].default}
    if config.robust_training == "none":
        if others:
            raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in others.items())} set(s) the training attack, but "
                              "robust_training is none (use robust_training: aq, adml or trades)")
        return
    if config.task != "classification":
        raise ConfigError(f"robust_training {config.robust_training!r} attacks classification inputs in [0, 1]; "
                          f"{config.dataset!r} is regression")
    if config.robust_training == "adml" and config.algorithm not in MAML_FAMILY:
        raise ConfigError(f"robust_training 'adml' attacks the support set of an inner loop; {config.algorithm!r} "
                          "has none (use aq or trades)")
    if config.robust_attack == "fgsm" and (config.robust_steps != 1 or config.robust_norm != "linf"):
        raise ConfigError(f"robust_attack 'fgsm' is one L-inf step; got robust_steps={config.robust_steps}, "
                          f"robust_norm={config.robust_norm!r} (use robust_attack: pgd)")
    if config.robust_attack == "pgd" and config.robust_steps == 1:
        raise ConfigError("robust_attack 'pgd' with robust_steps 1 is FGSM from a random start; use robust_steps >= 2 "
                          "(e.g. 7) or robust_attack: fgsm")
    if config.algorithm in MAML_FAMILY and config.mamlpp_options()["per_step_bn_statistics"]:
        raise ConfigError("robust_training with per_step_bn_statistics is not supported: per-step BatchNorm statistics "
                          "take one batch per inner step, and the attack adds forward passes (per_step_bn_statistics: false)")
    if config.trades_beta != 6.0 and config.robust_training != "trades":
        raise ConfigError(f"trades_beta applies to robust_training 'trades', not {config.robust_training!r}")


# -- what a key allows, in words ------------------------------------------------------------------
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"))


def describe_expected(key: str, null: bool = True) -> str:
    """What a config key allows, in words (for errors and help); `null=False` leaves out null.

    Example:
        >>> describe_expected("eval_inner_steps")
        'an integer >= 1, or null'
    """
    field = Config.model_fields[key]
    if key == "dataset":
        text = "a registered dataset name (omniglot, mnist, mini-imagenet, folder:PATH, sinusoid)"
    elif key == "device":
        text = "cpu, cuda or cuda:N (N a GPU index)"
    elif get_origin(key_kind(key)) is Literal:
        text = "one of " + ", ".join(str(v) for v in get_args(key_kind(key)))
    else:
        bounds = [f"{symbol} {getattr(m, attr)}" for m in field.metadata for kind, attr, symbol in _BOUNDS
                  if isinstance(m, kind)]
        text = _KINDS[key_kind(key)] + (" " + " and ".join(bounds) if bounds else "")
    return text + (", or null" if null and type(None) in _union_members(field.annotation) else "")


def key_kind(key: str) -> Any:
    """The type of a config key's values other than null: int, float, str, bool or a Literal."""
    return next(t for t in _union_members(Config.model_fields[key].annotation) if t is not type(None))


def field_check(key: str) -> TypeAdapter:
    """A validator of one key alone (its type and range), e.g. for a command-line flag."""
    field = Config.model_fields[key]
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


def _union_members(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _explain(error: ValidationError, values: Mapping[str, Any]) -> str:
    """The first problem of a pydantic error, as one line naming the key, the value and what is allowed."""
    problem = error.errors(include_url=False)[0]
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return (f"{problem['loc'][0]}: " if problem["loc"] else "") + str(cause)
    if problem["type"] == "extra_forbidden":
        return _unknown_key(problem["loc"][0])
    key = str(problem["loc"][0])
    value = values.get(key, problem.get("input"))
    separator = ";" if problem["type"] == "literal_error" else ","
    return f"{key} must be {describe_expected(key)}{separator} got {value!r} ({type(value).__name__})"


def _unknown_key(key: Any) -> str:
    close = difflib.get_close_matches(str(key), Config.model_fields, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; allowed keys: {', '.join(Config.model_fields)}"


def _yaml(value: Any) -> str:
    """A default as a recipe would write it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
