"""`kdbench ui`: the MLflow UI on the tracking store, until Ctrl-C."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import click

from kdbench.cli.options import tracking_option, tracking_uri_or_default
from kdbench.errors import KdbenchError


@click.command("ui")
@click.option("--port", type=int, default=None, help="Port [default: a free one].")
@click.option("--host", default="127.0.0.1", show_default=True)
@tracking_option
def ui_cmd(port, host, tracking_uri):
    """Start the MLflow UI on the tracking store and print its URL (Ctrl-C stops it).
    Filter a leaderboard's runs with  tags.leaderboard = 'NAME'."""
    uri = tracking_uri_or_default(tracking_uri)
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd)
    try:
        if not wait_for_port(host, port, 120, server):
            raise KdbenchError(f"the MLflow UI did not start (exit {server.poll()}): {' '.join(cmd)}")
        click.echo(f"MLflow UI: http://{host}:{port}  (store {uri}; filter runs: tags.leaderboard = 'NAME')")
        sys.stdout.flush()
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(server)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc=None) -> bool:
    """Whether ``host:port`` accepts connections within ``timeout`` seconds (False at once if
    ``proc`` exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
