"""CURVE keys and the authenticator (``zmq.auth``).

``mpnp client keygen DIR`` writes ``server`` and ``client`` certificate pairs with
:func:`zmq.auth.create_certificates`; the daemon loads its secret certificate and authorizes
every public certificate found in ``security.client_keys_dir``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


def generate_keys(directory: str | os.PathLike[str], names: tuple[str, ...] = ("server", "client")
                  ) -> dict[str, tuple[Path, Path]]:
    """Create ``<name>.key`` (public) and ``<name>.key_secret`` for each name."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for name in names:
        public, secret = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret, 0o600)
        made[name] = (Path(public), Path(secret))
    return made


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate; clear error when unusable."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path}: {exc}") from exc
    if secret is None:
        raise ValueError(f"{path} holds no secret key; give the .key_secret file")
    return public, secret


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path}: {exc}") from exc
    return public


class CurveServer:
    """Runs the authenticator and configures server sockets."""

    def __init__(self, context: zmq.Context, secret_key_file: str, client_keys_dir: str) -> None:
        if not Path(client_keys_dir).is_dir():
            raise ValueError(f"security.client_keys_dir {client_keys_dir} is not a directory")
        self.public, self.secret = load_keypair(secret_key_file)
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(client_keys_dir))
        log.info("CURVE on: clients authorized from %s", client_keys_dir)

    def secure(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


def secure_client(socket: zmq.Socket, server_public_key: bytes, client_cert: str) -> None:
    public, secret = load_keypair(client_cert)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public_key
