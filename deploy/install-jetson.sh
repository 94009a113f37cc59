#!/usr/bin/env bash
# Install the mPnP daemon on a Jetson (AGX Orin, JetPack 6) as a systemd service.
#
#   sudo deploy/install-jetson.sh            # install / upgrade
#   sudo DRY_RUN=1 deploy/install-jetson.sh  # print the steps only
#
# PyTorch, torchvision and onnxruntime-gpu have no CUDA wheels for Jetson on PyPI: they come
# from the jetson-ai-lab index for the JetPack / CUDA version (override JETSON_INDEX when your
# JetPack differs). jetson-stats provides the root jtop.service the power monitor talks to.
set -euo pipefail

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/mpnp}"
VENV="${PREFIX}/venv"
CONF_DIR="${CONF_DIR:-/etc/mpnp}"
STATE_DIR="${STATE_DIR:-/var/lib/mpnp}"
SERVICE_USER="${SERVICE_USER:-mpnp}"
CONFIG_TEMPLATE="${CONFIG_TEMPLATE:-${SRC_DIR}/deploy/config/orin-agx-64gb.toml}"
JETSON_INDEX="${JETSON_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}"
DRY_RUN="${DRY_RUN:-0}"

run() {
    echo "+ $*"
    if [[ "${DRY_RUN}" != "1" ]]; then
        "$@"
    fi
}

die() { echo "install-jetson: $*" >&2; exit 1; }

if [[ "${DRY_RUN}" != "1" ]]; then
    [[ "$(id -u)" == "0" ]] || die "run as root (sudo)"
    [[ -f /etc/nv_tegra_release ]] || die "not a Jetson (/etc/nv_tegra_release missing)"
    grep -q "R36" /etc/nv_tegra_release || echo "warning: not L4T R36 (JetPack 6);" \
        "set JETSON_INDEX for your JetPack" >&2
fi

# 1. System packages and jetson-stats (installs and starts the root jtop.service).
run apt-get update
run apt-get install -y python3-venv python3-pip libopenblas0
run pip3 install -U jetson-stats
run systemctl enable --now jtop.service

# 2. Service user with GPU (video, render) and jtop access.
if ! id "${SERVICE_USER}" >/dev/null 2>&1; then
    run useradd --system --home-dir "${STATE_DIR}" --shell /usr/sbin/nologin "${SERVICE_USER}"
fi
run usermod -aG video,render,jtop "${SERVICE_USER}"

# 3. Virtual environment: Jetson wheels first, then mPnP (its PyPI onnxruntime is replaced by
#    the GPU build, which provides the same module).
run mkdir -p "${PREFIX}"
run python3 -m venv "${VENV}"
run "${VENV}/bin/pip" install -U pip wheel
run "${VENV}/bin/pip" install --index-url "${JETSON_INDEX}" \
    --extra-index-url https://pypi.org/simple torch torchvision onnxruntime-gpu
run "${VENV}/bin/pip" install "${SRC_DIR}[model,jetson]"
run "${VENV}/bin/pip" uninstall -y onnxruntime
run "${VENV}/bin/pip" install --force-reinstall --no-deps --index-url "${JETSON_INDEX}" \
    onnxruntime-gpu
run "${VENV}/bin/python" -c "import torch, onnxruntime as ort; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); \
print('onnxruntime', ort.__version__, ort.get_available_providers())"

# 4. Config (kept when present), CURVE keys, state directory.
run mkdir -p "${CONF_DIR}" "${STATE_DIR}"
if [[ ! -f "${CONF_DIR}/daemon.toml" ]]; then
    run install -m 0640 -g "${SERVICE_USER}" "${CONFIG_TEMPLATE}" "${CONF_DIR}/daemon.toml"
fi
if [[ ! -d "${CONF_DIR}/curve" ]]; then
    run "${VENV}/bin/mpnp" client keygen "${CONF_DIR}/curve"
    run mkdir -p "${CONF_DIR}/curve/authorized"
    run cp "${CONF_DIR}/curve/client.key" "${CONF_DIR}/curve/authorized/"
    run chown -R "root:${SERVICE_USER}" "${CONF_DIR}/curve"
    run chmod -R g+rX,o-rwx "${CONF_DIR}/curve"
fi
run chown -R "${SERVICE_USER}:${SERVICE_USER}" "${STATE_DIR}"
run "${VENV}/bin/mpnp" daemon --config "${CONF_DIR}/daemon.toml" --check

# 5. The LLM and the offline stage, as the service user into its MPNP_HOME, before the first
#    start: the daemon loads the prepared encoders and day state (without them the first
#    start would run the whole offline stage inside systemd's TimeoutStartSec). Both steps
#    are idempotent: an upgrade reuses what is there.
as_service() { run runuser -u "${SERVICE_USER}" -- env MPNP_HOME="${STATE_DIR}" "$@"; }
as_service "${VENV}/bin/mpnp" llm fetch
as_service "${VENV}/bin/mpnp" prepare --no-progress

# 6. The service.
run install -m 0644 "${SRC_DIR}/deploy/mpnp-daemon.service" /etc/systemd/system/mpnp-daemon.service
run systemctl daemon-reload
run systemctl enable --now mpnp-daemon.service
echo "installed: systemctl status mpnp-daemon; journalctl -u mpnp-daemon -f"
