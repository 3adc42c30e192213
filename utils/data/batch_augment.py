"""The train augmentation as batched tensor maths: per-sample random parameters (crop box, angle, flip, padding shift,
erased box), their affine matrices and sampling grid, and `augment_batch` (ONE grid_sample call for a batch of B
images); `normalize_batch` for eval batches.

Each sample's affine matrix composes the train recipe of `utils.data.datasets.build_transform` for the chosen
`utils.data.augment.Augment` policy (the seed's: RandomResizedCrop(resize, scale 0.8-1, ratio 3/4-4/3) ->
RandomRotation(15) -> RandomHorizontalFlip -> CenterCrop(img_size) -> Normalize; without a random crop the box is
the image's central square, which equals Resize(shorter side) -> CenterCrop).
The crop, angle, flip and erased box are drawn from the same distributions as torchvision's (same rejection
sampling), from torch's global RNG, which train.py seeds per epoch, so resumed runs repeat exactly. Pixels
rotated in from outside the crop are black (0), as PIL's rotate fills them. The one difference: a single
bilinear resampling instead of PIL's bilinear resize followed by a nearest-neighbour rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.data.augment import Augment, auto_augment_policy, resolve_augment
from utils.data.preprocess import Preprocess, scale_and_normalize

CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults
ERASE_RATIO = (0.3, 3.3)
SEED_AUGMENT = resolve_augment("seed", 224)


# ----------------------------------------------------------------------------- random parameters


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters, float64 on the CPU: crop box (top i, left j, height h, width w
    in source pixels), rotation angle in degrees (counter-clockwise, as PIL), horizontal flip, and the
    erased box in output pixels ((n, 4): top, left, height, width; height 0 = nothing erased), and the top-left corner
    of the img_size window in the crop padded by `crop_padding` ((n, 2) integers in [0, 2 * padding])."""

    i: torch.Tensor
    j: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    erase: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    padding: int = 0

    def __len__(self) -> int:
        return len(self.angle)


def _candidate_sides(n: int, area: int, scale, ratio, attempts: int,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, attempts) candidate box sides round(sqrt(a * r)), round(sqrt(a / r)) for areas a = area * U(scale) and
    log-uniform aspect ratios r, drawn in torchvision's order (all areas, then all ratios)."""
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                        generator=generator)
    aspect = torch.exp(log_ratio)
    return torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))


