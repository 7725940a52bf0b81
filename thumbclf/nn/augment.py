"""Augmentation: one set of operations (flips and rotations, stain in haematoxylin/eosin/DAB
space, brightness, contrast, saturation, zoom, blur, JPEG), two recipes: ``augment`` for
supervised training and ``ssl_view`` for self-supervised pretraining."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of images (…, H, W): k in 0..7."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


# Haematoxylin, eosin and DAB optical-density vectors (Ruifrok & Johnston 2001, as in
# scikit-image's rgb2hed); rows: stains, columns: R, G, B.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)


HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def stain_shift(x: torch.Tensor, strength: float, u, gen: torch.Generator) -> torch.Tensor:
    """Another lab's look on float images (n, 3, H, W) in [0, 1], ``strength`` 0-1.

    - stain colour and strength: each image's haematoxylin, eosin and DAB amounts (colour
      deconvolution of optical density) scaled by up to ±40% x strength and shifted by up to
      ±0.08 x strength where there is tissue; glass (no stain) stays glass;
    - glass tint: every channel dimmed by up to 6% x strength (yellowish or bluish glass);
    - scanner blur (Gaussian, sigma up to 1.5 px x strength) and sensor noise (up to 3% x
      strength).
    ``u(lo, hi, *shape)`` draws the random parameters, ``gen`` the noise. JPEG artefacts:
    ``jpeg_artefacts``.
    """
    n, dev = x.shape[0], x.device
    od = -torch.log((x * 255 + 1) / 256)  # optical density; 0 on white glass
    hed = torch.einsum("nchw,cs->nshw", od, HED_FROM_RGB.to(dev)).clamp_min(0)
    tissue = od.sum(1, keepdim=True)
    tissue = tissue / (tissue + 0.15)  # ~0 on glass, ~1 in tissue
    hed = hed * u(1 - 0.4 * strength, 1 + 0.4 * strength, n, 3, 1, 1) \
        + u(-0.08 * strength, 0.08 * strength, n, 3, 1, 1) * tissue
    od = torch.einsum("nshw,sc->nchw", hed.clamp_min(0), RGB_FROM_HED.to(dev))
    x = (256 * torch.exp(-od) - 1) / 255
    x = x * u(1 - 0.06 * strength, 1.0, n, 3, 1, 1)  # glass tint
    sigma = float(u(0.0, 1.5 * strength, 1))
    if sigma > 0.3:
        radius = max(1, math.ceil(2 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=dev)
        kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(F.conv2d(x, kernel, groups=3), kernel.transpose(2, 3), groups=3)
    noise = u(0.0, 0.03 * strength, n, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x.clamp(0, 1)


def jpeg_artefacts(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 (n, 3, H, W): with probability strength / 2 each image is JPEG-compressed at a
    quality of 30-90 and decoded again."""
    from torchvision.io import decode_jpeg, encode_jpeg

    pick = torch.rand(x.shape[0], generator=gen) < strength / 2
    quality = torch.randint(30, 91, (x.shape[0],), generator=gen)
    if not pick.any():
        return x
    out = x.clone()
    for i in torch.nonzero(pick).flatten().tolist():
        img = x[i].cpu().contiguous()
        out[i] = decode_jpeg(encode_jpeg(img, quality=int(quality[i]))).to(x.device)
    return out


# ------------------------------------------------------------------ the two recipes


def augment(x: torch.Tensor, gen: torch.Generator, stain: float = 0.0) -> torch.Tensor:
    """Random flips, 90° rotations, mild colour/stain jitter and scale on uint8 (n, H, W, 3);
    ``stain`` > 0: also another lab's stain, glass, blur, noise and JPEG (stain_shift).

    Runs on whatever device ``x`` is on; random parameters come from the CPU ``gen``.
    """
    n, u = x.shape[0], _uniform(gen, x.device)
    v = _oriented(x, gen)
    if stain > 0:
        v = stain_shift(v, stain, u, gen)
    # per-channel gain and brightness, contrast and saturation around 1
    v = _colour(v, u(0.95, 1.05, n, 3, 1, 1), u(0.9, 1.1, n, 1, 1, 1),
                contrast=u(0.9, 1.1, n, 1, 1, 1), saturation=u(0.85, 1.15, n, 1, 1, 1))
    v = _as_uint8(_zoom(v, u(0.9, 1.1, n)))  # scale 0.9-1.1 about the centre
    if stain > 0:
        v = jpeg_artefacts(v, stain, gen)
    return v.permute(0, 2, 3, 1).contiguous()


