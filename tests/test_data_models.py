"""Data sets and DP-ready models: real shapes, real splits, real Opacus steps."""

from __future__ import annotations

import os
import re

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from opacus_mi.data import DATASETS, DataRootError, DatasetSplit, load_dataset
from opacus_mi.models import (
    MLP,
    MODELS,
    DigitsCNN,
    SmallCNN,
    build_model,
    resnet18_groupnorm,
)


@pytest.fixture(scope="module")
def digits() -> DatasetSplit:
    return load_dataset("digits")


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.tensors[0], ds.tensors[1]


# --------------------------------------------------------------------------- data


def test_constants() -> None:
    assert DATASETS == ("digits", "cifar10", "celeba", "fake")
    assert MODELS == ("auto", "cnn", "mlp", "resnet18")


def test_digits_split_sizes_shapes_and_classes(digits: DatasetSplit) -> None:
    x_train, y_train = _tensors(digits.train)
    x_test, y_test = _tensors(digits.test)
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=1)
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert x_train.shape[1:] == (1, 8, 8) and x_test.shape[1:] == (1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10))
    assert set(y_test.tolist()) == set(range(10))
    # Stratified: each class's share of the test set is close to its share overall.
    y_all = torch.cat([y_train, y_test])
    for c in range(10):
        share_all = (y_all == c).float().mean().item()
        share_test = (y_test == c).float().mean().item()
        assert abs(share_all - share_test) < 0.01


def test_digits_normalised_with_train_statistics(digits: DatasetSplit) -> None:
    x_train, _ = _tensors(digits.train)
    x_test, _ = _tensors(digits.test)
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # The test split uses the train statistics, so it is close to but not exactly standardised.
    assert abs(x_test.mean().item()) < 0.1
    assert x_test.mean().item() != pytest.approx(0.0, abs=1e-6)


def test_digits_split_is_deterministic_per_seed(digits: DatasetSplit) -> None:
    again = load_dataset("digits", seed=0)
    for a, b in zip(_tensors(digits.train), _tensors(again.train), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_tensors(digits.test), _tensors(again.test), strict=True):
        assert torch.equal(a, b)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(_tensors(digits.test)[0], _tensors(other.test)[0])


def test_digits_test_fraction() -> None:
    split = load_dataset("digits", test_fraction=0.5)
    assert abs(len(split.train) - len(split.test)) <= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=fraction)


def test_unknown_dataset_names_argument_and_choices() -> None:
    with pytest.raises(ValueError, match="--dataset") as info:
        load_dataset("mnist")
    for choice in DATASETS:
        assert choice in str(info.value)


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("celeba", "celeba")]
)
def test_missing_data_root(name: str, folder: str, tmp_path) -> None:
    for root in (None, str(tmp_path)):
        with pytest.raises(DataRootError) as info:
            load_dataset(name, data_root=root)
        message = str(info.value)
        assert "--data-root" in message
        assert folder in message
        assert isinstance(info.value, FileNotFoundError)
    # (not a path: os.fspath's bare TypeError named neither data_root nor what it takes)
    for bad in (5, b"/data", "  ", ["/data"]):
        with pytest.raises(ValueError, match=r"data_root \(--data-root\) must be a folder path"):
            load_dataset(name, data_root=bad)


def test_incomplete_cifar10_names_missing_file(tmp_path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataRootError, match="data_batch_2"):
        load_dataset("cifar10", data_root=str(tmp_path))