def _first_accepted(ok: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each row's value at its first accepted attempt (rows with none accepted: attempt 0, handled by the caller)."""
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    return tuple(v.gather(1, first).squeeze(1) for v in values)


def sample_crop_boxes(n: int, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO, attempts: int = 10,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop.get_params for n samples at once: the same 10-attempt rejection sampling and fallback."""
    w, h = _candidate_sides(n, height * width, scale, ratio, attempts, generator)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    w, h = _first_accepted(ok, w, h)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    i = torch.floor(u[:, 0] * (height - h + 1))
    j = torch.floor(u[:, 1] * (width - w + 1))
    # torchvision's fallback after 10 rejections: the central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    accepted = ok.any(1)
    i = torch.where(accepted, i, torch.full_like(i, (height - fh) // 2))
    j = torch.where(accepted, j, torch.full_like(j, (width - fw) // 2))
    h = torch.where(accepted, h, torch.full_like(h, fh))
    w = torch.where(accepted, w, torch.full_like(w, fw))
    return i, j, h, w


def sample_erase_boxes(n: int, size: int, probability: float, scale=ERASE_SCALE, ratio=ERASE_RATIO, attempts: int = 10,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomErasing.get_params for n size x size images: (n, 4) boxes (top, left, height, width), height 0 when
    the coin says no or, as in torchvision, none of the 10 attempts fits."""
    h, w = _candidate_sides(n, size * size, scale, ratio, attempts, generator)  # RandomErasing: h = sqrt(area * r)
    ok = (h < size) & (w < size)
    h, w = _first_accepted(ok, h, w)
    u = torch.rand(n, 3, dtype=torch.float64, generator=generator)
    chosen = ok.any(1) & (u[:, 2] < probability)
    i, j = torch.floor(u[:, 0] * (size - h + 1)), torch.floor(u[:, 1] * (size - w + 1))
    zero = torch.zeros_like(h)
    return torch.stack([torch.where(chosen, i, zero), torch.where(chosen, j, zero),
                        torch.where(chosen, h, zero), torch.where(chosen, w, zero)], 1)


def sample_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                  augment: Augment = SEED_AUGMENT, out_size: int | None = None) -> AugmentParams:
    """Draw the policy's crop boxes, angles, flips (and erased boxes in out_size x out_size outputs) for n images
    of height x width, from torch's global RNG by default."""
    if augment.crop_scale:
        i, j, h, w = sample_crop_boxes(n, height, width, scale=augment.crop_scale, generator=generator)
    else:  # no random crop: the central square, i.e. Resize(shorter side) -> CenterCrop
        side = min(height, width)
        i = torch.full((n,), float((height - side) // 2), dtype=torch.float64)
        j = torch.full((n,), float((width - side) // 2), dtype=torch.float64)
        h = w = torch.full((n,), float(side), dtype=torch.float64)
    angle = torch.zeros(n, dtype=torch.float64)
    if augment.rotation:
        angle.uniform_(-augment.rotation, augment.rotation, generator=generator)
    flip = torch.rand(n, dtype=torch.float64, generator=generator) < augment.flip
    shift = None
    if augment.crop_padding:  # RandomCrop(size, padding=P): a uniform window corner in the padded image, per image
        shift = torch.randint(0, 2 * augment.crop_padding + 1, (n, 2), generator=generator)
    erase = None
    if augment.erasing:
        if out_size is None:
            raise ValueError("random erasing needs out_size")
        erase = sample_erase_boxes(n, out_size, augment.erasing, generator=generator)
    return AugmentParams(i, j, h, w, angle, flip, erase, shift, augment.crop_padding)


# ----------------------------------------------------------------------------- geometry


def _translate(tx: torch.Tensor | float, ty: torch.Tensor | float, n: int) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _scale(sx: float, sy: float, n: int) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def canvas_matrices(params: AugmentParams, resize: int, out_size: int) -> torch.Tensor:
    """(B, 3, 3) maps from output coordinates to the resized crop ("canvas") before rotation and flip.

    Both sides are normalised as affine_grid's align_corners=False (-1 and 1 are the outer pixel edges).
    Working backwards from an output pixel: undo the centre crop (shift), undo the flip (mirror in x),
    undo the rotation about the canvas centre.
    """
    n, r, s = len(params), float(resize), float(out_size)
    offset = float(int(round((resize - out_size) / 2.0)))  # CenterCrop's top/left
    out_to_pixels = _translate(s / 2, s / 2, n) @ _scale(s / 2, s / 2, n)
    uncrop = _translate(offset, offset, n)
    mirror = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    mirror[params.flip, 0, 0] = -1.0
    mirror[params.flip, 0, 2] = r
    theta = torch.deg2rad(params.angle)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    # image y points down, so PIL's counter-clockwise rotation maps output q to input c + [[cos, -sin], [sin, cos]](q - c)
    rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, -sin, sin, cos
    unrotate = _translate(r / 2, r / 2, n) @ rotation @ _translate(-r / 2, -r / 2, n)
    to_normalised = _translate(-1.0, -1.0, n) @ _scale(2 / r, 2 / r, n)
    return to_normalised @ unrotate @ mirror @ uncrop @ out_to_pixels


def source_matrices(params: AugmentParams, height: int, width: int, resize: int, out_size: int) -> torch.Tensor:
    """(B, 3, 3) maps from normalised output coordinates to normalised source-image coordinates.

    Canvas -> source is the resized crop: x_src = j + (x_canvas + 1) * w / 2 pixels, normalised by the source size.
    """
    n = len(params)
    crop = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    crop[:, 0, 0], crop[:, 0, 2] = params.w / width, (2 * params.j + params.w) / width - 1
    crop[:, 1, 1], crop[:, 1, 2] = params.h / height, (2 * params.i + params.h) / height - 1
    return crop @ canvas_matrices(params, resize, out_size)


def sampling_grid(params: AugmentParams, height: int, width: int, pre: Preprocess,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's (B, S, S, 2) grid and the (B, 1, S, S) mask of points inside the crop box.

    Points outside the crop box are those PIL's rotate fills with black. Written with broadcasting
    instead of F.affine_grid, whose batched matmul is several times slower on CPUs.
    """
    size = pre.img_size
    m = source_matrices(params, height, width, pre.resize, size).to(device, torch.float32)
    base = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    grid = torch.empty(len(params), size, size, 2, device=device, dtype=torch.float32)
    box = torch.stack([2 * params.j / width - 1, 2 * (params.j + params.w) / width - 1,
                       2 * params.i / height - 1, 2 * (params.i + params.h) / height - 1], 1)
    box = box.to(device, torch.float32).view(-1, 4, 1, 1)
    inside = None
    for axis in (0, 1):
        along_x = m[:, axis, 0].view(-1, 1, 1) * base.view(1, 1, size) + m[:, axis, 2].view(-1, 1, 1)
        along_y = m[:, axis, 1].view(-1, 1, 1) * base.view(1, size, 1)
        coord = torch.add(along_x, along_y, out=grid[..., axis])
        axis_inside = (coord >= box[:, 2 * axis]) & (coord < box[:, 2 * axis + 1])
        inside = axis_inside if inside is None else inside.logical_and_(axis_inside)
    return grid, inside.unsqueeze(1)


def padded_crop(pixels: torch.Tensor, shift: torch.Tensor, padding: int) -> torch.Tensor:
    """RandomCrop(size, padding) on a batch: zero-pad each (B, C, S, S) image by `padding`, take the S x S window
    whose top-left corner is shift[b] = (row, col); one gather for the whole batch."""
    b, _, size, _ = pixels.shape
    padded = F.pad(pixels, (padding,) * 4)
    offsets = torch.arange(size, device=pixels.device)
    shift = shift.to(pixels.device)
    rows = (shift[:, 0:1] + offsets)[:, :, None]  # (B, S, 1)
    cols = (shift[:, 1:2] + offsets)[:, None, :]  # (B, 1, S)
    batch = torch.arange(b, device=pixels.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, S, S, C) -> (B, C, S, S)


def apply_policy_per_image(pixels: torch.Tensor, policy) -> torch.Tensor:
    """An auto-augment policy on each image of a (B, C, S, S) 0-255 batch, each with its own random draw (a policy
    called on a whole batch would give every image the same operations). Works on uint8 images, as on the PIL path."""
    images = pixels.round_().clamp_(0, 255).to(torch.uint8)
    threads = torch.get_num_threads()
    if images.device.type == "cpu":
        torch.set_num_threads(1)  # ops on one small image: thread start-up costs more than it saves (about 8x here)
    try:
        return torch.stack([policy(image) for image in images]).float()
    finally:
        torch.set_num_threads(threads)


def augment_batch(images: torch.Tensor, params: AugmentParams, pre: Preprocess, augment: Augment | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, pre.channels, img_size, img_size) on the images' device.

    C may be 1 for a grayscale dataset with pre.channels == 3 (replicating the channel equals PIL's L->RGB).
    `augment` names the per-image auto-augment policy, if any (it draws its own parameters, image by image).
    """
    height, width = images.shape[-2:]
    device = images.device
    grid, inside = sampling_grid(params, height, width, pre, device)
    # border padding = edge replication, as PIL's resize of the crop does at its borders
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out.mul_(inside)
    if params.shift is not None:
        out = padded_crop(out, params.shift, params.padding)
    if augment is not None and augment.auto_augment != "none":
        out = apply_policy_per_image(out, auto_augment_policy(augment.auto_augment))
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    out = torch.addcmul(-mean * inv_std, out, inv_std / 255.0)  # (B, 1, S, S) broadcasts to (B, channels, S, S)
    if params.erase is not None:  # RandomErasing(value=0) after Normalize, as torchvision's transform order has it
        box = params.erase.to(device, torch.float32)
        pixels = torch.arange(pre.img_size, device=device, dtype=torch.float32)
        rows = (pixels >= box[:, 0:1]) & (pixels < box[:, 0:1] + box[:, 2:3])
        cols = (pixels >= box[:, 1:2]) & (pixels < box[:, 1:2] + box[:, 3:4])
        out.masked_fill_((rows[:, :, None] & cols[:, None, :]).unsqueeze(1), 0.0)
    return out


def normalize_batch(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float32 through utils.data.preprocess's formula (bit-equal to the per-image eval transform)."""
    x = images.float()
    if x.shape[1] != pre.channels:
        x = x.expand(-1, pre.channels, -1, -1)
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return scale_and_normalize(x, mean, std)
