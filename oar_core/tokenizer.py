"""A small VQ-VAE that turns images into a grid of discrete tokens (and back).

encoder: k stride-2 convs (image_size -> grid, k = log2(image_size / grid)) + a residual block -> code_dim
quantizer: nearest codebook vector; EMA codebook updates, codebook initialized from encoder outputs,
           dead codes restarted from current encodings so nearly every code gets used
decoder: mirror of the encoder with transposed convs, sigmoid output in [0, 1]
Trained by the tokenizer stage (pipeline/tokenizer.py); this module is the model and its checkpoint."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from oar_core import vq_diffusers
from oar_core.checkpoint import load_checkpoint, save_checkpoint
from oar_core.sudoku import GlyphTokenizer


def num_stages(image_size: int, grid: int) -> int:
    """Number of stride-2 stages; an image_size that is not grid * 2^k is resized to the nearest one."""
    if grid > image_size:
        raise ValueError(f"tokenizer.grid ({grid}) must be <= ingest.image_size ({image_size}); lower tokenizer.grid")
    return max(0, round(math.log2(image_size / grid)))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    """Codebook with EMA updates (no codebook gradient: more stable and faster to converge on small data)."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.code_dim, self.decay, self.eps = codebook_size, code_dim, decay, eps
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z_MD: torch.Tensor) -> torch.Tensor:
        # ||z - e||^2 = |z|^2 - 2 z.e + |e|^2 ; |z|^2 is constant per row so it is dropped
        dist_MK = self.codebook.pow(2).sum(1)[None, :] - 2 * z_MD @ self.codebook.t()
        return dist_MK.argmin(1)

    @torch.no_grad()
    def _sample_rows(self, z_MD: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, z_MD.shape[0], (n,), device=z_MD.device)
        return z_MD[idx]

    @torch.no_grad()
    def _ema_update(self, z_MD: torch.Tensor, codes_M: torch.Tensor):
        # a code is "dead" below ~1 use per batch (less for tiny batches); a new or restarted code gets twice
        # that so it survives ~70 steps to prove itself instead of being recycled at once
        thresh = min(1.0, 0.1 * z_MD.shape[0] / self.codebook_size)
        if not bool(self.initialized):
            # start from real encodings: a random codebook leaves most codes far from the data, i.e. dead
            self.codebook.copy_(self._sample_rows(z_MD, self.codebook_size))
            self.ema_count.fill_(2 * thresh)
            self.ema_sum.copy_(self.codebook * 2 * thresh)
            self.initialized.fill_(True)
            return
        # scatter-adds instead of a one-hot matmul, which would be M x K floats (GBs for a 64k codebook)
        count_K = torch.bincount(codes_M, minlength=self.codebook_size).type(z_MD.dtype)
        sum_KD = torch.zeros_like(self.ema_sum).index_add_(0, codes_M, z_MD)
        self.ema_count.mul_(self.decay).add_(count_K, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sum_KD, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.ema_count.sum()
        count_K = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.ema_sum / count_K[:, None])
        # dead-code restart: move unused codes onto random current encodings
        dead_K = self.ema_count < thresh
        n_dead = int(dead_K.sum())
        if n_dead:
            fresh_ND = self._sample_rows(z_MD, n_dead)
            self.codebook[dead_K] = fresh_ND
            self.ema_sum[dead_K] = fresh_ND * 2 * thresh
            self.ema_count[dead_K] = 2 * thresh

    def forward(self, z_BDHW: torch.Tensor):
        B, D, H, W = z_BDHW.shape
        z_MD = z_BDHW.permute(0, 2, 3, 1).reshape(-1, D)
        codes_M = self.nearest(z_MD)
        if self.training:
            self._ema_update(z_MD.detach(), codes_M)
            codes_M = self.nearest(z_MD)  # re-assign after an init/restart so the loss sees the new codebook
        q_MD = self.codebook[codes_M]
        commit = F.mse_loss(z_MD, q_MD.detach())
        q_MD = z_MD + (q_MD - z_MD).detach()  # straight-through: decoder gradient flows to the encoder
        q_BDHW = q_MD.view(B, H, W, D).permute(0, 3, 1, 2)
        return q_BDHW, codes_M.view(B, H, W), commit


