"""Tests of supermask_fx.data: IDX parsing, local search, image folders, archives, caching and errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from supermask_fx.data import (
    DATASET_NAMES,
    DatasetFormatError,
    DatasetInfo,
    DatasetNotFoundError,
    ImageTensorDataset,
    dataset_info,
    extract_archive,
    load_dataset,
    load_image_folder,
    read_idx,
    vision,
)
from supermask_fx.data.imagefolder import _archive_id, _safe_extractall

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")


# -------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No standard places, no $SUPERMASK_FX_DATA, a private cache dir: only what a test creates is found."""
    monkeypatch.setattr(vision, "_standard_bases", list)
    monkeypatch.setattr(vision, "_SYSTEM_DIRS", {})
    monkeypatch.delenv("SUPERMASK_FX_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERMASK_FX_CACHE", str(cache))
    return cache


def idx_bytes(t: torch.Tensor) -> bytes:
    codes = {torch.uint8: 0x08, torch.int8: 0x09, torch.int16: 0x0B, torch.int32: 0x0C, torch.float32: 0x0D}
    header = bytes([0, 0, codes[t.dtype], t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    flat = t.contiguous().view(torch.uint8).view(-1, t.element_size())
    if sys.byteorder == "little":
        flat = flat.flip(1)
    return header + bytes(flat.contiguous().view(-1).tolist())


def write_idx(path: Path, t: torch.Tensor, gz: bool = True) -> Path:
    data = idx_bytes(t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist_like(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
        out[prefix] = (images, labels)
    return out


def make_image_folder(root: Path, classes, per_class: int = 2, size: int = 32, ext: str = ".png", splits=("train",)):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    expected = {}
    for split in splits:
        images, labels = [], []
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(arr.numpy()).save(root / split / cls / f"{i:04d}{ext}")
                images.append(arr.permute(2, 0, 1))
                labels.append(label)
        expected[split] = (torch.stack(images), torch.tensor(labels))
    return expected


# ------------------------------------------------------------------------------------------------- metadata


def test_dataset_info():
    assert set(DATASET_NAMES) == {"mnist", "fashion_mnist", "cifar10"}
    info = dataset_info("Fashion-MNIST")
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.num_classes, info.channels, info.image_size) == ("fashion_mnist", 10, 1, 28)
    assert info.classes[9] == "Ankle boot" and len(info.classes) == 10
    c = dataset_info("cifar10")
    assert c.shape == (3, 32, 32) and len(c.mean) == len(c.std) == 3 and c.classes[0] == "airplane"
    with pytest.raises(ValueError, match="cifar10"):
        dataset_info("imagenet")


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST IDX files not found at {MNIST_DIR}")
def test_real_mnist(isolated):
    train = load_dataset("mnist", "train", root=MNIST_DIR, download=False)
    test = load_dataset("mnist", "test", root=MNIST_DIR, download=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.targets.dtype == torch.int64
    assert int(train.targets.min()) == 0 and int(train.targets.max()) == 9
    assert int(train.targets[0]) == 5 and int(test.targets[0]) == 7
    assert min(train.targets.bincount().tolist()) > 5000  # every digit well represented
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 5
    # normalised with MNIST's statistics: mean ~0, std ~1 over the training set
    z = train.normalize(train.images[:20000])
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST IDX files not found at {MNIST_DIR}")
def test_real_mnist_found_in_project_shared_data(monkeypatch):
    monkeypatch.delenv("SUPERMASK_FX_DATA", raising=False)
    ds = load_dataset("mnist", "test", download=False, limit=100)
    assert len(ds) == 100 and int(ds.targets[0]) == 7


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("SUPERMASK_FX_DATA", raising=False)
    train = load_dataset("fashion_mnist", "train", download=False)
    test = load_dataset("fashion_mnist", "test", download=False)
    assert str(FASHION_DIR) in train.source
    assert len(train) == 60000 and len(test) == 10000
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert int(train.targets[0]) == 9  # the first training image is an ankle boot


# ----------------------------------------------------------------------------------------------- IDX parser


def test_read_idx_roundtrip(tmp_path):
    t = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    torch.testing.assert_close(read_idx(write_idx(tmp_path / "a.gz", t)), t)
    torch.testing.assert_close(read_idx(write_idx(tmp_path / "a", t, gz=False)), t)
    big = torch.tensor([[1, -2, 70000], [2**30, -(2**31), 0]], dtype=torch.int32)
    torch.testing.assert_close(read_idx(write_idx(tmp_path / "b.gz", big)), big)
    f = torch.tensor([1.5, -0.25, 3.0e10], dtype=torch.float32)
    torch.testing.assert_close(read_idx(write_idx(tmp_path / "c", f, gz=False)), f)


def test_read_idx_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_read_idx_truncated_data(tmp_path):
    data = idx_bytes(torch.zeros(10, 28, 28, dtype=torch.uint8))
    path = tmp_path / "short"
    path.write_bytes(data[:-100])
    with pytest.raises(DatasetFormatError, match="truncated") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)
    path.write_bytes(gzip.compress(data[:-1]))
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(path)
    path.write_bytes(data[:6])  # inside the dimension header
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(path)


def test_read_idx_bad_magic_and_trailing_bytes(tmp_path):
    data = idx_bytes(torch.zeros(2, 2, dtype=torch.uint8))
    path = tmp_path / "labels"
    path.write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(DatasetFormatError, match="magic") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)
    path.write_bytes(data[:2] + b"\x42" + data[3:])  # unknown type code
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(path)
    path.write_bytes(gzip.compress(data + b"\x00"))
    with pytest.raises(DatasetFormatError, match="extra bytes"):
        read_idx(path)


# --------------------------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize("gz", [True, False])
def test_load_synthetic_mnist(isolated, tmp_path, gz):
    root = tmp_path / "data"
    expected = make_mnist_like(root, gz=gz)
    ds = load_dataset("mnist", "train", root=root, download=False)
    assert isinstance(ds, ImageTensorDataset)
    images, labels = expected["train"]
    assert torch.equal(ds.images, images.unsqueeze(1)) and torch.equal(ds.targets, labels.long())
    assert ds.exact and ds.display_name == "MNIST" and str(root) in ds.source
    x, y = ds[3]
    info = dataset_info("mnist")
    torch.testing.assert_close(x, (images[3].float().unsqueeze(0) / 255 - info.mean[0]) / info.std[0])
    assert isinstance(y, int) and y == int(labels[3])
    xb, yb = ds.get_batch(torch.tensor([3, 0]))
    torch.testing.assert_close(xb[0], x)
    assert yb.tolist() == [int(labels[3]), int(labels[0])]
    test = load_dataset("mnist", "test", root=root, download=False)
    assert torch.equal(test.targets, expected["t10k"][1].long())


def test_limit_keeps_first_examples(isolated, tmp_path):
    expected = make_mnist_like(tmp_path / "d", n_train=20)
    ds = load_dataset("mnist", root=tmp_path / "d", download=False, limit=7)
    assert len(ds) == 7 and torch.equal(ds.targets, expected["train"][1][:7].long())
    assert ds.images.untyped_storage().nbytes() == 7 * 28 * 28  # not a view into the full split
    assert len(load_dataset("mnist", root=tmp_path / "d", download=False, limit=1000)) == 20
    with pytest.raises(ValueError):
        load_dataset("mnist", root=tmp_path / "d", download=False, limit=0)
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation", root=tmp_path / "d", download=False)


def test_dataloader_batches(isolated, tmp_path):
    make_mnist_like(tmp_path / "d", n_train=10)
    ds = load_dataset("mnist", root=tmp_path / "d", download=False)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_torchvision_and_subfolder_layouts(isolated, tmp_path, monkeypatch):
    make_mnist_like(tmp_path / "tv" / "MNIST" / "raw", gz=False)
    assert "MNIST/raw" in load_dataset("mnist", root=tmp_path / "tv", download=False).source
    expected = make_mnist_like(tmp_path / "env" / "fashion-mnist", seed=3)
    monkeypatch.setenv("SUPERMASK_FX_DATA", str(tmp_path / "env"))
    ds = load_dataset("fashion_mnist", download=False)
    assert torch.equal(ds.targets, expected["train"][1].long()) and ds.display_name == "Fashion-MNIST"
    # root= is searched before $SUPERMASK_FX_DATA
    other = make_mnist_like(tmp_path / "root", seed=4)
    ds = load_dataset("fashion_mnist", root=tmp_path / "root", download=False)
    assert torch.equal(ds.targets, other["train"][1].long())


def test_label_count_mismatch(isolated, tmp_path):
    root = tmp_path / "d"
    make_mnist_like(root, n_train=10)
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(9, dtype=torch.uint8))
    with pytest.raises(DatasetFormatError, match="9 labels") as exc:
        load_dataset("mnist", root=root, download=False)
    assert "train-labels-idx1-ubyte.gz" in str(exc.value)


def test_label_out_of_range_and_wrong_image_shape(isolated, tmp_path):
    root = tmp_path / "d"
    make_mnist_like(root, n_train=4)
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.tensor([1, 2, 10, 3], dtype=torch.uint8))
    with pytest.raises(DatasetFormatError, match="labels must lie"):
        load_dataset("mnist", root=root, download=False)
    write_idx(root / "t10k-images-idx3-ubyte.gz", torch.zeros(5, 32, 32, dtype=torch.uint8))
    with pytest.raises(DatasetFormatError, match="t10k-images"):
        load_dataset("mnist", "test", root=root, download=False)


