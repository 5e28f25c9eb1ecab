"""The Ray cluster YAMLs pass Ray's own validation (its JSON schema, ray/autoscaler/ray-schema.json),
and the user template keeps its promises: one shared path, every node listed, no CI key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
util = pytest.importorskip("ray.autoscaler._private.util")


@pytest.mark.parametrize("name", ["nodes.yaml", "local.yaml"])
def test_valid_for_ray(name):
    config = util.prepare_config(yaml.safe_load((REPO / "cluster" / "ray" / name).read_text()))
    util.validate_config(config)  # raises jsonschema.ValidationError on a bad file


def test_a_typo_is_caught_by_the_schema():
    config = yaml.safe_load((REPO / "cluster" / "ray" / "nodes.yaml").read_text())
    config["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        util.validate_config(util.prepare_config(config))


def test_template_for_your_own_nodes():
    text = (REPO / "cluster" / "ray" / "nodes.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["max_workers"] == len(config["provider"]["worker_ips"])
    assert "ray_ci" not in text and config["auth"]["ssh_user"] != "root"
    setup = " ".join(config["setup_commands"])
    assert "/shared/latent-sindy/.venv/bin" in setup and "LATENT_SINDY_REPO=/shared/latent-sindy" in setup
    # The commands quoted in its header name files that exist.
    for path in ("analysis/sindy_job.py", "configs/local.yaml", "cluster/ray/nodes.yaml"):
        assert path in text and (REPO / path).is_file()
