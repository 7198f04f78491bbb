"""The emulated network: the relay forwards bytes unchanged both ways, holds them for the delay
it is given, paces them at its rate (shared by every connection over one link), and closes both
sides when one closes; rounds over it cost what the links say; the ``network`` and ``accuracy``
sections print their tables.

Wall times are only ever bounded from below (what the emulation must at least cost): the
machine is shared, so an upper bound would fail for reasons of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from simulation.benchmark.network import (
    VARIANTS,
    EmulatedNetwork,
    Link,
    LinkProfile,
    LinkRun,
    Relay,
    Task,
    Variant,
    kernel_shaping,
    relay_rate_check,
)

TIMEOUT = 30.0
"""Seconds a socket waits before a test gives up (a hang, not a slow machine)."""


class Peer:
    """A server on loopback that accepts one connection at a time for the test to drive."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"

    def accept(self) -> socket.socket:
        sock, _ = self.listener.accept()
        sock.settimeout(TIMEOUT)
        return sock

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def peer():
    server = Peer()
    yield server
    server.close()


def dial(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def echo(sock: socket.socket, n: int) -> None:
    """Send back the first ``n`` bytes received."""
    sock.sendall(receive(sock, n))


@pytest.mark.parametrize(
    ("delay", "rate"), [(0.0, None), (0.002, 200e6)], ids=["no-delay", "delayed-paced"]
)
def test_relay_forwards_bytes_unchanged_in_both_directions(peer, delay, rate) -> None:
    up, down = os.urandom(3_000_000), os.urandom(1_000_001)
    with Relay(target=peer.address, delay=delay, rate=rate) as relay:
        client = dial(str(relay.address))
        server = peer.accept()
        received: dict[str, bytes] = {}
        reader = threading.Thread(target=lambda: received.update(up=receive(server, len(up))))
        reader.start()
        client.sendall(up)
        reader.join(TIMEOUT)
        server.sendall(down)
        assert receive(client, len(down)) == down
        assert received["up"] == up
        assert relay.link.up.bytes == len(up)
        assert relay.link.down.bytes == len(down)
        client.close()
        server.close()


def test_relay_holds_each_direction_for_the_delay_and_the_handshake(peer) -> None:
    delay = 0.04
    with Relay(target=peer.address, delay=delay) as relay:
        dialled = time.perf_counter()  # the handshake's hold starts here, not at the first send
        client = dial(str(relay.address))
        server = peer.accept()
        threading.Thread(target=lambda: [echo(server, 5) for _ in range(4)], daemon=True).start()
        times = []
        for exchange in range(4):
            started = dialled if exchange == 0 else time.perf_counter()
            client.sendall(b"hello")
            assert receive(client, 5) == b"hello"
            times.append(time.perf_counter() - started)
        client.close()
    # From the dial, the first exchange also waits out TCP's handshake (one round trip); the
    # others one round trip each: the delay both ways.
    assert times[0] >= 4 * delay
    assert min(times[1:]) >= 2 * delay


def test_relay_without_handshake_holds_the_first_bytes_for_the_delay_alone(peer) -> None:
    delay = 0.05
    with Relay(target=peer.address, delay=delay, handshake=False) as relay:
        client = dial(str(relay.address))
        server = peer.accept()
        started = time.perf_counter()
        client.sendall(b"x")
        assert receive(server, 1) == b"x"
        assert time.perf_counter() - started >= delay
        client.close()
        server.close()


def test_relay_limits_the_rate() -> None:
    nbytes, rate = 250_000, 8e6
    assert relay_rate_check(nbytes=nbytes, rate=rate) >= nbytes * 8 / rate


def test_connections_over_one_link_share_its_rate(peer) -> None:
    """Two connections of one client (two relays, one link) move 2N bytes in at least 2N*8/R:
    the rate is the link's, not each connection's."""
    nbytes, rate = 150_000, 8e6
    link = Link(rate=rate)
    with (
        Relay(target=peer.address, link=link, handshake=False) as first,
        Relay(target=peer.address, link=link, handshake=False) as second,
    ):
        clients = [dial(str(first.address)), dial(str(second.address))]
        servers = [peer.accept(), peer.accept()]
        started = time.perf_counter()
        for client in clients:
            threading.Thread(target=client.sendall, args=(bytes(nbytes),), daemon=True).start()
        got = [receive(server, nbytes) for server in servers]
        seconds = time.perf_counter() - started
        assert [len(g) for g in got] == [nbytes, nbytes]
        assert seconds >= 2 * nbytes * 8 / rate
        assert link.up.bytes == 2 * nbytes
        for sock in (*clients, *servers):
            sock.close()


@pytest.mark.parametrize("closing", ["client", "server"])
def test_relay_closes_both_sides_when_one_side_closes(peer, closing) -> None:
    with Relay(target=peer.address, delay=0.01) as relay:
        client = dial(str(relay.address))
        server = peer.accept()
        client.sendall(b"ping")
        assert receive(server, 4) == b"ping"
        closer, other = (client, server) if closing == "client" else (server, client)
        closer.close()
        assert other.recv(1) == b""  # the end of the stream, not a timeout
        deadline = time.monotonic() + TIMEOUT
        while relay.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.open_connections == 0
        other.close()


def test_closing_the_relay_ends_its_connections_and_stops_listening(peer) -> None:
    relay = Relay(target=peer.address)
    address = relay.start()
    client = dial(address)
    server = peer.accept()
    relay.close()
    assert server.recv(1) == b""
    assert client.recv(1) == b""
    with pytest.raises(OSError):
        dial(address).recv(1)
    client.close()
    server.close()


def test_links_and_relays_refuse_what_makes_no_sense() -> None:
    with pytest.raises(ValueError, match="delay"):
        Link(delay=-0.01)
    with pytest.raises(ValueError, match="rate"):
        Link(rate=0)
    with pytest.raises(ValueError, match="not both"):
        Relay(target="127.0.0.1:1", link=Link(), delay=0.1)
    with pytest.raises(ValueError, match="host:port"):
        Relay(target="localhost")


def test_the_emulated_network_process_delays_counts_and_changes_links(peer) -> None:
    with EmulatedNetwork() as network:
        link = network.add_link(delay=0.03, rate=None)
        address = network.add_relay(target=peer.address, link=link, handshake=False)
        client = dial(address)
        server = peer.accept()
        started = time.perf_counter()
        client.sendall(b"abc")
        assert receive(server, 3) == b"abc"
        assert time.perf_counter() - started >= 0.03
        network.set_link(link, delay=0.08, rate=None)
        started = time.perf_counter()
        server.sendall(b"defg")
        assert receive(client, 4) == b"defg"
        assert time.perf_counter() - started >= 0.08
        assert network.link_bytes(link) == 7
        network.reset_counters(link)
        assert network.link_bytes(link) == 0
        with pytest.raises(RuntimeError, match="refused"):
            network.set_link(link, delay=-1, rate=None)
        client.close()
        server.close()


def test_kernel_shaping_says_what_the_benchmark_uses() -> None:
    shaping = kernel_shaping()
    text = shaping.describe()
    if shaping.usable:
        assert shaping.namespaces and shaping.rate and shaping.delay
        assert "relay" in text
    else:
        assert text.startswith("the relay alone (")
        assert shaping.reason


def test_rounds_over_the_links_cost_what_the_links_say() -> None:
    """Real rounds of every variant (client processes, gRPC through the relays): the bytes
    follow the variants, and an SFLV1 round over a 100 ms link takes at least a round trip per
    batch."""
    clients, batches = 2, 4
    task = Task(num_clients=clients, workload="W1", samples=batches * 32)
    with LinkRun(task=task, profile=LinkProfile(0.0, None)) as run:
        at_zero = {variant: run.round(variant) for variant in VARIANTS}
        run.set_profile(LinkProfile(0.1, None))
        v1 = run.round(Variant("v1"))
    plane = {v.label: f.data_plane_bytes for v, f in at_zero.items()}
    assert plane["SFLV1"] == pytest.approx(plane["SFLV2"], rel=1e-4)
    # Up: activations and labels; down: the gradient (SFLV1) or an acknowledgement.
    assert 0.5 < plane["local-loss k=1"] / plane["SFLV1"] < 0.51
    assert plane["local-loss k=4"] == pytest.approx(plane["local-loss k=1"] / 4, rel=1e-3)
    assert plane["FedAvg (unsplit)"] == 0
    fedavg = at_zero[Variant("fedavg")]
    model_bytes = 4 * sum(p.numel() for p in run.parts.model().parameters())
    assert fedavg.sync_bytes >= 2 * clients * model_bytes
    for figures in at_zero.values():
        assert figures.examples == clients * batches * 32
        assert figures.link_bytes >= figures.data_plane_bytes + figures.sync_bytes
    assert v1.seconds >= batches * 0.1
    assert v1.data_plane_bytes == pytest.approx(plane["SFLV1"], rel=1e-4)


def test_the_accuracy_harness_trains_sflv1_as_fedavg_in_round_one() -> None:
    """After one round from the same weights and batch order, SFLV1 through the split server
    and FedAvg of the unsplit model are the same model (their optimizers differ only from the
    second round on, when the client's momentum carries over)."""
    from simulation.benchmark.accuracy import accuracy_curve

    run_config = {"dataset": "digits", "num-server-rounds": 1, "seed": 3}
    split = accuracy_curve(run_config, Variant("v1"), num_clients=3)
    fedavg = accuracy_curve(run_config, Variant("fedavg"), num_clients=3)
    assert len(split) == len(fedavg) == 2
    assert split[0] == fedavg[0]
    assert split[1] == pytest.approx(fedavg[1], abs=1 / 360)
    assert split[1] > split[0] + 0.2


@pytest.mark.slow
def test_quick_network_and_accuracy_sections_print_their_tables(tmp_path, capsys) -> None:
    from simulation.benchmark.benchmark import main

    assert (
        main(
            [
                *("--quick", "--workloads", "W1", "--only", "network", "accuracy"),
                *("--out", str(tmp_path)),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for title in (
        "Network emulation:",
        "The relay itself, at zero delay",
        "Round time over the network, W1",
        "Bytes per round, W1",
        "Final test accuracy after 2 rounds",
        "Seconds per steady round at 50 ms",
        "Goals:",
    ):
        assert title in printed
    for variant in VARIANTS:
        assert f"| {variant.label} |" in printed
    for name in ("network.md", "network.json", "accuracy.md", "accuracy.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
