"""A shard server on loopback against what a network can send it: random bytes of every length,
long streams, truncated, stalled and replayed handshakes, hundreds of connections at once, wrong
and empty tokens, and a kill -9 with connections open. After each attack the server is alive,
serves a correct loader an exact epoch, and its open descriptors return to their baseline.
Two servers are attacked: `sluice serve` and a training process's Loader with
`distributed.listen`."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sluice
from conftest import N, config, split_shards

CLI = Path(__file__).resolve().parents[2] / "build" / "sluice"
TOKEN = "hostile-test-token"
CLIENT_HELLO = struct.pack("<IH", 0x31434C53, 1)  # magic "SLC1", handshake version 1
SERVER_HELLO_BYTES = 40
ACCEPT_BYTES = 56


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, timeout: float = 10.0) -> int:
    """The server's descriptor count once the connections of a finished epoch are closed: the
    same count read five times in a row, 20 ms apart."""
    deadline = time.monotonic() + timeout
    last, same = open_fds(pid), 0
    while same < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
        now = open_fds(pid)
        same = same + 1 if now == last else 0
        last = now
    return last


def drain_until_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Reads until the server closes the connection; fails the test if it does not in time."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


class Target:
    """A running shard server: its process, address and the dataset half a reader lacks."""

    def __init__(self, proc: subprocess.Popen, address: str, local: Path, odd: list[int]):
        self.proc, self.address, self.local, self.odd = proc, address, local, odd
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.baseline = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def epoch(self, token: str | None = TOKEN, address: str | None = None) -> list[int]:
        """One epoch of a loader that holds the even shards and reads the odd ones from here."""
        dist: dict = {"peers": [{"address": address or self.address, "shards": self.odd}],
                      "peer_timeout_ms": 5000}
        if token is not None:
            dist["token"] = token
        with sluice.Loader(config(self.local, drop_last=False), distributed=dist) as loader:
            seen: list[int] = []
            for batch in loader:
                seen += batch["index"][~batch["padding"]].tolist()
        return seen

    def check_healthy(self, what: str) -> None:
        assert self.alive(), f"server died after {what}"
        assert sorted(self.epoch()) == list(range(N)), f"wrong epoch after {what}"
        deadline = time.monotonic() + 10
        while open_fds(self.proc.pid) > self.baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds(self.proc.pid) <= self.baseline, (
            f"after {what}: {open_fds(self.proc.pid)} descriptors open, baseline {self.baseline}")

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=10)


def halves(full: Path, root: Path) -> tuple[Path, list[int]]:
    """A copy of the dataset holding only its even shards, and the odd shards' numbers."""
    local, _, _, odd = split_shards(full, root)
    return local, odd


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def start_cli(full: Path, port: int, token_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(CLI), "serve", str(full), "--listen", f"127.0.0.1:{port}", "--token-file",
         str(token_file), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


LOADER_SERVER = """
import sys, sluice
loader = sluice.Loader({"dataset": {"path": sys.argv[1]}, "batch_size": 32},
                       distributed={"listen": sys.argv[2], "token": sys.argv[3]})
print("serving", flush=True)
sys.stdin.read()
"""


@pytest.fixture(params=["sluice serve", "Loader distributed.listen"])
def target(request, mixed: Path, tmp_path: Path):
    local, odd = halves(mixed, tmp_path)
    port = free_port()
    if request.param == "sluice serve":
        if not CLI.exists():
            pytest.skip("no build/sluice (the CLI is built by scripts/test.sh)")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        proc = start_cli(mixed, port, token_file)
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", LOADER_SERVER, str(mixed), f"127.0.0.1:{port}", TOKEN],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_listening(proc, port)
    t = Target(proc, f"127.0.0.1:{port}", local, odd)
    assert sorted(t.epoch()) == list(range(N))
    t.baseline = settled_fds(proc.pid)
    yield t
    proc.kill()
    proc.wait()


def test_random_bytes_of_every_length(target: Target) -> None:
    rng = random.Random(17)
    for prefix in (b"", CLIENT_HELLO):  # garbage, and garbage behind a valid magic and version
        for n in range(0, 4097):
            s = target.connect()
            try:
                s.sendall(prefix + rng.randbytes(n))
                s.shutdown(socket.SHUT_WR)
                got = drain_until_closed(s)
            except (ConnectionResetError, BrokenPipeError, OSError) as e:
                assert not isinstance(e, TimeoutError), f"not closed: {len(prefix) + n} bytes"
                got = b""
            finally:
                s.close()
            # The server speaks first (its hello) and may say why it refuses; nothing else.
            assert len(got) <= SERVER_HELLO_BYTES + ACCEPT_BYTES + 512, (prefix, n, len(got))
    target.check_healthy("random bytes of every length 0-4096")


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """Every TCP port process `pid` listens on (its own and its UCX transports')."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for line in open(f"/proc/{pid}/net/tcp").readlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            ip, port = f[1].split(":")
            host = socket.inet_ntoa(bytes.fromhex(ip)[::-1])
            ports.append(("127.0.0.1" if host == "0.0.0.0" else host, int(port, 16)))
    return ports


def test_ucx_transport_ports_take_garbage(target: Target) -> None:
    """UCX's TCP transport listens on ports of its own (one per interface); they must take
    garbage too. Nothing there is sluice's parsing, but it is sluice's process."""
    rng = random.Random(20)
    ports = [p for p in listening_ports(target.proc.pid) if p[1] != target.port]
    assert ports, "no UCX transport port found"
    for host, port in ports:
        for n in list(range(0, 300)) + [4096, 100_000]:
            try:
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(rng.randbytes(n))
                s.close()
            except OSError:
                pass
    target.check_healthy("garbage to UCX's transport ports")


def test_long_streams(target: Target) -> None:
    rng = random.Random(18)
    for prefix in (b"", CLIENT_HELLO, CLIENT_HELLO + struct.pack("<HII", 0, 16 << 10, 0)):
        for _ in range(5):
            s = target.connect()
            try:
                s.sendall(prefix + rng.randbytes(100_000))
                drain_until_closed(s)
            except OSError as e:  # closed on us mid-stream: what should happen
                assert not isinstance(e, TimeoutError), "a 100 KB stream was not closed"
            finally:
                s.close()
    target.check_healthy("100 KB streams")


class Recorder:
    """A TCP relay in front of the server that keeps what clients send through it: a real
    client's handshake, to truncate and to replay."""

    def __init__(self, target: Target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            recorded = bytearray()
            self.sent.append(recorded)
            server = self.target.connect()
            server.settimeout(None)
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, recorded),
                             daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if keep is not None:
                    keep.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def recorded_handshake(target: Target) -> bytes:
    rec = Recorder(target)
    assert sorted(target.epoch(address=rec.address)) == list(range(N))
    assert rec.sent, "no client went through the relay"
    hello = bytes(rec.sent[0])
    assert hello[:6] == CLIENT_HELLO and len(hello) > 80, hello[:16]
    return hello


def test_truncated_and_replayed_handshakes(target: Target) -> None:
    hello = recorded_handshake(target)
    for cut in range(0, len(hello), 3):
        s = target.connect()
        assert len(s.recv(SERVER_HELLO_BYTES, socket.MSG_WAITALL)) == SERVER_HELLO_BYTES
        s.sendall(hello[:cut])
        s.shutdown(socket.SHUT_WR)
        drain_until_closed(s)
        s.close()
    target.check_healthy("truncated handshakes")
    # A recorded handshake does not prove the token again: the server's nonce is new.
    for _ in range(3):
        s = target.connect()
        assert len(s.recv(SERVER_HELLO_BYTES, socket.MSG_WAITALL)) == SERVER_HELLO_BYTES
        s.sendall(hello)
        answer = drain_until_closed(s)
        s.close()
        assert len(answer) >= ACCEPT_BYTES
        status = struct.unpack_from("<H", answer, 6)[0]
        assert status == 1, f"replayed handshake answered with status {status}"
        assert b"token mismatch" in answer[ACCEPT_BYTES:]
    target.check_healthy("replayed handshakes")


def test_stalled_handshakes_are_closed_at_the_deadline(target: Target) -> None:
    stalled = []
    for k in range(20):
        s = target.connect()
        s.sendall(CLIENT_HELLO[: k % 6])
        stalled.append(s)
    # Meanwhile a real client still gets in: stalled handshakes take only their share.
    assert sorted(target.epoch()) == list(range(N))
    start = time.monotonic()
    for s in stalled:
        drain_until_closed(s, timeout=15)  # closed by the server's handshake deadline (5 s)
        s.close()
    assert time.monotonic() - start < 12
    target.check_healthy("stalled handshakes")


def test_five_hundred_connections_at_once(target: Target) -> None:
    rng = random.Random(19)
    conns = []
    for k in range(500):
        try:
            s = target.connect()
        except OSError:
            continue  # the backlog may be full for a moment: that is the server shedding load
        if k % 2:
            try:
                s.sendall(rng.randbytes(k))
            except OSError:
                pass
        conns.append(s)
    assert len(conns) >= 100
    for s in conns:
        s.close()
    target.check_healthy("500 connections at once")


def test_wrong_and_missing_tokens_are_refused(target: Target,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TOKEN", raising=False)
    for token in ("not-the-token", None):
        with pytest.raises(ValueError, match="unauthorized"):
            target.epoch(token=token)
    target.check_healthy("wrong and missing tokens")


@pytest.mark.skipif(not CLI.exists(), reason="no build/sluice (the CLI is built by scripts/test.sh)")
def test_killed_with_connections_open_restarts_on_the_same_port_at_once(
        mixed: Path, tmp_path: Path) -> None:
    local, odd = halves(mixed, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    proc = start_cli(mixed, port, token_file)
    wait_listening(proc, port)
    t = Target(proc, f"127.0.0.1:{port}", local, odd)
    # Connections open at the kill: a loader mid-epoch and a few raw ones.
    raw = [t.connect() for _ in range(5)]
    dist = {"peers": [{"address": t.address, "shards": odd}], "token": TOKEN}
    loader = sluice.Loader(config(local, drop_last=False), distributed=dist)
    it = iter(loader)
    next(it)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    again = start_cli(mixed, port, token_file)
    try:
        line = again.stdout.readline()
        assert '"address"' in line, f"restart on port {port} failed (rc {again.poll()})"
        assert time.monotonic() - killed_at < 1.0
        t.proc = again
        assert sorted(t.epoch()) == list(range(N))
    finally:
        loader.close()
        for s in raw:
            s.close()
        again.kill()
        again.wait()


@pytest.mark.skipif(not CLI.exists(), reason="no build/sluice (the CLI is built by scripts/test.sh)")
def test_out_of_descriptors_sheds_new_connections_and_recovers(mixed: Path, tmp_path: Path) -> None:
    """At its descriptor limit the server closes new connections at once (a spare descriptor
    makes room to accept and close them), logs that at most once a second, and serves again as
    soon as the connections holding descriptors go."""
    import resource

    local, odd = halves(mixed, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    err = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen(
        [str(CLI), "serve", str(mixed), "--listen", f"127.0.0.1:{port}", "--token-file",
         str(token_file), "--json"],
        stdout=subprocess.PIPE, stderr=err, text=True)
    wait_listening(proc, port)
    t = Target(proc, f"127.0.0.1:{port}", local, odd)
    try:
        assert sorted(t.epoch()) == list(range(N))
        t.baseline = settled_fds(proc.pid)
        # Room for the server's own descriptors and a few clients, not for hundreds (and fewer
        # than its 64 handshakes: the descriptors run out first).
        limit = t.baseline + 24
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held = []
        for _ in range(300):  # handshakes that stall: each holds a descriptor until its deadline
            try:
                held.append(t.connect())
            except OSError:
                break
        # The stalled handshakes hold their descriptors until their deadline: wait it out.
        time.sleep(1.5)
        assert t.alive()
        assert open_fds(proc.pid) <= limit
        for s in held:
            s.close()
        t.check_healthy("running out of descriptors")
    finally:
        proc.kill()
        proc.wait()
        err.close()
    lines = (tmp_path / "serve.err").read_text().splitlines()
    assert any("out of file descriptors" in line for line in lines), lines[:5]
    assert len(lines) < 20, f"{len(lines)} log lines in a few seconds: {lines[:5]}"
