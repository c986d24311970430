"""Where the training data comes from.

Every data set the monitor can train on is built here, behind one function,
``load_dataset``.  The default, ``"digits"``, ships inside scikit-learn so the
package works offline with real images; CIFAR-10 and CelebA are read from a
local torchvision layout and are never downloaded, so a missing folder fails
loudly with a message that says exactly what to put where.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .checks import is_folder_path

DATASETS: tuple[str, ...] = ("digits", "cifar10", "celeba", "fake")

# Per-channel statistics of the CIFAR-10 training set (the usual published values).
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# CelebA is centred to [-1, 1]; its exact statistics hardly matter for a 32x32 smile classifier.
_CELEBA_MEAN = (0.5, 0.5, 0.5)
_CELEBA_STD = (0.5, 0.5, 0.5)
# Index of the "Smiling" attribute in list_attr_celeba.txt; balanced enough for a binary task.
CELEBA_SMILING_ATTR = 31

_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)
_CIFAR10_LAYOUT = "<data-root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"

_CELEBA_FOLDER = "celeba"
_CELEBA_FILES = (
    "list_attr_celeba.txt",
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)
_CELEBA_LAYOUT = (
    "<data-root>/celeba/{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt, "
    "identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt}"
)


class DataRootError(FileNotFoundError):
    """A data set that needs local files was asked for, but the files are not there.

    A subclass of ``FileNotFoundError`` so callers can treat it as the missing-file
    problem it is, while the CLI can still catch it specifically and print its message.
    """


@dataclass(frozen=True)
class DatasetSplit:
    """A train/test pair plus the facts a model builder needs (classes, input shape)."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


class _SelectAttribute:
    """Pick one binary CelebA attribute as the label.

    A class rather than a lambda so that DataLoader workers can pickle it.
    """

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, attrs: torch.Tensor) -> int:
        return int(attrs[self.index])


def load_dataset(
    name: str,
    *,
    data_root: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    fake_size: int = 256,
) -> DatasetSplit:
    """Build the train/test split for data set ``name``.

    ``seed`` fixes the digits split and the fake images; ``test_fraction`` only
    applies to digits (CIFAR-10 and CelebA come with their own official splits);
    ``fake_size`` is the number of fake training images (the fake test set gets a quarter).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if data_root is not None and not is_folder_path(data_root):  # (5 or b"/data" failed in
        # os.fspath, not naming it)
        raise ValueError(
            "data_root (--data-root) must be a folder path, a str or os.PathLike; "
            f"got {data_root!r}"
        )
    if data_root is not None and name in ("digits", "fake"):
        warnings.warn(
            f"opacus-mi: --data-root {str(data_root)!r} is not read: {name!r} is built in (it "
            "is for --dataset cifar10 or celeba)",
            UserWarning,
            stacklevel=2,
        )
    if name == "digits":
        return _load_digits(seed=seed, test_fraction=test_fraction)
    if name == "cifar10":
        return _load_cifar10(data_root)
    if name == "celeba":
        return _load_celeba(data_root)
    if name == "fake":
        return _load_fake(seed=seed, size=fake_size)
    raise ValueError(
        f"unknown data set {name!r} (argument name / --dataset); "
        f"valid choices: {', '.join(DATASETS)}"
    )


def _load_digits(*, seed: int, test_fraction: float) -> DatasetSplit:
    """scikit-learn's 1,797 real 8x8 digits: small, real, and available offline."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # pixels are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    # Statistics come from the training split only, so the test set never leaks into training.
    mean = float(x_train.mean())
    std = float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
        return TensorDataset(features, torch.from_numpy(np.ascontiguousarray(y)))

    return DatasetSplit(
        train=to_dataset(x_train, y_train),
        test=to_dataset(x_test, y_test),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
    )


def _data_root_message(dataset: str, data_root: str | None, layout: str, problem: str) -> str:
    """One message for every way a local data set can be absent, so users see the same hint."""
    where = "no --data-root was given" if data_root is None else f"--data-root {data_root!r}: "
    return (
        f"data set {dataset!r} is not available ({where}{problem}). Nothing is downloaded: "
        f"pass --data-root pointing at a folder with the torchvision layout {layout}"
    )


