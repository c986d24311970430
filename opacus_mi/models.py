"""Small models that Opacus can train with per-sample gradients.

Opacus needs per-sample gradients, which BatchNorm destroys (it mixes samples in a
batch), so every model here uses GroupNorm or no normalisation at all and passes
``ModuleValidator.validate(model, strict=True)``.  Models draw their initial
weights from the global torch RNG; callers seed it, nothing here does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

MODELS: tuple[str, ...] = ("auto", "cnn", "mlp", "resnet18")

_DIGITS_SHAPE = (1, 8, 8)


class DigitsCNN(nn.Sequential):
    """About 10k parameters for scikit-learn's 1x8x8 digits: big enough to memorise, fast on CPU."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),  # 8x8 -> 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, num_classes),
        )


class SmallCNN(nn.Sequential):
    """Two GroupNorm conv blocks and a linear head for small RGB images (32x32 CIFAR/CelebA).

    With 32x32 inputs and 10 classes it has about 60k parameters, small enough that
    DP-SGD on CPU stays quick.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height < 4 or width < 4:
            raise ValueError(
                f"image_size must be at least 4x4 (two 2x2 poolings), got {image_size}"
            )
        super().__init__(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 2 // 2) * (width // 2 // 2), num_classes),
        )


class MLP(nn.Sequential):
    """A plain fully connected baseline: flattens any input, then ReLU hidden layers."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64)
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def resnet18_groupnorm(num_classes: int = 10, *, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with BatchNorm swapped for GroupNorm by Opacus' own fixer.

    A large model for GPU runs; ``in_channels`` other than 3 replaces the first conv.
    """
    from opacus.validators import ModuleValidator
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model = ModuleValidator.fix(model)
    # torchvision modifies layer outputs in place (ReLU(inplace=True), out += identity); the full
    # backward hooks Opacus puts on every trainable layer forbid that ("Output 0 of
    # BackwardHookFunction is a view and is being modified inplace"). Same layers, out of place.
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if type(m) is BasicBlock:
            # (a class, not a bound method on each block: that pickled as a lookup of
            # "_basic_block_forward" on BasicBlock, so torch.save(model) could not be loaded)
            m.__class__ = __getattr__("_OutOfPlaceBasicBlock")
    return model


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock.forward`` with ``out + identity`` instead of ``+=``."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """``_OutOfPlaceBasicBlock``: torchvision's ``BasicBlock`` with ``_basic_block_forward``,
    made on first use (importing this module does not import torchvision) and found here by
    pickle when a saved ResNet-18 is loaded."""
    if name != "_OutOfPlaceBasicBlock":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _LAZY:
        from torchvision.models.resnet import BasicBlock

        _LAZY[name] = type(name, (BasicBlock,), {"forward": _basic_block_forward})
        _LAZY[name].__module__ = __name__
    return _LAZY[name]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of shape (C, H, W) and ``num_classes`` logits.

    ``"auto"`` picks DigitsCNN for 1x8x8 digits and SmallCNN for anything else.
    """
    shape = tuple(int(d) for d in input_shape)
    if name == "auto":
        if shape == _DIGITS_SHAPE:
            return DigitsCNN(num_classes)
        name = "cnn"
    if name == "mlp":
        return MLP(math.prod(shape), num_classes)
    if name in ("cnn", "resnet18"):
        if len(shape) != 3:
            raise ValueError(f"model {name!r} needs an input_shape of (C, H, W), got {shape}")
        channels, height, width = shape
        if name == "cnn":
            return SmallCNN(channels, num_classes, (height, width))
        return resnet18_groupnorm(num_classes, in_channels=channels)
    raise ValueError(
        f"unknown model {name!r} (argument model / --model); valid choices: {', '.join(MODELS)}"
    )
