"""Batch-wise training augmentation: random crop of a padded image plus horizontal flip."""

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
                  padding_mode: str = "reflect") -> torch.Tensor:
    """Randomly shift every image by up to ``pad`` pixels and mirror about half of them, all at once.

    Each image is padded by ``pad`` on every side and an H×W window at a random offset in
    ``0..2*pad`` is cut out (rows and columns gathered per image, no Python loop over the batch).

    Args:
        x: float [B, C, H, W].
        generator: source of randomness (its device is used for drawing; results move to ``x``'s).
        pad: maximal shift in pixels (0: no crop).
        flip: mirror each image left-right with probability 1/2.
        padding_mode: "reflect" or "zeros".

    Returns:
        A new tensor [B, C, H, W].
    """
    if padding_mode not in ("reflect", "zeros"):
        raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
    b, c, h, w = x.shape
    out = x
    if pad > 0:
        mode = "reflect" if padding_mode == "reflect" else "constant"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)  # [B,C,H+2p,W+2p]
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=generator.device)
        dy, dx = offsets.to(x.device)  # [B], [B]
        rows = dy[:, None] + torch.arange(h, device=x.device)  # [B,H]
        cols = dx[:, None] + torch.arange(w, device=x.device)  # [B,W]
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))  # [B,C,H,W+2p]
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # [B,C,H,W]
    if flip:
        mirror = torch.rand(b, generator=generator, device=generator.device).to(x.device) < 0.5  # [B]
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)  # [B,C,H,W]
    return out if out is not x else x.clone()