def test_truncated_file_in_dataset(isolated, tmp_path):
    root = tmp_path / "d"
    make_mnist_like(root)
    p = root / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", root=root, download=False)


def test_half_present_split_is_a_format_error(isolated, tmp_path):
    root = tmp_path / "d"
    write_idx(root / "train-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    with pytest.raises(DatasetFormatError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", root=root, download=False)


# ------------------------------------------------------------------------------------- not found / download


def test_missing_dataset_message(isolated, tmp_path, monkeypatch):
    env = tmp_path / "envdata"
    monkeypatch.setenv("SUPERMASK_FX_DATA", str(env))
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere", download=False)
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert "fashion_mnist" in msg
    for name in IDX_FILES:
        assert name in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg and str(env / "fashion-mnist") in msg
    assert "SUPERMASK_FX_DATA" in msg and "root=" in msg and "download=False" in msg


def test_missing_cifar_message(isolated, tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    msg = str(exc.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "train/<class>" in msg
    assert "cifar10-jpeg.tar.gz" in msg


def test_download_without_torchvision(isolated, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetNotFoundError, match="pip install torchvision") as exc:
        load_dataset("mnist", root=tmp_path, download=True)
    assert "train-images-idx3-ubyte.gz" in str(exc.value)


def _fake_torchvision(monkeypatch, calls, fail=False):
    import numpy as np

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((type(self).__name__, root, train, download))
            if fail:
                raise RuntimeError("Error downloading: <urlopen error [Errno -2] Name or service not known>")
            self.data = torch.full((4, 28, 28), 7, dtype=torch.uint8)
            self.targets = torch.tensor([0, 1, 2, 3])

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((type(self).__name__, root, train, download))
            self.data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
            self.targets = [4, 9]

    datasets = types.SimpleNamespace(MNIST=FakeMNIST, FashionMNIST=FakeMNIST, CIFAR10=FakeCIFAR10)
    pkg = types.SimpleNamespace(datasets=datasets)
    monkeypatch.setitem(sys.modules, "torchvision", pkg)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_download_with_torchvision(isolated, tmp_path, monkeypatch):
    calls = []
    _fake_torchvision(monkeypatch, calls)
    ds = load_dataset("mnist", "test", root=tmp_path / "dl", download=True)
    assert calls == [("FakeMNIST", str(tmp_path / "dl"), False, True)]
    assert ds.images.shape == (4, 1, 28, 28) and ds.targets.tolist() == [0, 1, 2, 3]
    cifar = load_dataset("cifar10", download=True)  # default download root: the cache dir
    assert calls[-1][1] == str(isolated / "data")
    assert cifar.images.shape == (2, 3, 32, 32) and cifar.targets.tolist() == [4, 9]
    # HWC -> CHW: pixel (0, 0) of image 0 holds channel values 0, 1, 2
    assert cifar.images[0, :, 0, 0].tolist() == [0, 1, 2]


def test_download_failure_is_not_found(isolated, tmp_path, monkeypatch):
    _fake_torchvision(monkeypatch, [], fail=True)
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert "Name or service not known" in str(exc.value) and "apt-get" in str(exc.value)


# -------------------------------------------------------------------------------------------- image folders


def test_image_folder_two_classes_and_cache(tmp_path, isolated):
    root = tmp_path / "imgs"
    expected = make_image_folder(root, ["cat", "dog"], per_class=3, size=8)
    first = load_image_folder(root / "train")
    images, _ = expected["train"]
    assert first.classes == ("cat", "dog") and not first.from_cache and not first.lossy
    assert first.images.shape == (6, 3, 8, 8) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, images[[0, 3, 1, 4, 2, 5]])  # PNG is lossless; classes interleaved
    assert first.targets.tolist() == [0, 1, 0, 1, 0, 1]
    assert first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == isolated / "imagefolder"  # the library's cache folder, not the data's
    assert not list(first.cache_path.parent.glob(".*.tmp"))  # atomic write left no temporary file
    second = load_image_folder(root / "train")
    assert second.from_cache and torch.equal(second.images, first.images)
    # adding an image invalidates the cache
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "train" / "dog" / "9999.png")
    third = load_image_folder(root / "train")
    assert not third.from_cache and len(third.targets) == 7
    assert third.images[-1, :, 0, 0].tolist() == [255, 0, 0]
    # grayscale mode
    grey = load_image_folder(root / "train", mode="L")
    assert grey.images.shape == (7, 1, 8, 8)