def test_incomplete_celeba_names_missing_images(tmp_path) -> None:
    base = tmp_path / "celeba"
    base.mkdir()
    for f in (
        "list_attr_celeba.txt",
        "list_eval_partition.txt",
        "identity_CelebA.txt",
        "list_bbox_celeba.txt",
        "list_landmarks_align_celeba.txt",
    ):
        (base / f).write_text("")
    # (named as missing, not only in the layout every such message quotes)
    with pytest.raises(DataRootError, match=r"missing celeba/img_align_celeba/\)"):
        load_dataset("celeba", data_root=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "folder", "files", "dirs"),
    [
        (
            "cifar10",
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
            [],
        ),
        (
            "celeba",
            "celeba",
            [
                "list_attr_celeba.txt",
                "list_eval_partition.txt",
                "identity_CelebA.txt",
                "list_bbox_celeba.txt",
                "list_landmarks_align_celeba.txt",
            ],
            ["img_align_celeba"],
        ),
    ],
)
def test_corrupt_files_become_data_root_error(name, folder, files, dirs, tmp_path) -> None:
    """Files present but wrong: torchvision's RuntimeError is re-raised as our error."""
    base = tmp_path / folder
    base.mkdir()
    for f in files:
        (base / f).write_bytes(b"not the real file")
    for d in dirs:
        (base / d).mkdir()
    with pytest.raises(DataRootError, match="--data-root") as info:
        load_dataset(name, data_root=str(tmp_path))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_fake_dataset_shapes_and_determinism() -> None:
    split = load_dataset("fake", fake_size=16, seed=3)
    assert len(split.train) == 16 and len(split.test) == 4
    assert split.input_shape == (3, 32, 32) and split.num_classes == 10
    x, y = split.train[0]
    assert tuple(x.shape) == split.input_shape and x.dtype == torch.float32
    assert 0 <= int(y) < 10
    x_test, _ = split.test[0]
    assert not torch.equal(x, x_test)
    again = load_dataset("fake", fake_size=16, seed=3)
    assert torch.equal(again.train[0][0], x)
    xb, yb = next(iter(DataLoader(split.train, batch_size=8)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64


# ------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("model", "shape", "classes"),
    [
        (lambda: DigitsCNN(10), (1, 8, 8), 10),
        (lambda: SmallCNN(3, 10, 32), (3, 32, 32), 10),
        (lambda: SmallCNN(3, 2, (32, 32)), (3, 32, 32), 2),
        (lambda: MLP(64, 10), (1, 8, 8), 10),
        (lambda: MLP(3 * 32 * 32, 7, hidden=(32,)), (3, 32, 32), 7),
        (lambda: resnet18_groupnorm(10), (3, 32, 32), 10),
    ],
    ids=["digits_cnn", "small_cnn", "small_cnn_2", "mlp", "mlp_1hidden", "resnet18"],
)
def test_models_are_dp_ready_and_emit_logits(model, shape, classes) -> None:
    torch.manual_seed(0)
    net = model()
    assert ModuleValidator.validate(net, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, classes)


def test_digits_cnn_parameter_count() -> None:
    n = sum(p.numel() for p in DigitsCNN(10).parameters())
    assert 8_000 <= n <= 12_000


def test_small_cnn_parameter_count() -> None:
    assert sum(p.numel() for p in SmallCNN(3, 10, 32).parameters()) < 100_000


@pytest.mark.parametrize(
    ("name", "shape", "classes", "kind"),
    [
        ("auto", (1, 8, 8), 10, DigitsCNN),
        ("auto", (3, 32, 32), 10, SmallCNN),
        ("cnn", (3, 32, 32), 2, SmallCNN),
        ("cnn", (1, 8, 8), 10, SmallCNN),
        ("mlp", (1, 8, 8), 10, MLP),
        ("mlp", (3, 32, 32), 10, MLP),
    ],
)
def test_build_model(name, shape, classes, kind) -> None:
    net = build_model(name, shape, classes)
    assert isinstance(net, kind)
    assert ModuleValidator.validate(net, strict=True) == []
    with torch.no_grad():
        assert net(torch.randn(3, *shape)).shape == (3, classes)


def test_build_model_resnet18_single_channel() -> None:
    net = build_model("resnet18", (1, 8, 8), 10)
    assert ModuleValidator.validate(net, strict=True) == []
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_auto_picks_the_digits_cnn_for_digits_shape_only_and_cnns_need_three_dims() -> None:
    """DigitsCNN is sized for 1x8x8 digits: any other one-channel image gets SmallCNN. An input
    shape of another rank than (C, H, W) is refused naming input_shape, a batch dimension too."""
    assert isinstance(build_model("auto", (1, 28, 28), 10), SmallCNN)
    for name in ("cnn", "resnet18"):
        for shape in ((1, 3, 8, 8), (64,)):
            with pytest.raises(ValueError, match=r"needs an input_shape of \(C, H, W\)"):
                build_model(name, shape, 10)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="model") as info:
        build_model("vit", (1, 8, 8), 10)
    for choice in MODELS:
        assert choice in str(info.value)