def _check_layout(
    dataset: str,
    data_root: str | None,
    folder: str,
    files: tuple[str, ...],
    dirs: tuple[str, ...],
    layout: str,
) -> str:
    """Return the data root if it holds the expected files, else raise ``DataRootError``."""
    if data_root is None:
        raise DataRootError(_data_root_message(dataset, None, layout, ""))
    # (as torchvision reads it: "--data-root=~/data" reaches us with its ~ unexpanded)
    data_root = os.path.expanduser(os.fspath(data_root))
    base = os.path.join(data_root, folder)
    if not os.path.isdir(base):
        missing = [f"folder {folder}/"]
    else:
        missing = [f"{folder}/{f}" for f in files if not os.path.isfile(os.path.join(base, f))]
        missing += [f"{folder}/{d}/" for d in dirs if not os.path.isdir(os.path.join(base, d))]
    if missing:
        problem = f"missing {', '.join(missing)}"
        raise DataRootError(_data_root_message(dataset, data_root, layout, problem))
    return data_root


def _unreadable(err: RuntimeError, dataset_cls, root: str) -> str:
    """What torchvision's failure to load a local data set means, naming the files."""
    if "download=True" not in str(err):  # (its integrity check's wording: we never download)
        return f"torchvision could not read it: {err}"
    failing = _failing_checksums(dataset_cls, root)
    files = ", ".join(failing) if failing else "a file"
    if dataset_cls.base_folder == _CELEBA_FOLDER:
        fix = "download each again (every CelebA text file is its own download)"
    else:
        fix = "extract cifar-10-python.tar.gz again"
    return f"torchvision's checksum of {files} failed: incomplete, or not the official file; {fix}"


def _failing_checksums(dataset_cls, root: str) -> list[str]:
    """The files of a torchvision data set whose MD5 is not the official one (as torchvision
    checks them: CelebA's archives may be deleted once extracted)."""
    from torchvision.datasets.utils import check_integrity

    if hasattr(dataset_cls, "file_list"):  # CelebA: (id, md5, name)
        entries = [
            (n, md5) for _, md5, n in dataset_cls.file_list if not n.endswith((".zip", ".7z"))
        ]
    else:  # CIFAR: [name, md5] lists and the meta file
        meta = dataset_cls.meta
        entries = [*dataset_cls.train_list, *dataset_cls.test_list, (meta["filename"], meta["md5"])]
    base = dataset_cls.base_folder
    return [
        f"{base}/{name}"
        for name, md5 in entries
        if not check_integrity(os.path.join(root, base, name), md5)
    ]


def _load_cifar10(data_root: str | None) -> DatasetSplit:
    """CIFAR-10 from a local torchvision layout, normalised with its usual channel statistics."""
    from torchvision import datasets, transforms

    root = _check_layout("cifar10", data_root, _CIFAR10_FOLDER, _CIFAR10_FILES, (), _CIFAR10_LAYOUT)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(_CIFAR10_MEAN, _CIFAR10_STD)]
    )
    try:
        train = datasets.CIFAR10(root=root, train=True, download=False, transform=transform)
        test = datasets.CIFAR10(root=root, train=False, download=False, transform=transform)
    except RuntimeError as err:  # torchvision: files present but corrupted / wrong checksum
        raise DataRootError(
            _data_root_message(
                "cifar10", root, _CIFAR10_LAYOUT, _unreadable(err, datasets.CIFAR10, root)
            )
        ) from err
    return DatasetSplit(
        train=train, test=test, num_classes=10, input_shape=(3, 32, 32), name="cifar10"
    )


