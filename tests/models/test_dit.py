"""DiT: AdaLN-Zero initialisation, RoPE relative-position property, gradient flow, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from models.diffusion import eps_loss
from models.dit import PRESETS, DiT, DiTConfig, RotaryEmbedding, build_dit
from models.schedules import cosine_schedule

# (rope kind, num_tokens, in_channels): the two latents of the project.
LAYOUTS = [("2d", 49, 6), ("1d", 16, 1)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("rope,n,c", LAYOUTS)
def test_untrained_output_is_exactly_zero(preset, rope, n, c):
    torch.manual_seed(0)
    model = build_dit(preset, c, n, rope=rope)
    x = 3.0 * torch.randn(2, n, c)
    out = model(x, torch.tensor([0, 99]))
    assert out.shape == (2, n, c)
    assert torch.equal(out, torch.zeros_like(out))
    # Each block is the identity at init (gate = 0), not merely hidden by the zero output layer.
    h = torch.randn(2, n, model.cfg.hidden)
    cond = torch.randn(2, model.cfg.hidden)
    assert torch.equal(model.blocks[0](h, cond), h)


@pytest.mark.parametrize("rope,n,c", LAYOUTS)
def test_initial_eps_loss_is_one(rope, n, c):
    model = build_dit("tiny", c, n, rope=rope)
    x0 = torch.randn(4096, n, c, generator=torch.Generator().manual_seed(0))
    loss = eps_loss(model, cosine_schedule(100), x0, generator=torch.Generator().manual_seed(1))
    # Zero output => loss = mean(noise^2) over >= 65k standard normals: 1 +- ~0.006 (1 sigma).
    assert abs(loss.item() - 1.0) < 0.1


def _scores(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return rope(q) @ rope(k).transpose(-1, -2)  # (B, H, N, N)


def test_rope_1d_scores_depend_only_on_offset():
    torch.manual_seed(0)
    n, d = 16, 8
    q, k = torch.randn(2, 3, n, d, dtype=torch.float64), torch.randn(2, 3, n, d, dtype=torch.float64)
    pos = torch.arange(n)[:, None]
    base_scores = _scores(RotaryEmbedding(d, pos), q, k)
    shifted = _scores(RotaryEmbedding(d, pos + 37), q, k)
    torch.testing.assert_close(shifted, base_scores, rtol=1e-5, atol=1e-5)  # tables are float32
    assert not torch.allclose(base_scores, q @ k.transpose(-1, -2), atol=1e-3)  # RoPE does something
    # The same q and k at every position: score(i, j) is a function of i - j only (Toeplitz).
    same = _scores(RotaryEmbedding(d, pos), q[:, :, :1].expand_as(q), k[:, :, :1].expand_as(k))
    for offset in range(-n + 1, n):
        diag = torch.diagonal(same, offset=offset, dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), rtol=1e-5, atol=1e-5)


def test_rope_2d_scores_depend_only_on_row_and_col_offsets():
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=6, num_tokens=49, hidden=32, depth=1, heads=2, rope="2d"))
    d = model.cfg.head_dim
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    pos = torch.stack((rows, cols), -1).reshape(49, 2)
    rope = model.blocks[0].attn.rope
    torch.testing.assert_close(rope.cos, RotaryEmbedding(d, pos).cos)  # the model uses row-major (row, col)

    q, k = torch.randn(1, 2, 49, d, dtype=torch.float64), torch.randn(1, 2, 49, d, dtype=torch.float64)
    base_scores = _scores(RotaryEmbedding(d, pos), q, k)
    for shift in ((3, 0), (0, 5), (-2, 11)):
        shifted = _scores(RotaryEmbedding(d, pos + torch.tensor(shift)), q, k)
        torch.testing.assert_close(shifted, base_scores, rtol=1e-5, atol=1e-5)
    # Both axes matter, separately: one row down is not one column right (transposed grid differs).
    transposed = _scores(RotaryEmbedding(d, pos.flip(-1)), q, k)
    assert not torch.allclose(transposed, base_scores, atol=1e-3)


def test_rope_tables_stay_out_of_state_dict():
    model = build_dit("tiny", 6, 49, rope="2d")
    keys = list(model.state_dict())
    assert not any(key.endswith((".cos", ".sin", ".freqs")) for key in keys), keys
    clone = build_dit("tiny", 6, 49, rope="2d")
    clone.load_state_dict(model.state_dict())  # strict: nothing missing, nothing unexpected


@pytest.mark.parametrize("rope,n,c", LAYOUTS)
def test_gradients_reach_every_parameter(rope, n, c):
    torch.manual_seed(0)
    model = build_dit("tiny", c, n, rope=rope, abs_pos=(rope == "1d"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = cosine_schedule(100)
    x0 = torch.randn(64, n, c)
    probe = (torch.randn(4, n, c), torch.tensor([0, 10, 50, 99]))
    touched = {name: False for name, _ in model.named_parameters()}
    # Zero-init means step 1 only moves out_proj, step 2 the gates, step 3 everything behind them.
    for step in range(3):
        opt.zero_grad()
        eps_loss(model, schedule, x0, generator=torch.Generator().manual_seed(step)).backward()
        for name, p in model.named_parameters():
            touched[name] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        opt.step()
        if step == 0:
            assert model(*probe).abs().max() > 0, "output still zero after one optimizer step"
    assert all(touched.values()), [name for name, hit in touched.items() if not hit]


def test_bf16_autocast_forward_on_cpu():
    torch.manual_seed(0)
    model = build_dit("tiny", 6, 49, rope="2d")
    with torch.no_grad():  # move off the zero init so the comparison means something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 49, 6), torch.tensor([1, 40, 99])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_timestep_forms_and_shape_errors():
    model = build_dit("tiny", 1, 16)
    x = torch.randn(2, 16, 1)
    assert model(x, torch.tensor(5)).shape == (2, 16, 1)  # scalar t broadcasts
    assert model(x, torch.tensor([5.0, 7.5])).shape == (2, 16, 1)  # float t
    with pytest.raises(ValueError, match=r"unsqueeze\(-1\)"):
        model(torch.randn(2, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t of shape"):
        model(x, torch.tensor([1, 2, 3]))


def test_config_errors_are_loud():
    with pytest.raises(ValueError, match="known presets"):
        build_dit("huge", 6, 49)
    with pytest.raises(ValueError, match="Unknown DiTConfig override"):
        build_dit("tiny", 6, 49, widht=64)
    with pytest.raises(ValueError, match="not a square"):
        build_dit("tiny", 6, 50, rope="2d")
    with pytest.raises(ValueError, match="divisible"):
        build_dit("tiny", 6, 49, heads=3)
    assert build_dit("tiny", 6, 50, rope="2d", grid=(5, 10)).cfg.grid == (5, 10)
    assert build_dit("reference", 6, 49, rope="2d").cfg.grid == (7, 7)


def test_reference_preset_size():
    # The reference doc quotes ~1.4M parameters for D=128, depth 4, 4 heads on the 49x6 latent.
    n = build_dit("reference", 6, 49, rope="2d").num_params()
    assert 1.2e6 < n < 1.5e6, n
