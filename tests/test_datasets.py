"""The dataset registry and its formats: MNIST IDX files, image folders, mini-ImageNet's CSV layout,
any torch Dataset; tiny archives built here (corrupt ones included), the real MNIST where present."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastadapt.data import EpisodeSampler
from fastadapt.data import folder as folder_module
from fastadapt.data.mini_imagenet import mini_imagenet_splits
from fastadapt.data.mnist import MNIST_FILES, load_mnist, read_idx
from fastadapt.data.registry import DataOptions, dataset_info, dataset_splits, get_tasksets
from fastadapt.data.sinusoid import SinusoidTasks


def _real_mnist() -> Path | None:
    candidates = [os.environ.get("FASTADAPT_DATA"), Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    return next((Path(c) for c in candidates if c and (Path(c) / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()),
                None)


REAL_MNIST = _real_mnist()


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _tiny_mnist(root: Path, n: int = 30, compress: bool = True) -> dict[str, np.ndarray]:
    """Random IDX files of every split under root/mnist (3 examples of each digit per split)."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images_file, labels_file) in MNIST_FILES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for file, array in ((images_file, images), (labels_file, labels)):
            data = _idx(array)
            if compress:
                (folder / f"{file.name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / file.name).write_bytes(data)
        written[split] = images
    return written


# -- MNIST ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_gzip_and_raw_idx_files(tmp_path: Path, compress: bool) -> None:
    written = _tiny_mnist(tmp_path, compress=compress)
    test = load_mnist(tmp_path, split="test", verify=False)
    assert test.images.shape == (30, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], torch.from_numpy(written["test"]))
    assert test.labels.tolist() == [i % 10 for i in range(30)]