def test_image_folder_corrupt_cache_is_rebuilt(tmp_path, isolated):
    root = tmp_path / "imgs"
    make_image_folder(root, ["a", "b"], per_class=1, size=4)
    first = load_image_folder(root / "train")
    first.cache_path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_image_folder(root / "train")
    assert not again.from_cache and torch.equal(again.images, first.images)
    assert load_image_folder(root / "train").from_cache


def test_image_folder_readonly_dir_uses_cache_dir(tmp_path, isolated):
    root = tmp_path / "ro"
    make_image_folder(root, ["a", "b"], per_class=1, size=4)
    os.chmod(root, 0o555)
    try:
        first = load_image_folder(root / "train")
        assert first.cache_path is not None and isolated in first.cache_path.parents
        assert load_image_folder(root / "train").from_cache
        assert not any(p.suffix == ".pt" for p in root.iterdir())
    finally:
        os.chmod(root, 0o755)


def test_image_folder_errors(tmp_path, isolated):
    root = tmp_path / "imgs"
    make_image_folder(root, ["a", "b"], per_class=1, size=8)
    with pytest.raises(DatasetFormatError, match="missing: c") as exc:
        load_image_folder(root / "train", classes=["a", "b", "c"])
    assert str(root / "train") in str(exc.value)
    with pytest.raises(DatasetFormatError, match="unexpected class folder"):
        load_image_folder(root / "train", classes=["a"])
    with pytest.raises(DatasetFormatError, match="expected 32x32"):
        load_image_folder(root / "train", image_size=32, cache=False)
    (root / "train" / "b" / "0000.png").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="0000.png"):
        load_image_folder(root / "train", cache=False)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no images"):
        load_image_folder(root / "train", classes=["a", "b", "empty"], cache=False)


