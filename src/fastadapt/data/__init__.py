"""Data: the episode model, sampling, and datasets by name (Omniglot, MNIST, mini-ImageNet, image
folders, sinusoid; `registry`)."""

from .datasets import ImageClassDataset
from .episodes import Episode, TaskBatch
from .loading import task_batches
from .paths import resolve_cache_dir, resolve_data_root
from .registry import DataOptions, DatasetInfo, TaskSets, dataset_splits, get_tasksets, register_dataset
from .sampler import ClassBatchSampler, DeviceTasks, EpisodeSampler, TaskSource, episode_rng
from .sinusoid import SinusoidTasks

__all__ = [
    "ClassBatchSampler", "DataOptions", "DatasetInfo", "DeviceTasks", "Episode", "EpisodeSampler", "ImageClassDataset",
    "SinusoidTasks", "TaskBatch", "TaskSets", "TaskSource", "dataset_splits", "episode_rng", "get_tasksets",
    "register_dataset", "resolve_cache_dir", "resolve_data_root", "task_batches",
]
