"""Training augmentation policies, described once for both data pipelines (PIL and tensor).

Why a policy and not a fixed recipe: the seed's recipe (RandomResizedCrop scale 0.8-1 -> RandomRotation 15
-> flip) suits images upsampled to 224 px, but at native 28 px it costs a small network several points of
accuracy in a short run (FashionCNN, 5 epochs at 28 px on Fashion-MNIST, lr 1e-3: 0.879 with the seed recipe,
0.900 and 0.909 in two runs with flips only). `auto` therefore keeps the seed's recipe above 64 px and uses `light` at native sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from utils.errors import InputError

NATIVE_SIZE_LIMIT = 64  # --augment auto: light at img_size <= this, seed above (same limit as the small-input stem)
AUTO_AUGMENT_CHOICES = ("none", "ra", "ta_wide", "augmix", "autoaugment")  # the names torchvision's reference uses


@dataclass(frozen=True)
class Augment:
    """One training augmentation policy.

    crop_scale: RandomResizedCrop area range, or None for no random crop (resize the shorter side, as eval).
    rotation:   maximum rotation in degrees (uniform in [-rotation, rotation]); 0 = none.
    flip:       horizontal flip probability.
    erasing:    RandomErasing probability (timm's --reprob), applied after normalisation; 0 = none.
    crop_padding: CIFAR-style translation: pad the crop by this many black pixels, then crop img_size at a random
                offset (RandomCrop(img_size, padding=P)); 0 = none.
    auto_augment: a torchvision policy applied to each image after the geometry (none, ra = RandAugment, ta_wide =
                TrivialAugmentWide, augmix = AugMix, autoaugment = AutoAugment's ImageNet policy).
    """

    name: str
    crop_scale: tuple[float, float] | None
    rotation: float
    flip: float
    erasing: float = 0.0
    crop_padding: int = 0
    auto_augment: str = "none"

    def describe(self) -> str:
        parts = []
        if self.crop_scale:
            parts.append(f"RandomResizedCrop(scale {self.crop_scale[0]:g}-{self.crop_scale[1]:g})")
        if self.rotation:
            parts.append(f"RandomRotation({self.rotation:g})")
        if self.flip:
            parts.append(f"HorizontalFlip(p={self.flip:g})")
        if self.crop_padding:
            parts.append(f"RandomCrop(padding={self.crop_padding})")
        if self.auto_augment != "none":
            parts.append(f"{type(auto_augment_policy(self.auto_augment)).__name__}")
        if self.erasing:
            parts.append(f"RandomErasing(p={self.erasing:g})")
        return f"{self.name}: " + (" -> ".join(parts) if parts else "no augmentation")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Augment:
        """From a checkpoint's "augment" entry (older checkpoints lack the newer fields: their defaults apply)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("crop_scale") is not None:
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)


POLICIES = {
    "seed": Augment("seed", (0.8, 1.0), 15.0, 0.5),
    "light": Augment("light", None, 0.0, 0.5),
    "none": Augment("none", None, 0.0, 0.0),
}
AUGMENT_CHOICES = ("auto", *POLICIES)


def resolve_augment(name: str, img_size: int, erasing: float = 0.0, crop_padding: int = 0,
                    auto_augment: str = "none") -> Augment:
    """The policy for --augment NAME (auto: seed above NATIVE_SIZE_LIMIT px, light at or below) plus --random_erasing,
    --random_crop_padding and --auto_augment."""
    if name == "auto":
        name = "seed" if img_size > NATIVE_SIZE_LIMIT else "light"
    if name not in POLICIES:
        raise InputError(f"unknown --augment {name!r}: choose from {', '.join(AUGMENT_CHOICES)}")
    if not 0.0 <= erasing <= 1.0:
        raise InputError(f"--random_erasing is a probability in [0, 1], got {erasing}")
    if crop_padding < 0 or crop_padding >= img_size:
        raise InputError(f"--random_crop_padding must be in [0, img_size), got {crop_padding} for --img_size {img_size}")
    if auto_augment not in AUTO_AUGMENT_CHOICES:
        raise InputError(f"unknown --auto_augment {auto_augment!r}: choose from {', '.join(AUTO_AUGMENT_CHOICES)}")
    base = POLICIES[name]
    return Augment(base.name, base.crop_scale, base.rotation, base.flip, erasing, crop_padding, auto_augment)


def auto_augment_policy(name: str):
    """torchvision.transforms.v2's policy for --auto_augment NAME (bilinear, black fill): the same object serves PIL
    images (per image in DataLoader workers) and uint8 tensors (per image in the tensor pipeline)."""
    from torchvision.transforms import v2

    bilinear = v2.InterpolationMode.BILINEAR
    policies: dict[str, Callable] = {
        "ra": lambda: v2.RandAugment(interpolation=bilinear),
        "ta_wide": lambda: v2.TrivialAugmentWide(interpolation=bilinear),
        "augmix": lambda: v2.AugMix(interpolation=bilinear),
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear),
    }
    if name not in policies:
        raise InputError(f"unknown --auto_augment {name!r}: choose from {', '.join(AUTO_AUGMENT_CHOICES)}")
    return policies[name]()


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """--mixup_alpha / --cutmix_alpha as one transform of (images, int targets) batches -> (mixed images, soft targets)
    (torchvision.transforms.v2.MixUp / CutMix; one of the two at random per batch when both are on), or None."""
    from torchvision.transforms import v2

    for flag, alpha in (("--mixup_alpha", mixup_alpha), ("--cutmix_alpha", cutmix_alpha)):
        if alpha < 0:
            raise InputError(f"{flag} must be >= 0 (0 = off), got {alpha}")
    mixers = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
             ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
