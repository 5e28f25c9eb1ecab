"""training/peer_run.py: the folder `make peer` trains the run's DiT recipe in again with another seed."""

from __future__ import annotations

import filecmp

import pytest

from configs.cli import UserError
from tests.conftest import REPO, cli_refusal, run_entry
from training.peer_run import PEER_FILES, main, prepare_peer


def _fake_run(run_dir):
    (run_dir / "latents").mkdir(parents=True)
    for name in (*PEER_FILES, "latents/train.safetensors", "latents/test.safetensors"):
        (run_dir / name).write_bytes(name.encode())
    return run_dir


def test_prepare_peer_copies_the_autoencoder_and_latents(tmp_path):
    run = _fake_run(tmp_path / "local")
    peer = tmp_path / "local-seed1"
    prepare_peer(run, peer)
    for name in (*PEER_FILES, "latents/train.safetensors", "latents/test.safetensors"):
        assert filecmp.cmp(run / name, peer / name, shallow=False)
    (peer / "dit_ema.safetensors").write_bytes(b"trained")
    prepare_peer(run, peer)  # a rerun: the same bytes, the peer's DiT kept (make peer resumes it)
    assert (peer / "dit_ema.safetensors").read_bytes() == b"trained"
    (run / "ae.safetensors").write_bytes(b"retrained")
    with pytest.raises(UserError, match="holds another autoencoder than .* its DiT is stale"):
        prepare_peer(run, peer)
    with pytest.raises(
        UserError,
        match="has no ae.safetensors, ae.json, latent_stats.safetensors, latents/train.safetensors: the peer shares",
    ):
        prepare_peer(tmp_path / "empty", tmp_path / "empty-seed1")


def test_the_cli_prints_the_peer_for_make_and_refuses_its_own_seed(tmp_path, capsys):
    _fake_run(tmp_path / "runs" / "local")
    args = ["--config", str(REPO / "configs" / "local.yaml"), f"run.root={tmp_path / 'runs'}"]
    main([*args, "--seed", "3"])
    assert capsys.readouterr().out.strip() == f"peer={tmp_path / 'runs' / 'local-seed3'} peername=local-seed3"
    assert (tmp_path / "runs" / "local-seed3" / "ae.safetensors").is_file()
    line, _ = cli_refusal(main, [*args, "--seed", "0"], capsys)
    assert line.endswith("error: PEER_SEED=0 is the run's own run.seed: a peer needs another seed")
    line, _ = cli_refusal(main, [*args, "run.name=" + "x" * 99], capsys)
    assert "run.name" in line


def test_make_peer_names_its_stage(tmp_path):
    """The Makefile's peer target parses (make -n) and trains with the peer's name and seed."""
    out = run_entry(["make", "-n", "peer", "PEER_SEED=2"]).stdout
    assert "training.peer_run --config configs/local.yaml --seed 2" in out
    assert "run.name=$peername" in out and "run.seed=2" in out and "sindy.peer_runs=[$peer]" in out
