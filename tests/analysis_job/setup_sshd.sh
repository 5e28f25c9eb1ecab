#!/usr/bin/env bash
# sshd on 127.0.0.1:22 for the Ray cluster launcher's local provider (cluster/ray/local.yaml).
#
#   tests/analysis_job/setup_sshd.sh          install (apt) if needed, configure, start; idempotent
#   tests/analysis_job/setup_sshd.sh stop     stop the sshd this script started (by its PID file)
#
# What it touches: its own folder $RAY_CI_SSHD_DIR (config, host key, PID file), the key
# ~/.ssh/ray_ci (+ .pub) and one line for it in ~/.ssh/authorized_keys, and one marked block in
# ~/.bashrc that puts $LATENT_SINDY_VENV/bin first on PATH *only* when that variable is set, which
# sshd does for sessions of the ray_ci key alone (authorized_keys environment=, allowed by our
# sshd's PermitUserEnvironment). `ray submit` runs `python ~/script.py` in such a login shell.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${LATENT_SINDY_VENV:-$REPO/.venv}
DIR=${RAY_CI_SSHD_DIR:-/tmp/latent-sindy-sshd}
KEY=$HOME/.ssh/ray_ci
PIDFILE=$DIR/sshd.pid

if [[ ${1:-start} == stop ]]; then
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        pid=$(cat "$PIDFILE")
        kill "$pid"
        echo "setup_sshd: stopped sshd $pid"
    fi
    exit 0
fi

if ! command -v /usr/sbin/sshd >/dev/null || ! command -v rsync >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openssh-server rsync >/dev/null
fi

mkdir -p "$DIR" "$HOME/.ssh" /run/sshd
chmod 700 "$HOME/.ssh"
[[ -f $DIR/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/host_ed25519"
[[ -f $KEY ]] || ssh-keygen -q -t ed25519 -N "" -C ray_ci -f "$KEY"
touch "$HOME/.ssh/authorized_keys"
chmod 600 "$HOME/.ssh/authorized_keys"
PUB=$(cut -d' ' -f1,2 "$KEY.pub")
grep -v -F "$PUB" "$HOME/.ssh/authorized_keys" > "$DIR/authorized_keys.tmp" || true
echo "environment=\"LATENT_SINDY_REPO=$REPO\",environment=\"LATENT_SINDY_VENV=$VENV\" $PUB ray_ci" >> "$DIR/authorized_keys.tmp"
cat "$DIR/authorized_keys.tmp" > "$HOME/.ssh/authorized_keys"
rm -f "$DIR/authorized_keys.tmp"

if ! grep -q ">>> latent-sindy ray_ci >>>" "$HOME/.bashrc" 2>/dev/null; then
    cat >> "$HOME/.bashrc" <<'RC'
# >>> latent-sindy ray_ci >>> (tests/analysis_job/setup_sshd.sh; only for the ray_ci ssh key)
if [ -n "${LATENT_SINDY_VENV:-}" ]; then export PATH="$LATENT_SINDY_VENV/bin:$PATH"; fi
# <<< latent-sindy ray_ci <<<
RC
fi

cat > "$DIR/sshd_config" <<CONF
Port 22
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $PIDFILE
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment LATENT_SINDY_*
AuthorizedKeysFile .ssh/authorized_keys
CONF

if ! { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }; then
    /usr/sbin/sshd -f "$DIR/sshd_config"
fi
for _ in $(seq 50); do
    if ssh -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
           -o LogLevel=ERROR root@127.0.0.1 'bash --login -c -i "command -v python"' 2>/dev/null | grep -q "$VENV/bin/python"; then
        echo "setup_sshd: sshd on 127.0.0.1:22 (pid $(cat "$PIDFILE")), key $KEY, PATH -> $VENV/bin"
        exit 0
    fi
    sleep 0.2
done
echo "setup_sshd: sshd did not accept the ray_ci key with $VENV/bin on PATH" >&2
exit 1