CIFAR_CLASSES = dataset_info("cifar10").classes


def test_cifar_image_folder_via_load_dataset(tmp_path, isolated):
    root = tmp_path / "c"
    expected = make_image_folder(root / "cifar10", CIFAR_CLASSES, per_class=2, splits=("train", "test"))
    for split in ("train", "test"):
        ds = load_dataset("cifar10", split, root=root, download=False)
        assert ds.images.shape == (20, 3, 32, 32)
        interleaved = [2 * (i % 10) + i // 10 for i in range(20)]  # 1st image of each class, then the 2nd
        assert torch.equal(ds.images, expected[split][0][interleaved])
        assert torch.equal(ds.targets, expected[split][1][interleaved])
        assert ds.targets.tolist() == [i % 10 for i in range(20)]
        assert ds.exact and ds.display_name == "CIFAR-10"
        x, y = ds[12]
        assert x.shape == (3, 32, 32) and y == 2


def test_cifar_jpeg_folder_is_marked_as_copy(tmp_path, isolated):
    root = tmp_path / "c"
    make_image_folder(root, CIFAR_CLASSES, per_class=1, ext=".jpg", splits=("test",))
    ds = load_dataset("cifar10", "test", root=root, download=False)  # files directly in root
    assert not ds.exact and ds.display_name == "CIFAR-10 (JPEG copy)"
    assert len(ds) == 10 and ds.targets.tolist() == list(range(10))


def test_cifar_missing_class_folder(tmp_path, isolated):
    root = tmp_path / "c"
    make_image_folder(root, CIFAR_CLASSES[:9], per_class=1, size=32)
    with pytest.raises(DatasetFormatError, match="truck"):
        load_dataset("cifar10", root=root, download=False)


def test_cifar_missing_split_folder(tmp_path, isolated):
    root = tmp_path / "c"
    make_image_folder(root, CIFAR_CLASSES, per_class=1, size=32, splits=("train",))
    with pytest.raises(DatasetFormatError, match="split folder missing"):
        load_dataset("cifar10", "test", root=root, download=False)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_cifar_archive_is_extracted_once_into_the_cache_not_beside_the_data(tmp_path, isolated, capsys):
    """A writable data folder holding the archive: the extraction and the decoded caches go to the library's cache
    folder, the data folder is left exactly as it was, and the first load says where on stderr."""
    src = tmp_path / "src"
    expected = make_image_folder(src, CIFAR_CLASSES, per_class=1, splits=("train", "test"))
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpeg.tar.gz", "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
    os.chmod(data, 0o755)  # read-write: writing beside the archive would be possible
    before = _listing(data)
    ds = load_dataset("cifar10", "test", root=data, download=False)
    assert torch.equal(ds.images, expected["test"][0]) and ds.targets.tolist() == list(range(10))
    assert _listing(data) == before  # nothing new, nothing changed in the user's folder
    (extracted,) = (isolated / "extracted").iterdir()
    assert extracted.name.startswith("cifar10-jpeg-") and (extracted / "test" / "airplane" / "0000.png").is_file()
    (cached,) = (isolated / "imagefolder").iterdir()
    assert cached.name.endswith("-test-RGB.supermask_fx.pt")
    err = capsys.readouterr().err
    assert f"extracting {data / 'cifar10-jpeg.tar.gz'} (once) into {extracted}" in err
    assert f"cached them in {cached}" in err
    marker = extracted / ".supermask_fx-extracted"
    stamp = marker.stat().st_mtime_ns
    train = load_dataset("cifar10", "train", root=data, download=False)
    assert len(train) == 10 and marker.stat().st_mtime_ns == stamp  # not extracted again
    assert "extracting" not in capsys.readouterr().err
    again = load_dataset("cifar10", "test", root=data, download=False)  # from the cache: says nothing
    assert torch.equal(again.images, ds.images) and capsys.readouterr().err == ""
    assert extract_archive(data / "cifar10-jpeg.tar.gz") == extracted
    assert _listing(data) == before


def test_an_extraction_beside_the_archive_by_an_earlier_version_is_reused(tmp_path, isolated):
    src = tmp_path / "src"
    make_image_folder(src / "wrapped", ["x", "y"], per_class=1, size=4)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-sample.tar.gz", "w:gz") as tf:
        tf.add(src / "wrapped", arcname="wrapped")
    old = data / "cifar-sample"  # where versions before this one extracted
    with tarfile.open(data / "cifar-sample.tar.gz") as tf:
        _safe_extractall(tf, old)
    (old / ".supermask_fx-extracted").write_text(_archive_id(data / "cifar-sample.tar.gz"))
    assert extract_archive(data / "cifar-sample.tar.gz") == old
    assert not (isolated / "extracted").exists()


def test_extraction_into_an_unwritable_cache_names_the_fix(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_image_folder(data / "src", ["x"], per_class=1, size=4)
    with tarfile.open(data / "cifar-sample.tar.gz", "w:gz") as tf:
        tf.add(data / "src", arcname="src")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    monkeypatch.setenv("SUPERMASK_FX_CACHE", str(cache))
    try:
        with pytest.raises(DatasetNotFoundError, match="SUPERMASK_FX_CACHE") as exc:
            extract_archive(data / "cifar-sample.tar.gz")
        assert str(cache) in str(exc.value) and "tar xzf" in str(exc.value)
    finally:
        os.chmod(cache, 0o755)


def test_archive_in_readonly_dir_goes_to_cache(tmp_path, isolated):
    src = tmp_path / "src"
    make_image_folder(src / "wrapped", ["x", "y"], per_class=1, size=4)
    ro = tmp_path / "ro"
    ro.mkdir()
    with tarfile.open(ro / "cifar-sample.tar.gz", "w:gz") as tf:
        tf.add(src / "wrapped", arcname="wrapped")
    os.chmod(ro, 0o555)
    try:
        out = extract_archive(ro / "cifar-sample.tar.gz")
        assert isolated in out.parents and (out / "wrapped" / "train" / "x" / "0000.png").is_file()
        assert sorted(p.name for p in ro.iterdir()) == ["cifar-sample.tar.gz"]
        assert extract_archive(ro / "cifar-sample.tar.gz") == out
    finally:
        os.chmod(ro, 0o755)


def test_corrupt_archive(tmp_path, isolated):
    bad = tmp_path / "cifar10-jpeg.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar archive" * 100)[:200])
    with pytest.raises(DatasetFormatError, match="cifar10-jpeg.tar.gz"):
        load_dataset("cifar10", root=tmp_path, download=False)


