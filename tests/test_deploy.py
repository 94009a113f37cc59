"""Every shipped deploy config loads and validates; the systemd unit and the install script
carry what a Jetson service needs."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import DaemonConfig, endpoint_is_local, load_config
from policies.context import create_policy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIGS = sorted((DEPLOY / "config").glob("*.toml")) + sorted((DEPLOY / "config").glob("*.json"))


def test_the_expected_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"orin-agx-64gb.toml", "dev.toml"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, DaemonConfig)
    create_policy(config.policy.name, **config.policy.options)
    assert config.adaptation.planner().target_steps >= config.adaptation.min_steps
    for name in ("ingest", "query", "events"):
        endpoint = getattr(config.endpoints, name)
        assert endpoint_is_local(endpoint) or config.security.curve, (path.name, endpoint)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_passes_the_daemon_check_command(path):
    result = subprocess.run([sys.executable, "-m", "daemon", "--config", str(path), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_config_loading_does_not_import_torch(tmp_path):
    code = ("import sys; from daemon.config import load_config; "
            f"load_config({str(DEPLOY / 'config' / 'dev.toml')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_bad_backend_options_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nbackend = "mpnp"\noptions = { lmm = "x" }\n')
    with pytest.raises(ValueError, match="model.*options.*lmm"):
        load_config(bad)
    bad.write_text('[model]\nbackend = "mpnp"\noptions = { dtype = "int3" }\n')
    with pytest.raises(ValueError, match="dtype"):
        load_config(bad)


def test_a_broken_config_is_refused_with_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((DEPLOY / "config" / "dev.toml").read_text() + "\n[limits]\nmax_batch = 0\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*limits.*max_batch"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[adaptation]\ntarget_step = 3\n")
    with pytest.raises(ValueError, match="unknown keys.*target_step"):
        load_config(typo)


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep case
    parser.read(DEPLOY / "mpnp-daemon.service")
    return parser


def test_systemd_unit_is_notify_with_watchdog_restart_and_non_root_user():
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")
    assert {"video", "render", "jtop"} <= set(service["SupplementaryGroups"].split())
    assert "jtop.service" in unit["Unit"]["After"].split()
    assert "mpnp" in service["ExecStart"] and "daemon --config" in service["ExecStart"]
    config_path = service["ExecStart"].split("--config")[1].split()[0]
    assert config_path.startswith("/etc/")


def test_install_script_parses_and_dry_runs():
    script = DEPLOY / "install-jetson.sh"
    assert os.access(script, os.X_OK) or script.read_text().startswith("#!/")
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    result = subprocess.run(["bash", str(script)], env={**os.environ, "DRY_RUN": "1"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("jetson-stats", "usermod -aG video,render,jtop", "mpnp-daemon.service",
                 "systemctl enable --now mpnp-daemon.service", "--check", "[model,jetson]"):
        assert step in out, step
    # the LLM is fetched and the offline stage run, as the service user, before the start
    fetch, prepare = out.index("mpnp llm fetch"), out.index("mpnp prepare")
    assert fetch < prepare < out.index("systemctl enable --now mpnp-daemon.service")
    assert "runuser -u mpnp -- env MPNP_HOME=/var/lib/mpnp" in out[fetch - 80:fetch]
