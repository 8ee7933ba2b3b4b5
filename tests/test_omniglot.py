"""Omniglot loading and the standard few-shot splits: real shared archives, tiny synthetic ones, download."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastadapt.data.omniglot import OMNIGLOT_ARCHIVES, OmniglotImages, load_omniglot, omniglot_splits

NAMES = ("images_background.zip", "images_evaluation.zip")


def _real_root() -> Path | None:
    """`$FASTADAPT_DATA` if it holds the Omniglot zips, else ../shared/data next to the repo."""
    candidates = [os.environ.get("FASTADAPT_DATA"), Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    for c in candidates:
        if c and all((Path(c) / "omniglot" / n).is_file() for n in NAMES):
            return Path(c)
    return None


REAL_ROOT = _real_root()
needs_real = pytest.mark.skipif(
    REAL_ROOT is None,
    reason="real Omniglot zips not found (set FASTADAPT_DATA to a folder with omniglot/images_*.zip, "
    "or provide ../shared/data/omniglot next to the repo)",
)


# ----------------------------------------------------------------------------------------------
# helpers


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _make_tiny_zip(path: Path, top: str, seed: int, alphabets: int = 2, chars: int = 3, drawings: int = 4) -> dict:
    """A zip with the official layout and random 105x105 mode-"1" PNGs; returns {member: bool pixels}."""
    rng = np.random.default_rng(seed)
    pixels: dict[str, np.ndarray] = {}
    dirs = [f"{top}/"]
    for a in range(alphabets):
        alphabet = f"Alphabet_{seed}_{a}"
        dirs.append(f"{top}/{alphabet}/")
        for c in range(chars):
            dirs.append(f"{top}/{alphabet}/character{c + 1:02d}/")
            for d in range(drawings):
                white = rng.random((105, 105)) < 0.8  # True = white paper, False = ink
                white[0, 0], white[0, 1] = False, True  # a known ink pixel and a known paper pixel
                pixels[f"{top}/{alphabet}/character{c + 1:02d}/{seed * 100 + a * 10 + c:04d}_{d + 1:02d}.png"] = white
    members = list(pixels)
    random.Random(seed).shuffle(members)  # stored out of order: the loader must sort
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for d in dirs:
            zf.writestr(d, b"")
        for m in members:
            img = Image.fromarray(pixels[m])
            assert img.mode == "1"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            zf.writestr(m, buf.getvalue())
    return pixels


@pytest.fixture()
def tiny_root(tmp_path: Path) -> tuple[Path, dict]:
    """A data root with tiny background (2 alphabets x 3 characters x 4 drawings) and evaluation archives."""
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    pixels: dict = {}
    pixels.update(_make_tiny_zip(root / "omniglot" / NAMES[0], "images_background", seed=1))
    pixels.update(_make_tiny_zip(root / "omniglot" / NAMES[1], "images_evaluation", seed=2))
    return root, pixels


# ----------------------------------------------------------------------------------------------
# 1. real data (decoded once per session)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[OmniglotImages, Path, float]:
    if REAL_ROOT is None:
        pytest.skip("real Omniglot zips not found")
    cache = tmp_path_factory.mktemp("omniglot_cache")
    t0 = time.perf_counter()
    data = load_omniglot(REAL_ROOT, cache_dir=cache)
    return data, cache, time.perf_counter() - t0


@needs_real
def test_archive_table_accepts_shared_zips() -> None:
    for name in NAMES:
        info = OMNIGLOT_ARCHIVES[name]
        assert info.url == f"https://github.com/brendenlake/omniglot/raw/master/python/{name}"
        assert _md5(REAL_ROOT / "omniglot" / name) in info.md5s
    assert OMNIGLOT_ARCHIVES[NAMES[0]].md5s[0] == "68d2efa1b9178cc56df9314c21c6e718"  # official
    assert OMNIGLOT_ARCHIVES[NAMES[1]].md5s[0] == "6b91aef0f799c5bb55b94e3f2daec811"


@needs_real
def test_real_counts_and_pixels(real: tuple[OmniglotImages, Path, float]) -> None:
    data, _, seconds = real
    print(f"first decode of real Omniglot: {seconds:.1f} s")
    assert data.num_background == 964 and len(data.characters) == 1623
    assert data.images.shape == (32460, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.character.dtype == torch.int64 and data.character.shape == (32460,)
    assert torch.equal(torch.bincount(data.character), torch.full((1623,), 20))
    assert torch.all(data.character[1:] >= data.character[:-1])  # grouped by character, in id order
    assert data.characters[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert all(c.startswith("images_background/") for c in data.characters[:964])
    assert all(c.startswith("images_evaluation/") for c in data.characters[964:])
    assert data.characters[:964] == sorted(data.characters[:964], key=lambda s: tuple(s.split("/")))
    assert len(set(data.characters)) == 1623
    assert data.images.float().mean() < 60  # strokes bright on black: mostly dark
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0


@needs_real
def test_real_warm_cache_is_fast(real: tuple[OmniglotImages, Path, float]) -> None:
    data, cache, _ = real
    t0 = time.perf_counter()
    again = load_omniglot(REAL_ROOT, cache_dir=cache)
    seconds = time.perf_counter() - t0
    print(f"warm load of real Omniglot: {seconds:.3f} s")
    assert seconds < 2.0
    assert torch.equal(again.images, data.images) and torch.equal(again.character, data.character)
    assert again.characters == data.characters and again.num_background == 964
    assert len(list((cache / "omniglot").glob("*-28.safetensors"))) == 1


@needs_real
def test_real_standard_splits(real: tuple[OmniglotImages, Path, float]) -> None:
    data, cache, _ = real
    splits = omniglot_splits(REAL_ROOT, cache_dir=cache)
    assert set(splits) == {"train", "test"}
    train, test = splits["train"], splits["test"]
    assert train.num_classes == 4800 and len(train) == 96000
    assert test.num_classes == 423 and len(test) == 423 * 20
    assert torch.equal(train.labels.unique(), torch.arange(4800))
    assert torch.equal(test.labels.unique(), torch.arange(423))
    assert torch.equal(torch.bincount(train.labels), torch.full((4800,), 20))
    assert train.class_names[:4] == [train.class_names[0][: -len("/rot0")] + f"/rot{r}" for r in (0, 90, 180, 270)]
    # the fixed permutation from split_seed=0 decides which characters are where
    perm = torch.randperm(1623, generator=torch.Generator().manual_seed(0))
    assert train.class_names[0] == data.characters[int(perm[0])] + "/rot0"
    assert test.class_names[0] == data.characters[int(perm[1200])]
    train_chars = {n.rsplit("/", 1)[0] for n in train.class_names}
    assert len(train_chars) == 1200 and not train_chars & set(test.class_names)
    # rotated classes are torch.rot90 of the base class images
    for c in (0, 1, 1199):
        base = train.images[train.labels == 4 * c]
        assert torch.equal(base, data.images[data.character == perm[c]])
        for k in (1, 2, 3):
            assert torch.equal(train.images[train.labels == 4 * c + k], torch.rot90(base, k, dims=(2, 3)))
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == 0


@needs_real
def test_real_validation_split(real: tuple[OmniglotImages, Path, float]) -> None:
    _, cache, _ = real
    splits = omniglot_splits(REAL_ROOT, cache_dir=cache, validation_characters=100)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].num_classes == 4400 and len(splits["train"]) == 88000
    assert splits["validation"].num_classes == 400 and len(splits["validation"]) == 8000
    assert splits["test"].num_classes == 423
    names = [set(n.rsplit("/", 1)[0] for n in splits[k].class_names) for k in ("train", "validation")]
    assert not names[0] & names[1] and not (names[0] | names[1]) & set(splits["test"].class_names)
    # the validation characters are the last 100 of the same 1200 training characters
    full = omniglot_splits(REAL_ROOT, cache_dir=cache)
    assert full["train"].class_names == splits["train"].class_names + splits["validation"].class_names
    assert full["test"].class_names == splits["test"].class_names
    unrotated = omniglot_splits(REAL_ROOT, cache_dir=cache, rotations=False, split_seed=1)
    assert unrotated["train"].num_classes == 1200 and unrotated["test"].num_classes == 423
    assert unrotated["test"].class_names != full["test"].class_names  # another seed, another split


def test_split_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size.*0"):
        omniglot_splits(tmp_path, image_size=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="validation_characters.*1200"):
        omniglot_splits(tmp_path, validation_characters=1200, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="validation_characters.*-1"):
        omniglot_splits(tmp_path, validation_characters=-1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot(tmp_path, image_size=-3, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# 2. tiny archives built here


def test_tiny_loads_sorted_and_inverted(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, pixels = tiny_root
    data = load_omniglot(root, image_size=105, cache_dir=tmp_path / "cache", verify=False)
    assert data.num_background == 6 and len(data.characters) == 12
    assert data.characters[0] == "images_background/Alphabet_1_0/character01"
    assert data.characters[6] == "images_evaluation/Alphabet_2_0/character01"
    assert data.images.shape == (48, 1, 105, 105) and data.images.dtype == torch.uint8
    assert torch.equal(data.character, torch.arange(12).repeat_interleave(4))
    # members are read sorted by path, and ink (black in the PNG) becomes 255
    for i, member in enumerate(sorted(pixels)):
        expected = np.where(pixels[member], 0, 255).astype(np.uint8)
        assert np.array_equal(data.images[i, 0].numpy(), expected), member
    assert int(data.images[0, 0, 0, 0]) == 255 and int(data.images[0, 0, 0, 1]) == 0
    assert not any(p.name.endswith(".safetensors") for p in root.rglob("*"))  # cache not in the data root


def test_tiny_image_size_and_cache(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny_root
    cache = tmp_path / "cache"
    small = load_omniglot(root, image_size=32, cache_dir=cache, verify=False)
    assert small.images.shape == (48, 1, 32, 32)
    default = load_omniglot(root, cache_dir=cache, verify=False)
    assert default.images.shape == (48, 1, 28, 28)
    files = sorted((cache / "omniglot").glob("*.safetensors"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["28.safetensors", "32.safetensors"]
    # a corrupt cache file is ignored with a warning and rebuilt
    target = next(f for f in files if f.name.endswith("-32.safetensors"))
    target.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="corrupt Omniglot cache"):
        rebuilt = load_omniglot(root, image_size=32, cache_dir=cache, verify=False)
    assert torch.equal(rebuilt.images, small.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load_omniglot(root, image_size=32, cache_dir=cache, verify=False).images, small.images)


def test_tiny_md5_refused_with_verify(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny_root
    md5 = _md5(root / "omniglot" / NAMES[0])
    with pytest.raises(ValueError) as err:
        load_omniglot(root, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert md5 in msg and NAMES[0] in msg and OMNIGLOT_ARCHIVES[NAMES[0]].md5s[1] in msg
    assert "download" in msg


def test_tiny_truncated_and_corrupt(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny_root
    path = root / "omniglot" / NAMES[0]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="images_background.zip.*re-download"):
        load_omniglot(root, cache_dir=tmp_path / "cache", verify=False)
    with pytest.raises(ValueError, match="images_background.zip"):
        load_omniglot(root, cache_dir=tmp_path / "cache")  # with verify: the md5 check catches it first
    # a flipped byte inside a stored member: CRC error
    corrupt = bytearray(good)
    offset = good.index(b"IDAT")  # inside the first PNG's image data
    corrupt[offset + 8] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"images_background.zip.*(CRC|decode)"):
        load_omniglot(root, cache_dir=tmp_path / "cache", verify=False)


def test_tiny_bad_layout_and_bad_png(tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    _make_tiny_zip(folder / NAMES[0], "images_background", seed=1)
    with zipfile.ZipFile(folder / NAMES[1], "w") as zf:
        zf.writestr("images_evaluation/Alpha/character01/0001_01.png", b"this is no png")
    with pytest.raises(ValueError, match="images_evaluation.zip.*cannot decode.*0001_01.png"):
        load_omniglot(root, cache_dir=tmp_path / "cache", verify=False)
    with zipfile.ZipFile(folder / NAMES[1], "w") as zf:
        zf.writestr("images_evaluation/Alpha/0001_01.png", b"")
    with pytest.raises(ValueError, match="images_evaluation.zip.*<Alphabet>/<characterNN>"):
        load_omniglot(root, cache_dir=tmp_path / "cache", verify=False)


def test_missing_archive_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(tmp_path / "omniglot" / "images_background.zip") in msg
    assert "FASTADAPT_DATA" in msg and "root=" in msg and "--data-root" in msg and "download=True" in msg
    assert OMNIGLOT_ARCHIVES[NAMES[0]].url in msg


def test_data_root_from_env(tiny_root: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tiny_root
    monkeypatch.setenv("FASTADAPT_DATA", str(root))
    assert load_omniglot(cache_dir=tmp_path / "cache", verify=False).num_background == 6


def test_read_only_data_root(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny_root
    folder = root / "omniglot"
    before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)
    root.chmod(0o555)
    try:
        data = load_omniglot(root, cache_dir=tmp_path / "cache", verify=False)
        assert data.images.shape[0] == 48
        assert sorted(p.name for p in folder.iterdir()) == before
        assert sorted(p.name for p in root.iterdir()) == ["omniglot"]
    finally:
        root.chmod(stat.S_IRWXU)
        folder.chmod(stat.S_IRWXU)


def test_tiny_splits(tiny_root: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny_root
    kw = dict(cache_dir=tmp_path / "cache", verify=False)
    with pytest.raises(ValueError, match="train_characters"):
        omniglot_splits(root, **kw)  # 12 characters: the default 1200/423 split cannot apply
    with pytest.raises(ValueError, match="validation_characters.*8"):
        omniglot_splits(root, train_characters=8, validation_characters=8, **kw)
    splits = omniglot_splits(root, train_characters=8, validation_characters=2, image_size=16, **kw)
    assert list(splits) == ["train", "validation", "test"]
    assert [splits[k].num_classes for k in splits] == [24, 8, 4]
    assert [len(splits[k]) for k in splits] == [96, 32, 16]
    assert splits["train"].images.shape[1:] == (1, 16, 16)
    for ds in splits.values():
        assert torch.equal(ds.labels.unique(), torch.arange(ds.num_classes))
        assert len(ds.class_names) == ds.num_classes
    assert splits["validation"].class_names[1].endswith("/rot90") and "/rot" not in splits["test"].class_names[0]
    flip = lambda img: img.flip(-1)  # noqa: E731
    plain = omniglot_splits(root, train_characters=8, rotations=False, transform=flip, image_size=16, **kw)
    assert plain["train"].num_classes == 8 and plain["test"].num_classes == 4
    x, _ = plain["train"][0]
    assert torch.equal(x, plain["train"].images[0].float().div(255).flip(-1))


# ----------------------------------------------------------------------------------------------
# 3. download from a local HTTP server (never the internet)


def test_download_tiny(tiny_root: tuple[Path, dict], http_dir: tuple[Path, str], tmp_path: Path) -> None:
    src, _ = tiny_root
    served, url = http_dir
    for n in NAMES:
        shutil.copy(src / "omniglot" / n, served / n)
    root = tmp_path / "fresh"
    data = load_omniglot(root, download=True, base_url=url, cache_dir=tmp_path / "cache", verify=False)
    assert data.images.shape == (48, 1, 28, 28)
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == sorted(NAMES)
    for n in NAMES:
        assert _md5(root / "omniglot" / n) == _md5(served / n)


@needs_real
def test_download_real(real: tuple[OmniglotImages, Path, float], http_dir: tuple[Path, str], tmp_path: Path) -> None:
    data, cache, _ = real
    served, url = http_dir
    for n in NAMES:
        shutil.copy(REAL_ROOT / "omniglot" / n, served / n)
    root = tmp_path / "fresh"
    got = load_omniglot(root, download=True, base_url=url, cache_dir=cache)  # md5-checked; same cache key
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == sorted(NAMES)
    assert torch.equal(got.images, data.images) and got.characters == data.characters


def test_download_checksum_mismatch(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    served, url = http_dir
    wrong = b"this is not the Omniglot archive\n" * 100
    for n in NAMES:
        (served / n).write_bytes(wrong)
    root = tmp_path / "fresh"
    with pytest.raises(ValueError) as err:
        load_omniglot(root, download=True, base_url=url, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert hashlib.md5(wrong).hexdigest() in msg
    assert all(m in msg for m in OMNIGLOT_ARCHIVES[NAMES[0]].md5s)
    assert list((root / "omniglot").iterdir()) == []  # no partial or temp file left behind


def test_download_server_error(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    _, url = http_dir  # nothing served: 404
    root = tmp_path / "fresh"
    with pytest.raises(OSError, match="could not download.*images_background.zip"):
        load_omniglot(root, download=True, base_url=url, cache_dir=tmp_path / "cache")
    assert list((root / "omniglot").iterdir()) == []