def test_models_follow_global_rng() -> None:
    torch.manual_seed(123)
    a = build_model("auto", (1, 8, 8), 10).state_dict()
    torch.manual_seed(123)
    b = build_model("auto", (1, 8, 8), 10).state_dict()
    c = build_model("auto", (1, 8, 8), 10).state_dict()  # RNG moved on: different weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# -------------------------------------------------------------------------- opacus


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_one_private_step_on_digits(digits: DatasetSplit) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(digits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(digits.train, batch_size=64, shuffle=True)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad_sample is not None for p in model.parameters())
    optimizer.step()
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert torch.isfinite(loss)
    assert engine.get_epsilon(delta=1e-5) > 0


def test_failed_load_creates_nothing(tmp_path) -> None:
    """A failed load must not create anything under the data root (nothing is downloaded)."""
    with pytest.raises(DataRootError):
        load_dataset("cifar10", data_root=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_resnet18_groupnorm_trains_one_dp_step_with_hooks() -> None:
    """torchvision's in-place ReLU/add break Opacus's backward hooks unless made out of place."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = resnet18_groupnorm(10)
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad_sample.shape[0] == 2 for p in model.parameters() if p.requires_grad)
    opt.step()


def _tiny_celeba(root, *, nested: bool = False, n: int = 6) -> None:
    """CelebA's torchvision layout with ``n`` random 218x178 images (split 0/1/2 by index)."""
    import numpy as np
    from PIL import Image

    base = root / "celeba"
    images = base / "img_align_celeba"
    (images / "img_align_celeba" if nested else images).mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save((images / "img_align_celeba" if nested else images) / name)
    attrs = " ".join(f"a{i}" for i in range(40))
    rows = "".join(f"{name} " + " ".join(["1"] * 40) + "\n" for name in names)
    (base / "list_attr_celeba.txt").write_text(f"{n}\n{attrs}\n{rows}")
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{name} {0 if i < n - 2 else 2}\n" for i, name in enumerate(names))
    )
    (base / "identity_CelebA.txt").write_text("".join(f"{name} 1\n" for name in names))
    (base / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{m} 1 1 2 2\n" for m in names)
    )
    marks = " ".join(f"p{i}" for i in range(10))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{marks}\n" + "".join(f"{m} " + " ".join(["1"] * 10) + "\n" for m in names)
    )


@pytest.mark.parametrize(
    "problem, says",
    [
        ("none", None),
        ("nested", "img_align_celeba/ holds a folder, not the images: they must sit directly"),
        ("corrupt", "cannot read celeba/img_align_celeba/000001.jpg (UnidentifiedImageError"),
        # (the zip not extracted yet: the advice was the nested folder's)
        ("empty", "img_align_celeba/ is empty: extract img_align_celeba.zip into it"),
        # (a partial extraction passed, cleared --out and failed mid-run on a bare path error)
        (
            "partial",
            "2 of the 6 images the partitions name are not in img_align_celeba/ "
            "(e.g. 000003.jpg, 000005.jpg): its extraction is incomplete",
        ),
    ],
)
def test_celeba_images_are_checked_when_loading_not_mid_run(problem, says, tmp_path, monkeypatch):
    """Images unzipped one folder too deep (or unreadable, or missing) passed the layout check
    and failed at a batch with a bare path error naming neither --data-root nor the fix."""
    import torchvision.datasets.celeba as tv_celeba

    monkeypatch.setattr(tv_celeba, "check_integrity", lambda *a, **k: True)  # tiny stand-ins
    _tiny_celeba(tmp_path, nested=problem == "nested")
    images = tmp_path / "celeba" / "img_align_celeba"
    if problem == "corrupt":
        (images / "000001.jpg").write_bytes(b"not a jpeg")
    elif problem == "empty":
        for f in images.iterdir():
            f.unlink()
    elif problem == "partial":
        (images / "000003.jpg").unlink()
        (images / "000005.jpg").unlink()
    if problem == "none":
        split = load_dataset("celeba", data_root=str(tmp_path))
        assert len(split.train) == 4 and len(split.test) == 2
        x, y = split.train[0]
        assert tuple(x.shape) == (3, 32, 32) and int(y) == 1
        return
    with pytest.raises(DataRootError, match=re.escape(says)) as info:
        load_dataset("celeba", data_root=str(tmp_path))
    assert "--data-root" in str(info.value)