class VQTokenizer(nn.Module):
    def __init__(self, image_size: int = 28, channels: int = 1, grid: int = 7, codebook_size: int = 256,
                 code_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.config = dict(image_size=image_size, channels=channels, grid=grid, codebook_size=codebook_size,
                           code_dim=code_dim, hidden=hidden)
        self.image_size, self.channels, self.grid, self.codebook_size = image_size, channels, grid, codebook_size
        k = num_stages(image_size, grid)
        self.internal_size = grid * 2 ** k
        # narrow at high resolution, wide at the grid: the high-res convs dominate CPU time
        widths = [max(16, hidden // 2 ** (k - 1 - i)) for i in range(k)]
        enc, c_in = [], channels
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.ReLU()]
            c_in = w
        enc += [nn.Conv2d(c_in, hidden, 3, padding=1), ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(codebook_size, code_dim)
        dec = [nn.Conv2d(code_dim, hidden, 3, padding=1), ResBlock(hidden), nn.ReLU()]
        c_in = hidden
        # each upsampling stage inverts one encoder stage: widths[i] -> widths[i-1], the last one -> widths[0] // 2
        for w in reversed([max(8, widths[0] // 2)] + widths[:k - 1]) if k else []:
            dec += [nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1), nn.ReLU()]
            c_in = w
        dec += [nn.Conv2d(c_in, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _to_internal(self, x_BCHW):
        if x_BCHW.shape[-1] != self.internal_size or x_BCHW.shape[-2] != self.internal_size:
            x_BCHW = F.interpolate(x_BCHW, size=(self.internal_size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        return x_BCHW

    def _from_internal(self, x_BCHW):
        if self.internal_size != self.image_size:
            x_BCHW = F.interpolate(x_BCHW, size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        return x_BCHW

    def _check(self, images_BCHW):
        if images_BCHW.dim() != 4 or images_BCHW.shape[1] != self.channels:
            raise ValueError(f"tokenizer expects images (B,{self.channels},H,W), got {tuple(images_BCHW.shape)}")

    def forward(self, images_BCHW: torch.Tensor):
        self._check(images_BCHW)
        z_BDhw = self.encoder(self._to_internal(images_BCHW) * 2 - 1)
        q_BDhw, tokens_Bhw, commit = self.quantizer(z_BDhw)
        recon_BCHW = self._from_internal(torch.sigmoid(self.decoder(q_BDhw)))
        recon = F.mse_loss(recon_BCHW, images_BCHW)
        return recon_BCHW, {"recon": recon, "commit": commit}, tokens_Bhw

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images (B,C,H,W) float in [0,1] -> tokens (B,grid,grid) long."""
        self._check(images_BCHW)
        z_BDhw = self.encoder(self._to_internal(images_BCHW) * 2 - 1)
        B, D, h, w = z_BDhw.shape
        return self.quantizer.nearest(z_BDhw.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    @torch.no_grad()
    def decode(self, tokens_BHW: torch.Tensor) -> torch.Tensor:
        """tokens (B,grid,grid) long -> images (B,C,H,W) float in [0,1]."""
        q_BhwD = self.quantizer.codebook[tokens_BHW.long()]
        return self._from_internal(torch.sigmoid(self.decoder(q_BhwD.permute(0, 3, 1, 2))))


def save_tokenizer(path, model: VQTokenizer | vq_diffusers.DiffusersVQ | GlyphTokenizer) -> None:
    """Any kind load_tokenizer returns (the tokenizer stage re-saves whichever one it adopts)."""
    if isinstance(model, vq_diffusers.DiffusersVQ):
        save_checkpoint(path, vq_diffusers.to_checkpoint(model))
        return
    kind = GlyphTokenizer.KIND if isinstance(model, GlyphTokenizer) else "oar-vq-tokenizer"
    save_checkpoint(path, {"kind": kind, "config": dict(model.config),
                           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})


def load_tokenizer(path, device: torch.device | str = "cpu") -> VQTokenizer | vq_diffusers.DiffusersVQ | GlyphTokenizer:
    ckpt = load_checkpoint(path, what="tokenizer checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("kind") == vq_diffusers.KIND:
        try:
            return vq_diffusers.from_checkpoint(ckpt).to(device).eval()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a tokenizer checkpoint (expected a dict with 'config' and 'state_dict', "
                         f"as written by save_tokenizer); point tokenizer.checkpoint at one")
    try:
        model = (GlyphTokenizer if ckpt.get("kind") == GlyphTokenizer.KIND else VQTokenizer)(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ValueError(f"{path}: tokenizer checkpoint does not match its config ({detail}); "
                         f"re-export it with save_tokenizer or retrain (unset tokenizer.checkpoint)") from None
    return model.to(device).eval()