def _write_cifar_batch(path: Path, data, labels, protocol=2):
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "x", "labels": labels, "data": data, "filenames": []}, f, protocol=protocol)


def test_cifar_pickle_layout(tmp_path, isolated):
    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(3)]
        _write_cifar_batch(folder / name, data, labels, protocol=2 if i % 2 else pickle.HIGHEST_PROTOCOL)
        batches.append((data, labels))
    train = load_dataset("cifar10", root=tmp_path, download=False)
    assert train.exact and len(train) == 15
    assert torch.equal(train.images[3], torch.from_numpy(batches[1][0][0]).view(3, 32, 32))
    assert train.targets.tolist() == [label for b in batches[:5] for label in b[1]]
    test = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py", download=False)
    assert test.targets.tolist() == batches[5][1]
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetFormatError, match="data_batch_4"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_pickle_rejects_arbitrary_globals(tmp_path, isolated):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": os.getcwd, "labels": []}, f)  # a pickled function reference
    with pytest.raises(DatasetFormatError, match="not allowed"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


# ------------------------------------------------------------------------------------------ real CIFAR copy


def _slow_selected(config) -> bool:
    expr = config.getoption("-m") or ""
    return "slow" in expr and "not slow" not in expr


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"CIFAR-10 JPEG archive not found at {CIFAR_TAR}")
def test_real_cifar10_jpeg_copy(request, monkeypatch):
    if not _slow_selected(request.config):
        pytest.skip("decodes 60,000 JPEGs; run with -m slow")
    monkeypatch.delenv("SUPERMASK_FX_DATA", raising=False)
    test = load_dataset("cifar10", "test", download=False)
    train = load_dataset("cifar10", "train", download=False)
    assert len(train) == 50000 and len(test) == 10000
    assert train.targets.bincount().tolist() == [5000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert train.display_name == "CIFAR-10 (JPEG copy)" and not train.exact
    z = train.normalize(train.images[::7])  # a stride coprime with 10: the loader interleaves the classes
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def test_optional_dependencies_are_imported_lazily(tmp_path):
    import subprocess

    root = tmp_path / "d"
    make_mnist_like(root)
    code = (
        "import sys, supermask_fx.data, supermask_fx.models\n"
        f"supermask_fx.data.load_dataset('mnist', root={str(root)!r}, download=False)\n"
        "bad = sorted(m for m in ('torchvision', 'PIL', 'datasets') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_image_folder_limit_covers_every_class(tmp_path):
    """Image folders are class-sorted on disk; loading interleaves classes so that limit=N stays balanced."""
    from PIL import Image

    from supermask_fx.data.imagefolder import load_image_folder

    for cls in ("a", "b", "c"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "train" / cls / f"{i:02d}.png")
    split = load_image_folder(tmp_path / "train", cache=False)
    assert split.targets.tolist() == [0, 1, 2] * 4
    assert split.images[:3, 0, 0, 0].tolist() == [0, 0, 0] and split.images[3:6, 0, 0, 0].tolist() == [1, 1, 1]


def test_random_subset_is_seeded_and_spans_the_classes_of_a_sorted_folder():
    """What every --limit of the examples takes: not the first N (in a class-sorted folder, one class)."""
    from supermask_fx.data import random_subset, subset_indices

    info = dataset_info("mnist")
    targets = torch.arange(10).repeat_interleave(50)  # 500 examples, class after class
    images = (
        torch.arange(500, dtype=torch.int64).remainder(256).to(torch.uint8).view(500, 1, 1, 1).expand(-1, 1, 28, 28)
    )
    ds = ImageTensorDataset(images.contiguous(), targets, info, split="train", source="sorted")
    first = random_subset(ds, 40, seed=0)
    assert len(first) == 40 and len(set(first.targets.tolist())) >= 8  # the first 40 would all be class 0
    assert torch.equal(random_subset(ds, 40, seed=0).targets, first.targets)  # the same 40 on every run
    assert not torch.equal(random_subset(ds, 40, seed=1).targets, first.targets)
    assert first.source == "sorted" and first.info is info and first.split == "train"
    keep = subset_indices(500, 40, 0)
    assert torch.equal(first.images, ds.images[keep]) and keep.tolist() == sorted(set(keep.tolist()))
    assert random_subset(ds, None, 0) is ds and random_subset(ds, 500, 0) is ds
    with pytest.raises(ValueError, match="positive"):
        subset_indices(500, 0, 0)
