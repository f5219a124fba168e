"""Static metadata of the supported image data sets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASET_NAMES", "DatasetInfo", "canonical_name", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of an image classification data set.

    Attributes:
        name: canonical name (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``).
        num_classes: number of classes.
        channels: image channels (1 or 3).
        image_size: image height = width in pixels.
        mean: per-channel mean of the training images in [0, 1] (used for normalisation).
        std: per-channel standard deviation of the training images in [0, 1].
        classes: class names, index = label.
        display_name: human-readable name for reports.
        train_size: number of training images in the full split.
        test_size: number of test images in the full split.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    display_name: str = ""
    train_size: int = 0
    test_size: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)


_INFOS = {
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        classes=tuple(str(i) for i in range(10)),
        display_name="MNIST",
        train_size=60000,
        test_size=10000,
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        display_name="Fashion-MNIST",
        train_size=60000,
        test_size=10000,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        display_name="CIFAR-10",
        train_size=50000,
        test_size=10000,
    ),
}

#: Canonical names accepted by :func:`dataset_info` and :func:`supermask_fx.data.load_dataset`.
DATASET_NAMES: tuple[str, ...] = tuple(_INFOS)

_ALIASES = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
}


def canonical_name(name: str) -> str:
    """Normalise a data set name (case, ``-`` vs ``_``, a few aliases); ``ValueError`` if unknown."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _INFOS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Metadata (classes, channels, image size, normalisation mean/std, ...) of data set ``name``."""
    return _INFOS[canonical_name(name)]
