"""Data: the episode model, sampling, and built-in task sources (Omniglot, sinusoid)."""

from .datasets import ImageClassDataset
from .episodes import Episode, TaskBatch
from .paths import resolve_cache_dir, resolve_data_root
from .sampler import ClassBatchSampler, DeviceTasks, EpisodeSampler, TaskSource, episode_rng
from .sinusoid import SinusoidTasks

__all__ = [
    "ClassBatchSampler", "DeviceTasks", "Episode", "EpisodeSampler", "ImageClassDataset", "SinusoidTasks", "TaskBatch", "TaskSource",
    "episode_rng", "resolve_cache_dir", "resolve_data_root",
]
