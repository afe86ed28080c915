"""``cxrexp server``: one ``mlflow server`` for a team, started, waited for, and its URI printed.

The command is built by a pure function (``server_command``) so that what runs is what the docs and
the tests say; ``serve`` starts it, polls ``/health`` until it answers (or the process dies, whose
last lines are then shown), prints the ``MLFLOW_TRACKING_URI`` clients set, and stays in the
foreground until Ctrl-C or SIGTERM, which it passes on. Artifacts are proxied
(``--artifacts-destination``): clients read and write them through the server, never from a path on
the machine that logged them. The backend URI is shown redacted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cxrexp.config import ServerConfig
from cxrexp.credentials import redact
from cxrexp.errors import UserError

HEALTH_PATH = "/health"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's auth app: the first admin's password


class ServerDidNotStart(UserError):
    """``mlflow server`` exited, or did not answer in time; the message has its last lines."""


def server_command(cfg: ServerConfig, python: str = sys.executable) -> list[str]:
    """The ``mlflow server`` command line for ``cfg`` (artifacts proxied through the server)."""
    destination = cfg.artifacts_destination
    if "://" not in destination:  # a local folder: absolute, so the server's working folder does not matter
        destination = str(Path(destination).expanduser().resolve())
    command = [python, "-m", "mlflow", "server", "--backend-store-uri", cfg.backend_store_uri,
               "--artifacts-destination", destination, "--serve-artifacts", "--host", cfg.host,
               "--port", str(cfg.port), "--workers", str(cfg.workers)]
    if cfg.basic_auth:
        command += ["--app-name", "basic-auth"]
    return command


def tracking_uri(cfg: ServerConfig) -> str:
    """What clients put in ``MLFLOW_TRACKING_URI``."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + HEALTH_PATH, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_basic_auth(cfg: ServerConfig, environ: dict[str, str] | None = None) -> None:
    """With ``basic_auth``: MLflow's auth app must be installed and given the first admin password.

    MLflow 3 ships no default admin password: on an empty user store the auth app creates ``admin``
    with ``MLFLOW_AUTH_ADMIN_PASSWORD`` (or the config file's ``admin_password``) and refuses to start
    without one. Said here, before anything starts, with what to do.
    """
    if not cfg.basic_auth:
        return
    import importlib.util

    environ = dict(os.environ) if environ is None else environ
    if importlib.util.find_spec("flask_wtf") is None:
        raise UserError("--basic-auth needs MLflow's auth app: pip install 'mlflow[auth]'")
    if not environ.get(ADMIN_PASSWORD_ENV) and not environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        raise UserError(f"--basic-auth: set {ADMIN_PASSWORD_ENV} to the first admin password (user 'admin') "
                        "before the first start, or MLFLOW_AUTH_CONFIG_PATH to a basic_auth.ini that sets "
                        "admin_password; it is only read while no user exists (docs/team.md)")


def start(cfg: ServerConfig, log_path: Path) -> subprocess.Popen:
    """Start the server with its output in ``log_path``; returns once ``/health`` answers.

    Raises ``ServerDidNotStart`` with the log's last lines if the process exits or ``cfg.wait``
    seconds pass first (the process is stopped then).
    """
    check_basic_auth(cfg)
    with open(log_path, "ab") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(server_command(cfg), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = tracking_uri(cfg)
    deadline = time.monotonic() + cfg.wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(uri):
            return proc
        time.sleep(0.5)
    stop(proc)
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    state = f"exited with {proc.returncode}" if proc.returncode is not None else f"did not answer within {cfg.wait} s"
    raise ServerDidNotStart(
        f"mlflow server on {uri} (backend {redact(cfg.backend_store_uri)}) {state}; its last lines "
        f"({log_path}):\n" + "\n".join(tail))


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group (its gunicorn/uvicorn workers too), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def serve(cfg: ServerConfig, log_path: Path = Path("mlflow-server.log")) -> int:
    """Start, announce, and keep the server until Ctrl-C / SIGTERM; returns its exit code."""
    from cxrexp.mlflow_edge.signals import sigterm_as_interrupt

    proc = start(cfg, log_path)
    uri = tracking_uri(cfg)
    print(f"mlflow server answering on {uri} (backend {redact(cfg.backend_store_uri)}, artifacts "
          f"{cfg.artifacts_destination} through the server{', basic auth on' if cfg.basic_auth else ''}); "
          f"log: {log_path}")
    print(f"on every client machine:  export MLFLOW_TRACKING_URI={uri}")
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {cfg.host}, reachable from other machines"
              + ("" if cfg.basic_auth else "; without --basic-auth anyone who reaches it can read and change every run"))
    try:
        with sigterm_as_interrupt():
            return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0


__all__ = ["ServerDidNotStart", "serve", "server_command", "start", "stop", "tracking_uri"]