def test_a_celeba_image_damaged_past_the_first_is_named_when_read(tmp_path, monkeypatch):
    """Damage only found by reading it (a truncated JPEG) stops training with the file and the
    fix named, not a bare 'cannot identify image file'."""
    import torchvision.datasets.celeba as tv_celeba

    monkeypatch.setattr(tv_celeba, "check_integrity", lambda *a, **k: True)
    _tiny_celeba(tmp_path)
    (tmp_path / "celeba" / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8 cut")
    split = load_dataset("celeba", data_root=str(tmp_path))
    with pytest.raises(DataRootError, match=r"cannot read celeba/img_align_celeba/000003.jpg"):
        next(iter(torch.utils.data.DataLoader(split.train, batch_size=4)))


def test_a_failed_checksum_names_the_files_and_the_fix_rather_than_a_download(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / f).write_bytes(b"not the real file")
    with pytest.raises(
        DataRootError, match="checksum of cifar-10-batches-py/data_batch_1, "
    ) as info:
        load_dataset("cifar10", data_root=str(tmp_path))
    assert "download=True" not in str(info.value)
    assert "; extract cifar-10-python.tar.gz again" in str(info.value)
    # CelebA's text files are separate downloads, not an archive's: each failing one is named.
    _tiny_celeba(tmp_path)
    with pytest.raises(DataRootError) as info:
        load_dataset("celeba", data_root=str(tmp_path))
    said = str(info.value)
    for name in ("list_attr_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt"):
        assert f"celeba/{name}" in said
    assert "img_align_celeba.zip" not in said  # (an archive may be deleted once extracted)
    assert "download each again (every CelebA text file is its own download)" in said


@pytest.mark.parametrize("name", ["digits", "fake"])
def test_a_data_root_for_a_built_in_dataset_is_warned_about(name, tmp_path) -> None:
    """--dataset digits --data-root /some/cifar ran digits without a word."""
    with pytest.warns(UserWarning, match=rf"--data-root .* is not read: '{name}' is built in"):
        load_dataset(name, data_root=str(tmp_path))


def test_a_data_root_with_a_tilde_is_read_as_torchvision_reads_it(tmp_path, monkeypatch):
    """ "--data-root=~/data" reaches the program with its ~ unexpanded: the layout check said
    the folder was missing where torchvision would have read it (the home directory's)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / f).write_bytes(b"not the real file")
    # past the layout check: torchvision itself now reads the files (and its checksum fails)
    with pytest.raises(DataRootError, match="checksum of cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", data_root="~")


@pytest.mark.parametrize("size", [4.5, "8", True, 3, 0])
def test_a_fake_size_that_is_no_integer_is_named(size):
    """Below 4 the test split (a quarter) would hold no example."""
    with pytest.raises(ValueError, match="fake_size must be an integer of at least 4"):
        load_dataset("fake", fake_size=size)
    assert len(load_dataset("fake", fake_size=4).test) == 1


# The header of CelebA's list_attr_celeba.txt, as published with the data set.
_CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()


def test_the_celeba_label_is_the_smiling_attribute(tmp_path, monkeypatch):
    """The label is the "Smiling" column of the official header (torchvision's -1 read as 0),
    not a neighbour: a CelebA whose only varying attribute is Smiling, read through
    torchvision's own parser."""
    import torchvision.datasets.celeba as tv_celeba

    assert len(_CELEBA_ATTRIBUTES) == 40
    monkeypatch.setattr(tv_celeba, "check_integrity", lambda *a, **k: True)  # tiny stand-ins
    _tiny_celeba(tmp_path)
    names = [f"{i + 1:06d}.jpg" for i in range(6)]
    smiling = [1, -1, -1, 1, 1, -1]
    rows = "".join(
        f"{name} "
        + " ".join(str(smile if a == "Smiling" else -1) for a in _CELEBA_ATTRIBUTES)
        + "\n"
        for name, smile in zip(names, smiling, strict=True)
    )
    header = " ".join(_CELEBA_ATTRIBUTES)
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text(f"6\n{header}\n{rows}")
    split = load_dataset("celeba", data_root=str(tmp_path))
    labels = [int(split.train[i][1]) for i in range(len(split.train))]
    labels += [int(split.test[i][1]) for i in range(len(split.test))]
    assert labels == [(v + 1) // 2 for v in smiling]


def test_a_saved_resnet18_loads_back_and_computes_the_same(tmp_path):
    """Each block's out-of-place forward was a bound method, which pickled as a lookup of
    '_basic_block_forward' on torchvision's BasicBlock: torch.save(model) wrote a file that
    torch.load could not read."""
    from opacus_mi.models import resnet18_groupnorm

    torch.manual_seed(0)
    model = resnet18_groupnorm(10).eval()
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))
