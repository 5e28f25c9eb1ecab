"""Ray glue of the SINDy job: connecting, the trajectory actors, the statistics and fit tasks.

References:
    P. Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018
    (tasks, actors, the shared object store). The fit task runs analysis/sindy/dimension_fit.py (STLSQ,
    Brunton et al. 2016; threshold sweep; bagging after Fasel et al. 2022).

Fault tolerance: tasks are retried (``max_retries``) and actors restarted (``max_restarts`` with
``max_task_retries``), so a worker process killed mid-stage costs only its own task. Every task
writes its result atomically (trajectory blocks, per-dimension fit JSON), which is also what
lets a rerun resume a stage.

Test hook: with ``LATENT_SINDY_FAULT=kill-fit:<dim>`` the fit task of dimension <dim> SIGKILLs
its own process on its first attempt (a marker file in the fit folder remembers the attempt);
the retry must then finish the job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from analysis.sindy.block_stats import accumulate_block
from analysis.sindy.dimension_fit import fit_dimension
from configs.cli import UserError
from configs.io import atomic_write_text
from configs.progress import progress
from configs.stop import STOPS

REPO = Path(__file__).resolve().parents[2]  # analysis/job/ray_utils.py -> the repository
FAULT_ENV = "LATENT_SINDY_FAULT"
RETRIES = 3


def _ray():
    # optional heavy dependency: ray is imported only once the job talks to a cluster
    import ray

    return ray


# Joining: how long the TCP probe of the head's GCS port may take, and how long ray.init may then
# take to join (Ray itself retries an address that does not answer as a GCS for many minutes).
PROBE_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = 90.0
WAIT_POLL_S = 0.5  # how often wait_all returns to Python (stop signals are raised there)


def choose_address(address: str, env_address: str, submitted: bool) -> tuple[str, str]:
    """Which Ray the job uses: only one the user named, never one that merely runs on this machine.

    Args:
        address: sindy.ray_address: "" (decide from the environment), "local", "auto" or an address.
        env_address: $RAY_ADDRESS ("" when unset); ``ray job submit`` sets it for the driver.
        submitted: the script runs as the lone copy ``ray submit`` put on a cluster's head.

    Returns:
        (target, source): target "local" (start a private instance), "auto" (the cluster that
        ``ray start`` recorded on this node) or an address; source names where it came from.
    """
    if address:
        return address, "sindy.ray_address"
    if env_address:
        return env_address, "$RAY_ADDRESS"
    if submitted:
        return "auto", "ray submit"
    return "local", ""


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _probe(address: str, source: str) -> None:
    """Fail in seconds, with one line, when nothing listens at the address (ray.init would hang)."""

    hp = _host_port(address)
    if hp is None:
        raise UserError(
            f"{source}={address!r} is not a Ray address: use HOST:PORT (the head's GCS port, "
            "6379 by default), ray://HOST:PORT, auto (this node's `ray start`) or local"
        )
    targets = [hp]
    if not address.startswith("ray://"):
        try:  # Ray reaches 127.0.0.1/localhost through this node's IP: probe what it will dial too
            # optional heavy dependency: ray internals, only where Ray is joined
            from ray._private.services import resolve_ip_for_localhost

            ip = resolve_ip_for_localhost(hp[0])
            if ip != hp[0]:
                targets.append((ip, hp[1]))
        except Exception:  # private API moved: the plain probe still bounds the common case
            pass
    for host, port in targets:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
            raise UserError(
                f"no Ray cluster answers at {source}={address} ({host}:{port}: {why}); start it, or "
                "name a running one (sindy.ray_address=HOST:PORT, or local for a private instance)"
            ) from None


def _auto_address(source: str) -> str:
    """The GCS address the last ``ray start --head`` on this node recorded (/tmp/ray/ray_current_cluster).

    Resolved here rather than by ray.init(address="auto"), which falls back to any GCS process it
    finds on the machine, another user's private ray.init() included.
    """
    try:
        # optional heavy dependency: ray internals, only where Ray is joined
        from ray._private.utils import read_ray_address

        found = read_ray_address(None)
    except Exception:  # private API moved: read the file ray start writes
        f = Path("/tmp/ray/ray_current_cluster")
        found = f.read_text().strip() if f.is_file() else None
    if not found:
        raise UserError(
            f"{source}: address=auto, but no `ray start --head` on this node recorded its address "
            "(/tmp/ray/ray_current_cluster); start the cluster first or pass sindy.ray_address=HOST:PORT"
        )
    return found


def _give_up(message: str) -> None:
    # ray.init cannot be interrupted from Python while it waits for a GCS, and nothing has been
    # started yet that would need cleaning up: exit the way run_cli does.
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def connect(address: str, num_cpus: int, submitted: bool = False) -> str:
    """Join the Ray cluster the user named, or start a private instance; returns how (for the log and report).

    Only a cluster the user named is joined (:func:`choose_address`): sindy.ray_address, else
    $RAY_ADDRESS (``ray job submit``), else, under ``ray submit``, the head's own cluster. Otherwise
    (and with "local" even when $RAY_ADDRESS is set) a private instance is started with
    ray.init(address="local"), which never attaches to another process's instance. Before
    joining, the address is probed (PROBE_TIMEOUT_S) and ray.init is given JOIN_TIMEOUT_S.

    Args:
        address: sindy.ray_address ("", "local", "auto", HOST:PORT or ray://HOST:PORT).
        num_cpus: CPUs of a private instance (0: all).
        submitted: the script runs as the copy ``ray submit`` put on the head.

    Raises:
        UserError: an unparsable or unreachable address, or no ``ray start`` head for "auto".
    """
    target, source = choose_address(address, os.environ.get("RAY_ADDRESS", ""), submitted)
    if target != "local" and "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
        # Ray 2.60 starts clusters with token auth once ~/.ray/auth_token exists, but a client
        # given an explicit address does not pick the token up by itself (read at import).
        os.environ["RAY_AUTH_MODE"] = "token"
    ray = _ray()
    if ray.is_initialized():
        return "already connected"
    # Workers import analysis.*: put the repository on their path, and forward the test hook.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    runtime_env = {"env_vars": env}
    if target == "local":
        # $RAY_ADDRESS names another cluster: drop it from this process (the instance's raylet and
        # workers inherit the environment, and Ray APIs read it) so that nothing here talks to it.
        os.environ.pop("RAY_ADDRESS", None)
        kw = {"num_cpus": num_cpus} if num_cpus > 0 else {}
        try:
            ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **kw)
        except Exception as e:  # Ray's own: a start timeout on a loaded machine, a socket path too long, ...
            ray.shutdown()  # what did start
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not start a private Ray instance: {first[:300]}; on a loaded machine retry later or lower "
                "sindy.num_cpus, or join a running cluster with sindy.ray_address"
            ) from None
        return f"started a private Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    resolved = _auto_address(source) if target == "auto" else target
    _probe(resolved, source)

    timer = threading.Timer(
        JOIN_TIMEOUT_S,
        _give_up,
        args=(
            f"could not join Ray at {source}={resolved} within {JOIN_TIMEOUT_S:.0f} s (the port answers, "
            "but not as a Ray head's GCS?); check the address",
        ),
    )
    timer.daemon = True
    timer.start()
    try:
        ray.init(address=resolved, runtime_env=runtime_env, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(
            f"could not join Ray at {source}={resolved}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None
    finally:
        timer.cancel()
    if source == "$RAY_ADDRESS":
        return f"joined $RAY_ADDRESS={target}"
    if target == "auto":
        via = (
            "the cluster this job was submitted to with ray submit"
            if source == "ray submit"
            else "this node's ray start"
        )
        return f"joined {via} (address=auto: {resolved})"
    return f"joined {resolved}"


def wait_all(refs: list, desc: str) -> list:
    """ray.get every ref, with progress over finished tasks (a bar on a terminal, plain lines every
    10% in a Slurm log or file: configs.progress); results in submission order."""

    ray = _ray()
    pending, done = list(refs), {}
    with progress(len(refs), desc, unit="tasks") as bar:
        while pending:
            # Ray's wait runs Python signal handlers inside its C++ loop: a stop signal is only recorded
            # there and raised here (configs/stop.py); the timeout bounds how long that takes.
            with STOPS.deferred():
                ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_POLL_S)
            for r in ready:
                try:
                    done[r] = ray.get(r)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, UserError):  # a task's expected failure: its own one line
                        raise UserError(str(e.cause).strip().splitlines()[0]) from None
                    raise
                bar.update(1)
    return [done[r] for r in refs]


# ----------------------------------------------------------------------------- stage 1


class TrajectoryWorker:
    """One per GPU (or per CPU): loads the EMA DiT once and generates whole blocks."""

    def __init__(self, run_dir: str, device: str, threads: int):
        # Ray worker: imported in the actor's process when Ray unpickles it
        import torch

        # Ray worker: imported in the actor's process when Ray unpickles it
        from models.artifacts import load_denoiser

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.device, self.run_dir, self.train = device, Path(run_dir), None
        self.model, self.schedule, self.meta = load_denoiser(Path(run_dir), device, ema=True)

    def generate(self, folder: str, block: int, count: int, sampler: str, seed: int, meta: dict) -> str:
        # Ray worker: imported in the actor's process when Ray unpickles it
        from analysis.job.trajectories import block_is_complete, block_name, generate_block, write_block

        path = Path(folder) / block_name(block, count)
        expect = {**meta, "block": block, "count": count}
        if block_is_complete(path, expect):
            return str(path)
        tensors = generate_block(
            self.model, self.schedule, tuple(self.meta["latent_shape"]), sampler, seed, block, count, self.device
        )
        return str(write_block(Path(folder), block, tensors, meta))

    def forward(self, folder: str, block: int, count: int, sampler: str, seed: int, meta: dict) -> str:
        """A block of forward-noised training latents labelled by the DiT (analysis/job/queries.py)."""
        # Ray worker: imported in the actor's process when Ray unpickles it
        from analysis.job.queries import forward_block

        # Ray worker: imported in the actor's process when Ray unpickles it
        from analysis.job.trajectories import block_is_complete, block_name, write_block

        # Ray worker: imported in the actor's process when Ray unpickles it
        from models.artifacts import load_latent_data

        path = Path(folder) / block_name(block, count)
        if block_is_complete(path, {**meta, "block": block, "count": count}):
            return str(path)
        if self.train is None:  # loaded once per actor, on its first forward block
            self.train = load_latent_data(self.run_dir, self.meta["kind"]).train
        tensors = forward_block(self.model, self.schedule, self.train, sampler, seed, block, count)
        return str(write_block(Path(folder), block, tensors, meta))


def trajectory_actor_class(num_gpus: int):
    ray = _ray()
    return ray.remote(num_cpus=0 if num_gpus else 1, num_gpus=num_gpus, max_restarts=RETRIES, max_task_retries=RETRIES)(
        TrajectoryWorker
    )


# ----------------------------------------------------------------------------- statistics


def accumulate_task(num_gpus: int):
    ray = _ray()
    return ray.remote(num_gpus=num_gpus, max_retries=RETRIES)(accumulate_block)  # the engine's function, run by Ray


# ----------------------------------------------------------------------------- stage 2


def _maybe_fault(dim: int, out_dir: Path) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec != f"kill-fit:{dim}":
        return
    marker = out_dir / f".fault-attempted-{dim}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def fit_dimension_task(
    dim: int, train, heldout, groups: list, settings, out_path: str, windows: list | None = None
) -> dict:
    """analysis.sindy.dimension_fit.fit_dimension behind the fault-injection test hook; writes its JSON atomically."""
    _maybe_fault(dim, Path(out_path).parent)
    result = fit_dimension(dim, train, heldout, groups, settings, windows)
    atomic_write_text(out_path, json.dumps(result, indent=1))
    return result


def fit_task():
    ray = _ray()
    return ray.remote(num_cpus=1, max_retries=RETRIES)(fit_dimension_task)