def _load_celeba(data_root: str | None) -> DatasetSplit:
    """CelebA at 32x32 with the binary "Smiling" attribute as the label."""
    from torchvision import datasets, transforms

    root = _check_layout(
        "celeba", data_root, _CELEBA_FOLDER, _CELEBA_FILES, ("img_align_celeba",), _CELEBA_LAYOUT
    )
    transform = transforms.Compose(
        [
            transforms.Resize(32),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(_CELEBA_MEAN, _CELEBA_STD),
        ]
    )
    target_transform = _SelectAttribute(CELEBA_SMILING_ATTR)
    try:
        splits = {
            split: datasets.CelebA(
                root=root,
                split=split,
                target_type="attr",
                download=False,
                transform=transform,
                target_transform=target_transform,
            )
            for split in ("train", "test")
        }
    except RuntimeError as err:  # torchvision: files present but corrupted / wrong checksum
        raise _celeba_error(root, _unreadable(err, datasets.CelebA, root)) from err
    _check_celeba_images(root, splits)
    train, test = (_CelebAImages(splits[split], root) for split in ("train", "test"))
    for split in (train, test):  # (present but unreadable: said with the file and the fix)
        if len(split):
            split[0]
    return DatasetSplit(
        train=train,
        test=test,
        num_classes=2,
        input_shape=(3, 32, 32),
        name="celeba",
    )


def _celeba_error(root: str, problem: str) -> DataRootError:
    return DataRootError(_data_root_message("celeba", root, _CELEBA_LAYOUT, problem))


def _check_celeba_images(root: str, splits: dict) -> None:
    """Every image the splits name is in img_align_celeba/: the images are read lazily, so a
    partly extracted folder failed mid-run (after --out was cleared) with a bare
    file-not-found. One listing of the folder (~200k names, well under a second)."""
    folder = os.path.join(root, _CELEBA_FOLDER, "img_align_celeba")
    listed = os.listdir(folder)
    present = set(listed)
    names = [name for split in splits.values() for name in split.filename]
    missing = [name for name in names if name not in present]
    if missing:
        if not listed:
            problem = "img_align_celeba/ is empty: extract img_align_celeba.zip into it"
        elif not (present & set(names)) and any(
            os.path.isdir(os.path.join(folder, f)) for f in listed
        ):
            problem = (
                "img_align_celeba/ holds a folder, not the images: they must sit directly in "
                "img_align_celeba/ (an archive unzipped one level deeper)"
            )
        else:
            problem = (
                f"{len(missing):,} of the {len(names):,} images the partitions name are not in "
                f"img_align_celeba/ (e.g. {', '.join(missing[:3])}): its extraction is "
                "incomplete; extract img_align_celeba.zip again"
            )
        raise _celeba_error(root, problem)


def _unreadable_image(name: str, err: OSError) -> str:
    return (
        f"cannot read {_CELEBA_FOLDER}/img_align_celeba/{name} ({type(err).__name__}: {err}): "
        "the file is damaged; extract img_align_celeba.zip again"
    )


class _CelebAImages(Dataset):
    """A CelebA split whose unreadable image (damaged on disk, found only when read) stops
    training with the file named and the fix, not a bare OSError."""

    def __init__(self, split, root: str):
        self.split, self.root = split, root

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            return self.split[index]
        except OSError as err:
            name = self.split.filename[index]
            raise _celeba_error(self.root, _unreadable_image(name, err)) from err


def _load_fake(*, seed: int, size: int) -> DatasetSplit:
    """Random 3x32x32 images with random labels: a stand-in for CLI tests, nothing to learn."""
    from torchvision import datasets, transforms

    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(
            f"fake_size must be an integer of at least 4 (the test split gets a quarter), got "
            f"{size!r}"
        )
    to_tensor = transforms.ToTensor()
    # FakeData seeds image i with i + random_offset; offsetting the test set by the train
    # size keeps the two sets disjoint.
    train = datasets.FakeData(
        size=size, image_size=(3, 32, 32), num_classes=10, transform=to_tensor, random_offset=seed
    )
    test = datasets.FakeData(
        size=size // 4,
        image_size=(3, 32, 32),
        num_classes=10,
        transform=to_tensor,
        random_offset=seed + size,
    )
    return DatasetSplit(
        train=train, test=test, num_classes=10, input_shape=(3, 32, 32), name="fake"
    )
