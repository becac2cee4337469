"""A web server run as a subprocess on loopback, and a proxy-free HTTP client for it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Loopback requests must never go through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    url: str, payload: Any = None, headers: dict[str, str] | None = None, timeout: float = 20
) -> tuple[int, bytes]:
    """GET ``url``, or POST ``payload`` as JSON; returns (status, body), 4xx/5xx included."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with _opener.open(req, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


class Server:
    """One server process: ``argv`` run from the repository root with ``env`` added.

    ``start()`` waits (up to a deadline) until ``ready_path`` answers 200;
    ``stop()`` always ends the process, politely first.  Its output goes to
    ``log`` so a failure can show it.
    """

    def __init__(self, argv: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str, deadline: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if request(self.url + ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"server not ready after {deadline} s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: gunicorn and Werkzeug shut down cleanly
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
