"""Real redis-server processes: one server, and a 3-master cluster.

Each listens on a free loopback port with persistence off (unless asked
for), in a directory of its own.  The tests stop theirs when the test
session ends; ``benchmarks/redis_bench.py`` starts one the same way.
Without the ``redis-server`` binary a test that needs one skips saying so,
except in CI (``CI=1``), where it fails: CI must never skip them.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVER = shutil.which("redis-server")
CLI = shutil.which("redis-cli")


def need_binaries() -> None:
    """Skip (fail in CI) unless redis-server and redis-cli are installed."""
    if SERVER and CLI:
        return
    import pytest

    message = "needs redis-server and redis-cli: apt-get install redis-server"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, its bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(1000):
        port = random.randrange(20000, 40000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server on 127.0.0.1:``port``, in ``directory``."""

    def __init__(
        self, directory: Path, *, cluster: bool = False, persistent: bool = False, binary: str | None = None
    ) -> None:
        if binary is None:
            need_binaries()
        self.binary = binary or str(SERVER)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.persistent = persistent
        self.port = free_port(cluster)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def args(self) -> list[str]:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.persistent:  # every write on disk before it is acknowledged
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        return args

    def start(self) -> None:
        for attempt in range(5):
            self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while True:
                if self.ping():
                    return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            log_file = self.directory / "redis.log"
            log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            self.stop(kill=True)
            # Another run on this machine (the reruns under other Pythons run
            # beside this one) took the port between free_port() and the bind.
            if "already in use" not in log or attempt == 4:
                raise RuntimeError(f"redis-server on port {self.port} did not start: {log}")
            self.port = free_port(self.cluster)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(CLI), "-p", str(self.port), *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class RedisCluster:
    """Three redis-server masters joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path) -> None:
        need_binaries()
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(3)]
        try:
            subprocess.run(
                [str(CLI), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, seconds: float = 30) -> None:
        """Wait until every node reports the cluster ok."""
        deadline = time.monotonic() + seconds
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def client(self, **options: Any) -> Any:
        from redis.cluster import RedisCluster as Client

        return Client(host="127.0.0.1", port=self.nodes[0].port, **options)

    def flush(self) -> None:
        for node in self.nodes:
            node.cli("flushall")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def temporary_directory(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"sessionkit-{name}-"))