def test_mnist_checks_the_content_against_the_original_checksums(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: its content has md5 .*verify=False"):
        load_mnist(tmp_path, split="test")


def test_mnist_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    folder = tmp_path / "mnist"
    images = folder / "t10k-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + b"\x00" * 20))  # not unsigned bytes
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: bad IDX magic number 00000903"):
        load_mnist(tmp_path, split="test", verify=False)
    images.write_bytes(good[: len(good) // 2])  # a truncated gzip stream
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is not a complete gzip file"):
        load_mnist(tmp_path, split="test", verify=False)
    raw = gzip.decompress(good)
    images.write_bytes(gzip.compress(raw[:-28]))  # a complete gzip of a truncated IDX body
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: 23492 bytes of data, but its header 30x28x28"):
        load_mnist(tmp_path, split="test", verify=False)
    images.write_bytes(gzip.compress(_idx(np.zeros((29, 28, 28), np.uint8))))  # one image short
    with pytest.raises(ValueError, match=r"29 images in t10k-images-idx3-ubyte but 30 labels in t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, split="test", verify=False)
    images.unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz \(or without .gz\).*FASTADAPT_DATA"):
        load_mnist(tmp_path, split="test")


def test_mnist_downloads_from_a_server_and_refuses_a_damaged_file(tmp_path: Path, http_dir) -> None:
    served, url = http_dir
    _tiny_mnist(served.parent / "source")
    for file in (served.parent / "source" / "mnist").iterdir():
        (served / file.name).write_bytes(file.read_bytes())
    root = tmp_path / "root"
    data = load_mnist(root, split="train", download=True, base_url=url, verify=False)
    assert len(data) == 30 and (root / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    with pytest.raises(ValueError, match=r"downloaded .*t10k-images-idx3-ubyte.gz has content md5 .* discarded"):
        load_mnist(tmp_path / "other", split="test", download=True, base_url=url)  # verify: not the original
    assert not list((tmp_path / "other" / "mnist").glob("*.gz"))  # nothing half-written is left


@pytest.mark.skipif(REAL_MNIST is None, reason="the real MNIST files are not here (../shared/data/mnist)")
def test_the_real_mnist_matches_its_published_counts() -> None:
    splits = dataset_splits("mnist", DataOptions(root=REAL_MNIST))
    assert torch.bincount(splits["train"].labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                                               5949]
    assert torch.bincount(splits["test"].labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert splits["test"].labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert splits["test"].images.float().mean() < 40  # strokes bright on a dark background, as Omniglot here


def test_read_idx_refuses_a_short_header(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"x-idx3-ubyte: truncated header \(6 bytes, 16 needed"):
        read_idx(path)


# -- image folders --------------------------------------------------------------------------------

def _image(path: Path, mode: str = "L", size: int = 12, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


def _folder(root: Path, classes: int = 10, per_class: int = 4, mode: str = "L") -> Path:
    for c in range(classes):
        for i in range(per_class):
            _image(root / f"class{c:02d}" / f"{i}.png", mode, value=10 * c + i)
    return root


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_folder_splits_its_classes_by_a_seed_and_decodes_once(tmp_path: Path, cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "images")
    spec = f"folder:{root}"
    splits = dataset_splits(spec, DataOptions(image_size=8, validation=2))
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 6, "validation": 2, "test": 2}
    names = [set(v.class_names) for v in splits.values()]
    assert set.union(*names) == {f"class{c:02d}" for c in range(10)} and sum(map(len, names)) == 10
    assert splits["train"].images.shape[1:] == (1, 8, 8)
    again = dataset_splits(spec, DataOptions(image_size=8, validation=2, split_seed=0))
    assert [v.class_names for v in again.values()] == [v.class_names for v in splits.values()]
    other = dataset_splits(spec, DataOptions(image_size=8, validation=2, split_seed=1))
    assert [v.class_names for v in other.values()] != [v.class_names for v in splits.values()]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")
    monkeypatch.setattr(folder_module, "decode_images", no_decoding)
    cached = dataset_splits(spec, DataOptions(image_size=8, validation=2))  # from the cache
    assert torch.equal(cached["test"].images, splits["test"].images)
    _image(root / "class00" / "0.png", value=200)  # an edited image: decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        dataset_splits(spec, DataOptions(image_size=8, validation=2))


def test_a_folder_with_split_folders_or_split_files_keeps_its_split(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "split"
    _folder(root / "train", classes=3)
    _folder(root / "val", classes=2)
    _folder(root / "test", classes=2, mode="L")
    splits = dataset_splits(f"folder:{root}", DataOptions(image_size=16))
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 3, "validation": 2, "test": 2}
    listed = _folder(tmp_path / "listed", classes=5)
    (listed / "train.txt").write_text("class00\nclass02\nclass04\n")
    (listed / "test.txt").write_text("class01\nclass03\n")
    splits = dataset_splits(f"folder:{listed}", DataOptions())
    assert splits["train"].class_names == ["class00", "class02", "class04"] and "validation" not in splits
    assert splits["test"].images.shape[1:] == (1, 12, 12)  # the images' own size
    (listed / "test.txt").write_text("class01\nclass09\n")
    with pytest.raises(ValueError, match=r"class 'class09' is listed in a split file but .*class09 is not a folder"):
        dataset_splits(f"folder:{listed}", DataOptions())


def test_folder_errors_name_the_file_and_the_problem(tmp_path: Path, cache: Path) -> None:
    root = _folder(tmp_path / "images", classes=6)
    _image(root / "class03" / "colour.png", mode="RGB")
    with pytest.raises(ValueError, match=r"mixes grey and colour images \(.*class\d\d/\d.png is grey, "
                                         r".*class03/colour.png is colour\): .*channels: 1"):
        dataset_splits(f"folder:{root}", DataOptions(image_size=8))
    rgb = dataset_splits(f"folder:{root}", DataOptions(image_size=8, channels=3))  # told: every image as RGB
    assert rgb["train"].images.shape[1] == 3
    (root / "class03" / "colour.png").unlink()
    (root / "class02" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class02/notes.txt is not an image Pillow can read"):
        dataset_splits(f"folder:{root}", DataOptions(image_size=8))
    (root / "class02" / "notes.txt").unlink()
    _image(root / "class01" / "big.png", size=20)
    with pytest.raises(ValueError, match=r"images differ in size .*give image_size"):
        dataset_splits(f"folder:{root}", DataOptions())
    (root / "class01" / "big.png").unlink()
    (root / "class05").mkdir(exist_ok=True)
    for f in (root / "class05").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"class folder .*class05 has no images"):
        dataset_splits(f"folder:{root}", DataOptions(image_size=8))
    (root / "class05").rmdir()
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere"):
        dataset_splits(f"folder:{tmp_path / 'nowhere'}", DataOptions())


def test_a_class_with_too_few_images_for_an_episode_is_named(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "few"
    _folder(root / "train", classes=5, per_class=2)
    _folder(root / "test", classes=5, per_class=4)
    with pytest.raises(ValueError, match=r"shots \+ queries = 1 \+ 2 = 3 exceeds the 2 examples of class 0"):
        get_tasksets(f"folder:{root}", ways=5, shots=1, queries=2, options=DataOptions(image_size=8))


# -- mini-ImageNet --------------------------------------------------------------------------------

def _tiny_mini_imagenet(root: Path, per_class: int = 3) -> Path:
    """Ravi & Larochelle's layout, in miniature: 4 / 2 / 2 classes of RGB JPEGs of odd sizes."""
    folder = root / "mini-imagenet"
    classes = {"train": ["n01", "n02", "n03", "n04"], "val": ["n05", "n06"], "test": ["n07", "n08"]}
    for split, names in classes.items():
        rows = ["filename,label"]
        for c, name in enumerate(names):
            for i in range(per_class):
                file = f"{name}{i:08d}.jpg"
                path = folder / "images" / file
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((30 + i, 40, 3), 20 * c, np.uint8), "RGB").save(path)
                rows.append(f"{file},{name}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_mini_imagenet_reads_the_csv_split_and_resizes_to_84(tmp_path: Path, cache: Path) -> None:
    _tiny_mini_imagenet(tmp_path)
    splits = dataset_splits("mini-imagenet", DataOptions(root=tmp_path))
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 4, "validation": 2, "test": 2}
    assert splits["test"].images.shape == (6, 3, 84, 84) and splits["test"].class_names == ["n07", "n08"]
    tasks = get_tasksets("mini-imagenet", ways=2, shots=1, queries=2, options=DataOptions(root=tmp_path))
    assert tasks.validation is not None and tasks.test.task_batch(0, 2).query_x.shape == (2, 4, 3, 84, 84)


def test_mini_imagenet_errors_name_the_file(tmp_path: Path, cache: Path) -> None:
    folder = _tiny_mini_imagenet(tmp_path)
    (folder / "val.csv").write_text("image,class\nx.jpg,n05\n")
    with pytest.raises(ValueError, match=r"val.csv must start with the header 'filename,label'"):
        mini_imagenet_splits(tmp_path)
    (folder / "val.csv").write_text("filename,label\nmissing.jpg,n05\n")
    with pytest.raises(FileNotFoundError, match=r"images/missing.jpg \(listed in .*val.csv, line 2\) is missing"):
        mini_imagenet_splits(tmp_path)
    (folder / "val.csv").write_text("filename,label\n")
    with pytest.raises(ValueError, match=r"split file .*val.csv lists no images"):
        mini_imagenet_splits(tmp_path)
    (folder / "val.csv").write_text("filename,label\nn0500000000.jpg,n05\n")
    (folder / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*test.csv"):
        mini_imagenet_splits(tmp_path)


# -- any torch Dataset, and the registry ----------------------------------------------------------

class CountedDataset(torch.utils.data.Dataset):
    """100,000 items whose labels are in `.targets`; counts every `__getitem__`."""

    def __init__(self, n: int = 100_000) -> None:
        self.targets = torch.arange(n) % 1000
        self.calls = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        self.calls += 1
        return torch.full((1, 4, 4), float(i)), int(self.targets[i])


def test_a_torch_dataset_with_targets_builds_its_class_index_without_decoding() -> None:
    dataset = CountedDataset()
    sampler = EpisodeSampler(dataset, ways=5, shots=1, queries=2, seed=0)
    assert dataset.calls == 0
    batch = sampler.task_batch(0, 2)
    assert dataset.calls == 2 * 5 * 3  # only the episodes' examples
    labels = dataset.targets[batch.support_x[:, :, 0, 0, 0].long()]
    assert all(len(set(row.tolist())) == 5 for row in labels)


def test_a_dataset_without_label_attributes_is_scanned_once() -> None:
    class Plain(torch.utils.data.Dataset):
        calls = 0

        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int):
            Plain.calls += 1
            return torch.zeros(2), i // 4

    dataset = Plain()
    EpisodeSampler(dataset, 5, 1, 1)
    EpisodeSampler(dataset, 5, 1, 1, seed=1)
    assert Plain.calls == 40


def test_the_registry_names_what_it_knows() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'omniglott' \(did you mean 'omniglot'\?\); known: .*folder:PATH"):
        dataset_info("omniglott")
    with pytest.raises(ValueError, match=r"dataset 'folder' needs an argument: folder:PATH"):
        dataset_info("folder")
    with pytest.raises(ValueError, match=r"dataset 'mnist' takes no argument"):
        dataset_info("mnist:/x")
    tasks = get_tasksets("sinusoid", ways=1, shots=5, queries=7, seed=3, eval_seed=2, eval_queries=9)
    assert torch.equal(tasks.train.task_batch(0, 2).query_x, SinusoidTasks(5, 7, seed=3).task_batch(0, 2).query_x)
    assert tasks.test.task_batch(0, 1).query_x.shape == (1, 9, 1)


def test_cached_images_keys_cover_the_decode_settings(tmp_path: Path, cache: Path) -> None:
    root = _folder(tmp_path / "images", classes=3)
    small = folder_module.load_image_folder(root, image_size=8)
    large = folder_module.load_image_folder(root, image_size=16)
    assert small.images.shape[-1] == 8 and large.images.shape[-1] == 16
    assert len(list((cache / "images").glob("*.safetensors"))) == 2
    assert hashlib.sha256(small.images.numpy().tobytes()).hexdigest() != hashlib.sha256(
        large.images.numpy().tobytes()).hexdigest()


class LazyDigits(torch.utils.data.Dataset):
    """A dataset that makes each 1x28x28 image in `__getitem__` (as a folder of files read from disk
    would), its labels in `.targets`; `calls` counts the items made in this process."""

    def __init__(self, classes: int = 12, per_class: int = 6) -> None:
        self.targets = torch.arange(classes).repeat_interleave(per_class)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        self.calls += 1
        generator = torch.Generator().manual_seed(i)
        image = torch.rand(1, 28, 28, generator=generator) * 0.3
        image[0, 2 * int(self.targets[i]): 2 * int(self.targets[i]) + 3] += 0.7  # a class-specific band
        return image, int(self.targets[i])


def test_a_lazy_dataset_trains_the_same_with_data_loader_workers(tmp_path: Path) -> None:
    import fastadapt
    from fastadapt.data import DatasetInfo, register_dataset
    from fastadapt.io import load_tensors

    train_split, test_split = LazyDigits(), LazyDigits(classes=6)
    register_dataset(DatasetInfo("lazy-digits", "made in __getitem__",
                                 lambda argument, options: {"train": train_split, "test": test_split},
                                 lambda argument, options: (1, 28, 28)))
    config = {"dataset": "lazy-digits", "backbone": "conv4", "algorithm": "maml", "ways": 3, "shots": 1, "queries": 2,
              "eval_queries": 2, "inner_lr": 0.4, "meta_batch": 4, "iterations": 6, "log_every": 2,
              "checkpoint_every": 6, "eval_episodes": 4, "threads": 1}
    weights, rows = {}, {}
    for workers in (0, 2):
        train_split.calls = 0
        run = tmp_path / f"workers{workers}"
        fastadapt.train({**config, "data_workers": workers}, run, progress=False)
        drawn_here = train_split.calls
        assert drawn_here == (6 * 4 * 3 * 3 if workers == 0 else 0)  # with workers, none is made in this process
        weights[workers] = load_tensors(next((run / "checkpoints").glob("step-*.safetensors")))
        rows[workers] = (run / "metrics.csv").read_text().splitlines()
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    strip = [lambda line: line.rsplit(",", 2)[0]]  # tasks/s and elapsed time differ
    assert [strip[0](r) for r in rows[0]] == [strip[0](r) for r in rows[2]]