def ssl_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of uint8 (n, H, W, 3) thumbnails, as uint8 (n, H, W, 3).

    Flips and 90-degree rotations; scale 0.85-1.15 and a shift of up to 8% (glass fills in,
    before the colour changes, which then tint that glass like the rest); stain jitter in
    haematoxylin/eosin/DAB space; brightness, contrast and saturation; Gaussian blur on half of
    the images. Colour changes stay moderate: colour tells IHC from H&E, and the representation
    should keep that.
    """
    n, size, u = x.shape[0], x.shape[1], _uniform(gen, x.device)
    v = _oriented(x, gen)
    v = _zoom(v, u(0.85, 1.15, n), u(-0.16, 0.16, n, 2))  # 0.16 (normalised) = 8% of the side
    v = hed_jitter(v, u(0.9, 1.1, n, 1, 1, 3), u(-0.03, 0.03, n, 1, 1, 3))
    v = _colour(v, u(0.85, 1.15, n, 1, 1, 1), contrast=u(0.8, 1.2, n, 1, 1, 1),
                saturation=u(0.8, 1.2, n, 1, 1, 1)).clamp(0, 1)
    # focus: blur half of the images (sigma up to 1.5 px at 224 px)
    sigma = u(0.1, 1.5, n) * (size / 224) * (torch.rand(n, generator=gen) < 0.5).to(x.device)
    if float(sigma.max()) > 0.05:
        v = _blur(v, sigma)
    return _as_uint8(v).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------ the operations


def _uniform(gen: torch.Generator, device):
    """``u(lo, hi, *shape)``: uniform random parameters, drawn on the CPU from ``gen``."""
    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(device)
    return u


def _oriented(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 (n, H, W, 3) as float (n, 3, H, W) in [0, 1], each image in a random one of the
    8 flips and rotations."""
    ks = torch.randint(0, 8, (x.shape[0],), generator=gen)
    v = x.permute(0, 3, 1, 2).float().div_(255.0)
    return torch.stack([dihedral(v[i], int(ks[i])) for i in range(x.shape[0])])


def _as_uint8(v: torch.Tensor) -> torch.Tensor:
    """Float (n, 3, H, W) in [0, 1] (clamped) as uint8."""
    return v.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)


def hed_jitter(v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Float (n, 3, H, W) with each image's haematoxylin, eosin and DAB concentrations (optical
    density, colour deconvolution) scaled and shifted by (n, 1, 1, 3)."""
    rgb_from_hed, hed_from_rgb = RGB_FROM_HED.to(v.device), HED_FROM_RGB.to(v.device)
    od = -torch.log(v.clamp(1 / 255, 1)).permute(0, 2, 3, 1)  # n, H, W, 3
    hed = (od @ hed_from_rgb) * scale + shift
    return torch.exp(-(hed @ rgb_from_hed)).permute(0, 3, 1, 2).clamp(0, 1)


def _colour(v: torch.Tensor, *gains: torch.Tensor, contrast: torch.Tensor,
            saturation: torch.Tensor) -> torch.Tensor:
    """Gains (applied one after the other), then contrast and saturation, on float images."""
    for g in gains:
        v = v * g
    return _saturation(_contrast(v, contrast), saturation)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (n, 3, H, W) with one sigma (pixels) per image; sigma 0 = unchanged."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # n, K; sigma ~0 gives a delta
    k = k.repeat_interleave(c, 0)  # n*c, K
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _zoom(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Scale (n,) about the centre and shift (n, 2; normalised coordinates) float (n, 3, H, W);
    glass (white) fills in where the picture moves."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    if shift is not None:
        theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image's contrast about its mean, by ``factor`` (n, 1, 1, 1)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each pixel's saturation about its grey, by ``factor`` (n, 1, 1, 1)."""
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * factor + grey
