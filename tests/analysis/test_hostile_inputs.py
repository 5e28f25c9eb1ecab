"""Non-finite trajectory blocks and custom terms with undefined constants (issue 19), at the functions that read
and parse them: refused with one line naming the block, array, step and dimension, or the term."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.cli import UserError
from configs.io import file_sha256

META = {"seed": 1, "sampler": "ddim", "dit_ema_sha256": "d" * 64, "ae_sha256": "a" * 64}


def _tensors(count: int, T: int = 6, d: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z": torch.randn(T + 1, count, d, generator=g),
        "eps": torch.randn(T, count, d, generator=g),
        "drift": torch.randn(T, count, d, generator=g),
        "t": torch.linspace(1, 0, T + 1, dtype=torch.float64),
    }


def _folder(tmp_path: Path) -> Path:
    from analysis.job.trajectories import write_block, write_manifest

    folder = tmp_path / "traj"
    for b in range(2):
        write_block(folder, b, _tensors(3), META)
    write_manifest(folder, 6, [(0, 3), (1, 3)], {**META, "block_size": 3, "timesteps": 6, "latent_shape": [4, 1]})
    return folder


def test_a_block_with_nan_behind_a_valid_manifest_is_found_and_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from analysis.job.trajectories import TrajectorySet, block_problems, read_trajectory_manifest

    folder = _folder(tmp_path)
    manifest_path = folder / "manifest.json"
    assert TrajectorySet.from_manifest(manifest_path).n == 6
    # NaN written into block 1's drift at step 4, trajectory 2, dimension 3; the digest recomputed.
    block = sorted(folder.glob("block-*.safetensors"))[1]
    with safe_open(str(block), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["drift"][4, 2, 3] = float("nan")
    save_file(tensors, str(block), meta)
    manifest = json.loads(manifest_path.read_text())
    manifest["blocks"][1]["sha256"] = file_sha256(block)
    manifest_path.write_text(json.dumps(manifest))
    ((bad, why),) = block_problems(manifest_path, read_trajectory_manifest(manifest_path))
    assert bad == block and "NaN or Inf" in why and "'drift'" in why and "step 4" in why and "dimension 3" in why
    with pytest.raises(UserError, match=r"trajectory block .*block-000001.* holds 1 NaN or Inf values in 'drift'"):
        TrajectorySet.from_manifest(manifest_path)
    # Read without the check (the job's own fresh blocks), the block is still refused when it is loaded.
    tset = TrajectorySet.from_manifest(manifest_path, verify=False)
    tset.block(0)
    with pytest.raises(UserError, match=r"block-000001.* NaN or Inf values in 'drift' \(first at step 4, trajectory 2"):
        tset.block(1)


def test_a_freshly_generated_block_with_inf_is_not_written(tmp_path: Path) -> None:
    from analysis.job.trajectories import write_block

    tensors = _tensors(3)
    tensors["z"][2, 0, 1] = float("inf")
    with pytest.raises(UserError, match=r"block 5 .*NaN or Inf values in 'z' \(first at step 2, trajectory 0"):
        write_block(tmp_path, 5, tensors, META)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "term, expect",
    [
        ("1/0 * z0", "divides by the constant 0"),
        ("z0 * 1/0", "divides by the constant 0"),
        ("10**400 * z1", "the constant 10 ** 400 is undefined"),
        ("10**10**10", "is undefined"),
        ("(-1)**0.5 * z2", "the constant -1 ** 0.5 is not a finite real number"),
        ("exp(1000) * z0", "the constant exp(1000) is undefined"),
        ("log(0) + z0", "the constant log(0) is undefined"),
        ("1e400 * z0", "is not a finite real number"),
    ],
)
def test_custom_terms_fold_their_constants_at_parse_time(term: str, expect: str) -> None:
    from analysis.sindy.custom_terms import CustomTerms

    with pytest.raises(ValueError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        CustomTerms(terms=(term,))


def test_finite_constants_still_parse_and_evaluate() -> None:
    from analysis.sindy.custom_terms import CustomTerms

    fam = CustomTerms(terms=("2**-1 * z0", "exp(-t) * z1 / 4", "(1/3) * z0 * z1"))
    z, t = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.0], [1.0]])
    cols = fam._columns(z, t)
    np.testing.assert_allclose(np.asarray(cols), [[0.5, 0.5, 2 / 3], [1.5, np.exp(-1), 4.0]])
