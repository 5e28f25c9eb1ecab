"""Typed configuration: the dataclasses below (with the `sindy:` section in configs/sindy.py and the
`slurm:` section in configs/slurm.py) are the schema, YAML files only override them.

OmegaConf structured configs merge the defaults, a YAML file and dotted ``key=value``
overrides; unknown keys and wrong types are errors before any work (DESIGN.md, "Config").
Value checks live in each dataclass's ``__post_init__``, which OmegaConf.to_object runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.checks import ConfigError, _at_most, _check, _name, _non_negative, _path, _positive, cap_message
from configs.io import atomic_write_text
from configs.keys import unknown_key_message
from configs.sindy import SindyConfig, SindyLibraryConfig
from configs.slurm import SlurmConfig
from configs.text import shorten

__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "OptimConfig",
    "AEConfig",
    "LatentConfig",
    "DiTConfig",
    "SindyConfig",
    "SindyLibraryConfig",
    "SlurmConfig",
    "load_config",
    "to_dict",
    "to_yaml",
    "config_digest",
    "save_config",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
DIT_PRESETS = ("tiny", "small", "reference", "large", "xl")
"""The names of models.dit.PRESETS (configs imports nothing of models; tests/configs keeps the two equal)."""
LATENT_SIZES = {"conv": (294, 100), "vae16": (16, 50)}
"""Per latent kind: (D = tokens x channels, default T), as models/autoencoder.py and models.diffusion.LATENT_SCHEDULES
have them; for the disk estimate of the trajectories before any model exists."""
CONFIG_FILE_LIMIT = 1 << 20
"""Largest config file read (1 MiB; the shipped ones are about 2 kB)."""
VALUE_LIMIT = 4096
"""Longest string value or override (PATH_MAX): no key needs more."""


@dataclass
class RunConfig:
    name: str = "local"
    """Run name: outputs go to ``<root>/<name>/`` and Slurm jobs are named after it; 1-100 letters,
    digits, '.', '_' or '-', starting with a letter or digit, no '..'."""
    root: str = "runs"
    """Folder that holds all runs."""
    seed: int = 0
    """Seed for model init, data order and noise; a run is a pure function of config + seed."""

    def __post_init__(self) -> None:
        _name("run.name", self.name)
        _check(bool(self.root), "run.root must be a folder, got ''")
        _path("run.root", self.root)
        _check(0 <= self.seed < 2**32, f"run.seed must be in [0, 2**32), got {self.seed}")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class DataConfig:
    shards: str = "data/mnist"
    """Folder with webdataset shards and manifest.json (``python -m data_pipeline.prepare --out``)."""
    source: str = "auto"
    """MNIST source used when the shards must be written: auto | pickle | idx:PATH."""
    shard_size: int = 10000
    """Samples per shard when preparing."""
    loader: str = "memory"
    """memory: the whole split as one tensor on the training device; stream: webdataset streaming."""
    num_workers: int = 0
    """DataLoader worker processes for the streaming loader."""
    shuffle_buffer: int = 5000
    """Streaming shuffle buffer (samples)."""
    on_error: str = "raise"
    """What a corrupted shard does in the streaming loader: raise (names the shard) | skip (counted warning)."""

    def __post_init__(self) -> None:
        _check(self.loader in ("memory", "stream"), f"data.loader must be 'memory' or 'stream', got {self.loader!r}")
        _check(self.on_error in ("raise", "skip"), f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        _positive("data", shard_size=self.shard_size, shuffle_buffer=self.shuffle_buffer)
        _non_negative("data", num_workers=self.num_workers)
        # MNIST's training split is 60,000 images: a larger shard or buffer only costs memory.
        _at_most("data", 60000, shard_size=self.shard_size, shuffle_buffer=self.shuffle_buffer)
        _at_most("data", 64, num_workers=self.num_workers)
        _check(bool(self.shards), "data.shards must be a folder, got ''")
        _path("data.shards", self.shards)
        _path("data.source", self.source.removeprefix("idx:"))


@dataclass
class OptimConfig:
    """Shared optimisation settings of a training stage (AdamW + warmup + cosine)."""

    batch_size: int = 128
    """Per-process batch size."""
    epochs: float = 1.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 means derive from epochs."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    grad_accum: int = 1
    """Gradient accumulation steps (Accelerate)."""
    mixed_precision: str = "no"
    """no | fp16 (with loss scaling) | bf16, through Accelerate."""
    checkpoint_every: int = 500
    """Save the full training state every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (oldest deleted first)."""
    log_every: int = 20
    """Scalars to TensorBoard every N steps."""
    image_every: int = 500
    """Image grids to TensorBoard every N steps (and at the end)."""
    fused_adamw: bool = False
    """Use the fused AdamW kernel (CUDA only)."""

    def _validate(self, section: str) -> None:
        _positive(
            section,
            batch_size=self.batch_size,
            lr=self.lr,
            grad_accum=self.grad_accum,
            checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints,
            log_every=self.log_every,
            image_every=self.image_every,
        )
        _non_negative(
            section,
            epochs=self.epochs,
            max_steps=self.max_steps,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
        )
        _check(self.max_steps > 0 or self.epochs > 0, f"{section}: set epochs > 0 or max_steps > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{section}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{section}.betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        _check(
            self.mixed_precision in MIXED_PRECISION,
            f"{section}.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}",
        )


@dataclass
class AEConfig(OptimConfig):
    kind: str = "vae16"
    """Autoencoder: conv (ConvAE, 7x7x6 = 49 tokens of 6) | vae16 (16-D VAE, 16 tokens of 1)."""
    kl_weight: float = 1.0
    """VAE only: weight of the KL term against the summed BCE per image (1.0 = the plain ELBO)."""

    def __post_init__(self) -> None:
        self._validate("ae")
        _check(self.kind in ("conv", "vae16"), f"ae.kind must be 'conv' or 'vae16', got {self.kind!r}")
        _non_negative("ae", kl_weight=self.kl_weight)


@dataclass
class LatentConfig:
    batch_size: int = 2048
    """Images per encoder batch."""

    def __post_init__(self) -> None:
        _positive("latents", batch_size=self.batch_size)


@dataclass
class DiTConfig(OptimConfig):
    preset: str = "reference"
    """DiT preset from models.dit.PRESETS (tiny | small | reference | large | xl)."""
    batch_size: int = 256
    lr: float = 5e-4
    epochs: float = 200.0
    schedule: str = "auto"
    """Noise schedule: auto (conv: cosine T=100, vae16: cosine T=50) | cosine | linear."""
    timesteps: int = 0
    """T; 0 means the latent kind's default (conv 100, vae16 50)."""
    ema_decay: float = 0.999
    """EMA decay of the unwrapped fp32 parameters, updated after every optimizer step."""
    ema_warmup: bool = True
    """Ramp the EMA decay as min(ema_decay, (1 + step) / (10 + step)) so short runs do not sample
    from an EMA still dominated by the zero-initialised net; false gives the plain 0.999 EMA."""
    compile: bool = False
    """torch.compile the denoiser."""
    sample_every: int = 1000
    """Decode an EMA sample grid to TensorBoard every N steps (and at the end)."""
    num_samples: int = 64
    """Images in each sample grid."""
    eval_samples: int = 1000
    """EMA samples the scoring stage (analysis/score_samples.py, after training) draws and scores (0 disables)."""
    classifier: str = "data/classifier/mnist_cnn.safetensors"
    """MNIST classifier for FD-MNIST (``python training/train_classifier.py``); scoring is skipped, with a
    message, when the file does not exist."""

    def __post_init__(self) -> None:
        self._validate("dit")
        _check(
            self.preset in DIT_PRESETS,
            f"dit.preset must be one of {' | '.join(DIT_PRESETS)}, got {shorten(self.preset)}",
        )
        _path("dit.classifier", self.classifier)
        _check(
            self.schedule in ("auto", "cosine", "linear"),
            f"dit.schedule must be auto | cosine | linear, got {self.schedule!r}",
        )
        _non_negative("dit", timesteps=self.timesteps, eval_samples=self.eval_samples)
        _check(0 <= self.ema_decay < 1, f"dit.ema_decay must be in [0, 1), got {self.ema_decay}")
        _positive("dit", sample_every=self.sample_every, num_samples=self.num_samples)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sindy: SindyConfig = field(default_factory=SindyConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    resume: str = "none"
    """none: start fresh (refuses a run folder that already has checkpoints of the stage);
    auto: continue the latest complete checkpoint if there is one; or a checkpoint path."""

    def __post_init__(self) -> None:
        _check(bool(self.resume), "resume must be 'none', 'auto' or a checkpoint path")
        _path("resume", self.resume)
        _path("the run folder run.root/run.name", str(self.run.dir))


def _free_bytes(folder: Path) -> int:
    """Free bytes (for this user) on the file system that holds ``folder`` or its nearest existing parent."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def trajectory_bytes(cfg: Config) -> int:
    """Disk the SINDy job's trajectory blocks take: z (T+1), eps (T) and drift (T) of D float32 per trajectory."""
    dim, default_t = LATENT_SIZES[cfg.ae.kind]
    steps = cfg.dit.timesteps or default_t
    return cfg.sindy.n_trajectories * (3 * steps + 1) * dim * 4


def check_disk(cfg: Config) -> None:
    """Refuse, before any stage starts, a sindy.n_trajectories whose blocks would not fit on run.root's disk.

    Blocks already on disk (a rerun) count as free: they are reused, not written again.
    """
    if cfg.sindy.trajectories:
        return
    need = trajectory_bytes(cfg)
    existing = cfg.run.dir / "sindy" / "trajectories"
    have = _free_bytes(cfg.run.dir)
    if need > have and existing.is_dir():
        have += sum(f.stat().st_size for f in existing.rglob("*.safetensors"))
    _check(
        need <= have,
        f"sindy.n_trajectories={cfg.sindy.n_trajectories} needs about {need / 1e9:.3g} GB of trajectory blocks "
        f"in {shorten(str(cfg.run.dir))}, whose disk has {have / 1e9:.3g} GB free; lower sindy.n_trajectories "
        "or set run.root to a larger disk",
    )


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ in ("ConfigAttributeError", "ConfigKeyError") and key:
        return unknown_key_message(Config, key)
    if key:
        return f"bad value for '{key}': {msg}"
    return msg


def _format_yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """``configs/x.yaml:3:9: YAML syntax error: did not find expected ',' or ']'`` (one line)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults <- YAML file <- dotted overrides and validate.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``["ae.lr=1e-3", "resume=auto"]``.

    Raises:
        ConfigError: missing file, unknown key, wrong type or bad value, naming it.
    """
    schema = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            _path("--config", str(path))
            _check(path.is_file(), f"config file not found: {path}")
            size = path.stat().st_size
            _check(
                size <= CONFIG_FILE_LIMIT, f"{path} is {size} bytes, more than {CONFIG_FILE_LIMIT} (not a config file?)"
            )
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                raise ConfigError(_format_yaml_error(path, e)) from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
            _check(loaded is None or OmegaConf.is_dict(loaded), f"{path}: the top level must be a mapping")
            if loaded is not None:
                schema = OmegaConf.merge(schema, loaded)
        for item in overrides:
            _check(
                len(item) <= VALUE_LIMIT,
                f"override {shorten(item)} is {len(item)} characters long, more than {VALUE_LIMIT}",
            )
            _check(
                "=" in item and not item.startswith("="),
                f"override {shorten(item)} is not of the form key=value (e.g. ae.lr=1e-3)",
            )
        for item in overrides:  # one at a time, so that a parse error names its override
            try:
                schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"override {shorten(item)}: the value is not valid YAML ({problem})") from None
        _check_value_sizes(OmegaConf.to_container(schema, resolve=False))
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as e:
        raise ConfigError(cap_message(_format_omegaconf_error(e))) from None
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ checks wrapped by OmegaConf
        raise ConfigError(cap_message(str(e).splitlines()[0])) from None
    assert isinstance(cfg, Config)
    check_disk(cfg)
    return cfg


def _check_value_sizes(tree: Any, key: str = "") -> None:
    """Every string of the merged config at most VALUE_LIMIT characters (a 50 MB run.root is refused, not echoed)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_value_sizes(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        _check(len(tree) <= VALUE_LIMIT, f"{key} has {len(tree)} items, more than {VALUE_LIMIT}")
        for i, v in enumerate(tree):
            _check_value_sizes(v, f"{key}[{i}]")
    elif isinstance(tree, str):
        _check(
            len(tree) <= VALUE_LIMIT, f"{key} is {len(tree)} characters long, more than {VALUE_LIMIT}: {shorten(tree)}"
        )


def to_dict(cfg: Any) -> dict:
    """A dataclass (or mapping) as plain JSON types."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(data))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_digest(section: Any) -> str:
    """Stable short hash of a config section (what a checkpoint must agree with to resume)."""
    blob = json.dumps(to_dict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Config, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
