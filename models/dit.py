"""DiT: a diffusion transformer with AdaLN-Zero conditioning and rotary position embeddings.

Implements the denoiser of the reference recipe (docs/REFERENCES.md, "Latent diffusion for MNIST", section 3):

- DiT blocks with AdaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers",
  section 3.2): each block regresses (shift, scale, gate) x 2 from the time embedding ``c``;
  ``h = LN(x) * (1 + scale) + shift``, ``x = x + gate * sublayer(h)``. The modulation layers and
  the output projection start at zero, so the untrained net is exactly ``eps_hat = 0`` and every
  block is the identity.
- Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 34): each adjacent pair
  ``(q_{2i}, q_{2i+1})`` of a head is rotated by ``pos * base^(-2i/d_head)``, so the score
  ``q_m . k_n`` depends on positions only through ``m - n``. For the 7x7 conv latent the rotation
  is 2-D axial: half of the pairs rotate with the row index, half with the column index.
- Sinusoidal timestep embedding (Vaswani et al. 2017 / Ho et al. 2020) with the reference's
  frequencies ``freq_i = 10000^(-i / (D/2 - 1))``, followed by an MLP D -> 4D -> D.

The network knows nothing about diffusion: ``DiT(x, t)`` maps tokens (B, N, C) and a timestep
(B,) to a tensor of the same shape; models/diffusion.py decides what that output means.

Token layouts used in this project (the caller passes ``in_channels`` / ``num_tokens``):
- conv latent: (B, 49, 6), token index = row * 7 + col, ``rope="2d"`` over the 7x7 grid.
- vae16 latent: (B, 16, 1), i.e. 16 tokens of one channel each, ``rope="1d"``. We chose 16x1
  over 1x16 because with a single token self-attention is a no-op (softmax over one key is 1),
  leaving an MLP; 16 tokens let attention mix coordinates. The VAE's coordinates have no spatial
  order, so RoPE only makes them distinguishable; ``abs_pos=True`` adds a learned per-token
  embedding that names each coordinate outright (recommended for vae16).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`. Data-dependent fields first, then the preset fields."""

    in_channels: int
    """C: channels per latent token (6 for the conv latent, 1 for vae16)."""
    num_tokens: int
    """N: tokens per sample (49 for the conv latent, 16 for vae16)."""
    hidden: int = 128
    """D: transformer width; also the width of the time embedding."""
    depth: int = 4
    """Number of DiT blocks."""
    heads: int = 4
    """Attention heads; ``hidden / heads`` is the head width (must be even, or a multiple of 4 for 2-D RoPE)."""
    mlp_ratio: float = 4.0
    """FFN width as a multiple of ``hidden``."""
    dropout: float = 0.0
    """Dropout on each sublayer's output before the gated residual (reference: 0)."""
    rope: str = "1d"
    """"1d": rotary over the token index (vector latents); "2d": axial rotary over ``grid`` (conv latent)."""
    grid: tuple[int, int] | None = None
    """(rows, cols) for ``rope="2d"``; ``None`` derives a square grid from ``num_tokens`` (49 -> 7x7)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies ``base^(-j/m)``."""
    abs_pos: bool = False
    """Add a learned absolute embedding per token after ``in_proj`` (for orderless coordinates, e.g. vae16)."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_tokens", "hidden", "depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name}={value!r}: must be a positive int.")
        if self.hidden % self.heads != 0:
            raise ValueError(
                f"DiTConfig: hidden={self.hidden} is not divisible by heads={self.heads}; "
                f"pick heads among the divisors of hidden."
            )
        if self.hidden < 4:
            raise ValueError(f"DiTConfig.hidden={self.hidden}: the time embedding needs hidden >= 4.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiTConfig.dropout={self.dropout}: must be in [0, 1).")
        if self.rope not in ("1d", "2d"):
            raise ValueError(f"DiTConfig.rope={self.rope!r}: must be '1d' or '2d'.")
        head_dim = self.hidden // self.heads
        axes = 1 if self.rope == "1d" else 2
        if head_dim % (2 * axes) != 0:
            raise ValueError(
                f"DiTConfig: head width hidden/heads={head_dim} must be a multiple of {2 * axes} "
                f"for rope={self.rope!r} (each axis needs whole rotary pairs); change hidden or heads."
            )
        if self.rope == "2d":
            if self.grid is None:
                side = math.isqrt(self.num_tokens)
                if side * side != self.num_tokens:
                    raise ValueError(
                        f"DiTConfig: rope='2d' with num_tokens={self.num_tokens}, which is not a square; "
                        f"pass grid=(rows, cols) with rows * cols == {self.num_tokens}."
                    )
                self.grid = (side, side)
            self.grid = tuple(int(g) for g in self.grid)
            if len(self.grid) != 2 or self.grid[0] * self.grid[1] != self.num_tokens:
                raise ValueError(
                    f"DiTConfig.grid={self.grid}: needs two sides whose product is num_tokens={self.num_tokens}."
                )
        elif self.grid is not None:
            raise ValueError(f"DiTConfig.grid={self.grid} is only used with rope='2d' (rope={self.rope!r}).")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Preset name -> DiTConfig fields that do not depend on the data (see build_dit).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=32, depth=1, heads=2),  # debug / smoke tests
    "small": dict(hidden=64, depth=3, heads=4),  # CPU-sized: make run on 2 cores
    "reference": dict(hidden=128, depth=4, heads=4),  # the reference recipe: 4 heads of 32
    "large": dict(hidden=256, depth=8, heads=8),
    "xl": dict(hidden=384, depth=12, heads=6),
}


def build_dit(preset: str, in_channels: int, num_tokens: int, **overrides) -> DiT:
    """Build a DiT from a named preset.

    Args:
        preset: a key of :data:`PRESETS`.
        in_channels: C, channels per token.
        num_tokens: N, tokens per sample.
        **overrides: any other :class:`DiTConfig` field (e.g. ``rope="2d"``, ``dropout=0.1``).

    Returns:
        An initialised :class:`DiT` (outputs exactly zero until trained).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown DiT preset {preset!r}; known presets: {sorted(PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(DiTConfig)} - {"in_channels", "num_tokens"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown DiTConfig override(s) {unknown}; valid fields: {sorted(fields)}.")
    kwargs = {**PRESETS[preset], **overrides}
    return DiT(DiTConfig(in_channels=in_channels, num_tokens=num_tokens, **kwargs))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over one or more position axes (RoFormer eq. 34, axial for A > 1).

    A head of width d has d/2 adjacent pairs (x_{2p}, x_{2p+1}). With A axes, pairs are split
    into A contiguous groups of m = d/(2A); pair j of group a rotates by ``pos[:, a] * base^(-j/m)``.
    For A = 1 this is the RoFormer frequency ``base^(-2j/d)``.

    Args:
        head_dim: d, the width of one attention head.
        positions: (N, A) position of every token along each axis (e.g. (row, col) for a grid).
        base: frequency base.
    """

    def __init__(self, head_dim: int, positions: torch.Tensor, base: float = 10000.0) -> None:
        super().__init__()
        num_axes = positions.shape[1]
        pairs_per_axis = head_dim // (2 * num_axes)
        if pairs_per_axis * 2 * num_axes != head_dim:
            raise ValueError(f"RotaryEmbedding: head_dim={head_dim} must be a multiple of 2 * axes = {2 * num_axes}.")
        freqs = base ** (-torch.arange(pairs_per_axis, dtype=torch.float64) / pairs_per_axis)  # (m,)
        angles = positions.to(torch.float64)[:, :, None] * freqs  # (N, A, m)
        angles = angles.reshape(positions.shape[0], head_dim // 2)  # (N, d/2): axis-major groups
        # Non-persistent: the tables are a pure function of the config, so they stay out of
        # state_dict (checkpoints do not depend on them and old ones load after table changes).
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate queries or keys.

        Args:
            x: (B, H, N, d) queries or keys.

        Returns:
            (B, H, N, d), same dtype as ``x``.
        """
        # Cast the tables to x's dtype so q, k and v agree under bf16 autocast (SDPA requires it).
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # (N, d/2)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, N, d/2) each
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection and RoPE on q and k."""

    def __init__(self, hidden: int, heads: int, rope: RotaryEmbedding, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        q, k = self.rope(q), self.rope(k)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(h.transpose(1, 2).flatten(2))  # (B, N, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x * (1 + scale) + shift`` with (B, N, D) x and (B, 1, D) shift/scale."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """One AdaLN-Zero transformer block (DiT paper, Fig. 3 right)."""

    def __init__(self, cfg: DiTConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        d = cfg.hidden
        # No affine: the per-sample shift/scale from c replace LayerNorm's gamma/beta.
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, rope, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) -> (B, N, D)."""
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)  # 6 x (B, 1, D)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mods
        x = x + gate_a * self.drop(self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        x = x + gate_f * self.drop(self.mlp(modulate(self.norm2(x), shift_f, scale_f)))
        return x


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the raw timestep, then an MLP D -> 4D -> D (reference section 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        # Reference frequencies: 10000^(-i / (half - 1)), i = 0..half-1 (first = 1, last = 1e-4).
        self.register_buffer(
            "freqs", 10000.0 ** (-torch.arange(half, dtype=torch.float32) / (half - 1)), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) integer or float step index -> c (B, D)."""
        # Angles in float32 even under bf16 autocast: t up to ~1000 needs more than bf16's 8 bits.
        angles = t.float()[:, None] * self.freqs.float()  # (B, D/2)
        emb = torch.cat((angles.sin(), angles.cos()), dim=-1)  # (B, D) [sin..., cos...]
        return self.mlp(emb)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale from c) then a linear map D -> C; both zero-initialised."""

    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out_proj = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) -> (B, N, C)."""
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.out_proj(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: tokens (B, N, C) and timesteps (B,) -> a tensor (B, N, C).

    Trained as an epsilon predictor by models/diffusion.py; it has no notion of noise itself.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_tokens
        if cfg.rope == "1d":
            positions = torch.arange(n)[:, None]  # (N, 1)
        else:
            rows, cols = cfg.grid
            # Row-major, matching ConvAE.encode: token index = row * cols + col.
            positions = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
            positions = positions.reshape(n, 2)  # (N, 2) = (row, col)
        # One table shared by all blocks (a module registered in several parents is fine for buffers).
        rope = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_base)

        self.in_proj = nn.Linear(cfg.in_channels, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.hidden)) if cfg.abs_pos else None
        self.t_embed = TimestepEmbedding(cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(cfg, rope) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, cfg.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's recipe: Xavier-uniform linears, N(0, 0.02) time MLP, then the "Zero" of AdaLN-Zero.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        # Zero modulation => gate = 0 => every block is the identity at init; zero out_proj =>
        # the output is exactly 0, so the first eps-MSE is E[eps^2] = 1 and training starts calm.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.out_proj.weight)
        nn.init.zeros_(self.final.out_proj.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict a per-token output (epsilon, when trained by models/diffusion.py).

        Args:
            x: (B, N, C) latent tokens. A vector latent (B, 16) must be passed as (B, 16, 1).
            t: (B,) or scalar timestep: the raw step index 0..T-1 (int or float).

        Returns:
            (B, N, C), in the dtype of the computation (bf16 under autocast).
        """
        n, c_in = self.cfg.num_tokens, self.cfg.in_channels
        if x.dim() != 3 or x.shape[1:] != (n, c_in):
            raise ValueError(
                f"DiT expects x of shape (B, {n}, {c_in}), got {tuple(x.shape)}; "
                f"a vector latent (B, {n}) needs x.unsqueeze(-1), or build the DiT with matching "
                f"in_channels/num_tokens."
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"DiT expects t of shape ({x.shape[0]},) or a scalar, got {tuple(t.shape)}.")

        h = self.in_proj(x)  # (B, N, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embed(t)  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        return self.final(h, c)  # (B, N, C)

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (RoPE / frequency tables are buffers and not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
