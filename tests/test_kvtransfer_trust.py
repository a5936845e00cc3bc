"""The KV receiver against peers it must not trust, over real sockets: no credentials, the cluster secret without a
transfer's capability, a session spraying frames, oversized or truncated frames, floods of silent connections, a
handshake for a transport the receiver was not configured for. Every attack is refused, the victim's transfer lands
bit for bit, and the receiver's threads and memory stay bounded. (The same attacks against a decode worker, with its
output checked against the offline engine: test_remote_prefill_trust.py.)"""

import gc
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from glmserve.kvtransfer import (
    ClusterSecret,
    FailureKind,
    KVLayout,
    KVReceiver,
    KVSender,
    PeerLost,
    ReceiverLimits,
    TransferFailed,
    new_capability,
)
from glmserve.kvtransfer import kv_transfer_pb2 as pb
from glmserve.kvtransfer.auth import frame_key, sign_call
from glmserve.kvtransfer.control import ControlClient
from glmserve.kvtransfer.frames import MAGIC, FrameHeader, send_hello
from glmserve.kvtransfer.layout import RowKind

pytestmark = pytest.mark.timeout(120)

LAYOUT = KVLayout(num_layers=3, block_size=4, latent_dim=8, index_dim=4, index_layers=(0,), dtype=torch.bfloat16)
NUM_BLOCKS = 8
SECRET = ClusterSecret("the cluster's secret for these tests")
WAIT_S = 10.0


def make_pools():
    def pool(dim: int) -> torch.Tensor:
        return torch.full((NUM_BLOCKS, LAYOUT.block_size, dim), -7.0, dtype=LAYOUT.dtype)

    return [pool(LAYOUT.latent_dim) for _ in range(LAYOUT.num_layers)], {0: pool(LAYOUT.index_dim)}


def rows(num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    latent = [torch.randn(num_tokens, LAYOUT.latent_dim, generator=g).to(LAYOUT.dtype) for _ in range(3)]
    return latent, {0: torch.randn(num_tokens, LAYOUT.index_dim, generator=g).to(LAYOUT.dtype)}


def landed(receiver: KVReceiver, table: list[int], num_tokens: int, want) -> bool:
    """Every row of the transfer where the block table says, bit for bit."""
    latent, index = want
    bs = LAYOUT.block_size
    for t in range(num_tokens):
        block, slot = table[t // bs], t % bs
        for layer in range(LAYOUT.num_layers):
            if not same_bits(receiver.latent[layer][block, slot], latent[layer][t]):
                return False
        if not same_bits(receiver.index_keys[0][block, slot], index[0][t]):
            return False
    return True


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def send_all(transfer, want) -> None:
    latent, index = want
    for layer in range(LAYOUT.num_layers):
        transfer.send_layer(layer, latent[layer], index.get(layer))


@pytest.fixture
def receiver():
    latent, index = make_pools()
    limits = ReceiverLimits(max_connections=16, hello_timeout_s=1.0, read_timeout_s=1.0, idle_timeout_s=30.0)
    with KVReceiver(LAYOUT, latent, index, transports=("tcp",), secret=SECRET, limits=limits) as recv:
        yield recv


class Victim:
    """A registered transfer and the honest sender that fills it."""

    def __init__(self, receiver: KVReceiver, transfer_id: str = "victim", table=(1, 2, 3), num_tokens: int = 10):
        self.receiver, self.transfer_id, self.table, self.num_tokens = receiver, transfer_id, list(table), num_tokens
        self.capability = new_capability()
        self.future = receiver.register(transfer_id, self.table, num_tokens, lease_s=WAIT_S, capability=self.capability)
        self.rows = rows(num_tokens, seed=len(transfer_id))

    def run(self, sender: KVSender):
        transfer = sender.open_transfer(self.transfer_id, self.capability)
        send_all(transfer, self.rows)
        transfer.complete(5, -0.5, [(5, -0.5)]).result(WAIT_S)
        completion = self.future.result(WAIT_S)
        assert completion.first_token == 5
        assert landed(self.receiver, self.table, self.num_tokens, self.rows)


class RawPeer:
    """Someone holding the cluster secret (a compromised or buggy worker) speaking the protocol by hand: a session of
    its own, and frames it makes up."""

    def __init__(self, receiver: KVReceiver, secret: ClusterSecret = SECRET):
        self.control = ControlClient(receiver.address, secret, timeout_s=WAIT_S)
        reply = self.control.call("Handshake", pb.HandshakeRequest(layout=LAYOUT.to_proto(), transport="tcp"))
        assert reply.accepted, reply.error
        self.session_id = reply.session_id
        self.sock = socket.create_connection((reply.data_host, reply.data_port), timeout=WAIT_S)
        send_hello(self.sock, secret, self.session_id)

    def ref(self, transfer_id: str, capability: bytes) -> pb.TransferRef:
        return pb.TransferRef(transfer_id=transfer_id, capability=capability)

    def closed_by_receiver(self, within_s: float = WAIT_S) -> bool:
        self.sock.settimeout(within_s)
        try:
            while self.sock.recv(4096):
                pass
            return True
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False


def test_a_peer_without_the_secret_cannot_open_a_session_on_any_transport(receiver):
    wrong = ClusterSecret("somebody else's secret, not ours")
    for transport in ("tcp", "nccl", "cuda_ipc"):
        client = ControlClient(receiver.address, wrong, timeout_s=WAIT_S)
        with pytest.raises(grpc.RpcError) as info:
            client.call("Handshake", pb.HandshakeRequest(layout=LAYOUT.to_proto(), transport=transport))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == "unauthenticated"  # nothing about the layout, the transports, the sessions
        client.close()
    # and through the library, on the default transport
    with pytest.raises(ConnectionError, match="refused our credentials"):
        KVSender.connect(receiver.address, LAYOUT, secret=wrong)
    # an unsigned call (any gRPC client) and a replayed one are refused the same way
    channel = grpc.insecure_channel(receiver.address)
    handshake = channel.unary_unary("/glmserve.kvtransfer.KVTransfer/Handshake")
    body = pb.HandshakeRequest(layout=LAYOUT.to_proto(), transport="tcp").SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        handshake(body, timeout=WAIT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metadata, _ = sign_call(SECRET, "Handshake", body)
    raw, call = handshake.with_call(body, metadata=metadata, timeout=WAIT_S)
    assert pb.HandshakeReply.FromString(raw).accepted
    with pytest.raises(grpc.RpcError) as info:  # the same signed call again
        handshake(body, metadata=metadata, timeout=WAIT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    assert receiver.stats.transfers_registered == 0


def test_data_plane_hello_without_the_secret_is_hung_up_on(receiver):
    # a real session id (from a signed handshake) but a hello proof made without the secret
    peer = ControlClient(receiver.address, SECRET, WAIT_S)
    reply = peer.call("Handshake", pb.HandshakeRequest(layout=LAYOUT.to_proto(), transport="tcp"))
    sock = socket.create_connection((reply.data_host, reply.data_port), timeout=WAIT_S)
    session = reply.session_id.encode()
    sock.sendall(struct.pack("<4sH", MAGIC, len(session)) + session + bytes(16))
    challenge = sock.recv(64)
    assert len(challenge) == 48  # a nonce and the receiver's proof: nothing about the layout or the sessions
    sock.sendall(bytes(32))  # a made-up proof
    sock.settimeout(WAIT_S)
    assert sock.recv(1) == b""  # hung up
    # and the library refuses to send to a receiver that cannot prove the secret either
    with pytest.raises(ConnectionError):
        KVSender.connect(receiver.address, LAYOUT, secret=ClusterSecret("another cluster's secret, 32 b"))
    wait_until(lambda: receiver.stats.hellos_refused >= 1)
    assert not receiver._sessions[reply.session_id].sock  # the session never attached


def wait_until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_cluster_secret_without_the_capability_touches_no_transfer(receiver):
    """Open, complete (an out-of-vocabulary token, attacker-chosen output), renew and abort the victim's transfer,
    knowing its id: all refused as if it did not exist; the victim then lands exactly."""
    victim = Victim(receiver)
    attacker = RawPeer(receiver)
    guess = attacker.ref(victim.transfer_id, new_capability())
    opened = attacker.control.call(
        "OpenTransfer", pb.OpenTransferRequest(session_id=attacker.session_id, transfer=guess)
    )
    assert opened.status.failure == pb.UNKNOWN_TRANSFER and opened.key == 0
    done = attacker.control.call(
        "Complete", pb.CompleteRequest(session_id=attacker.session_id, transfer=guess, first_token=10**9)
    )
    assert done.failure == pb.UNKNOWN_TRANSFER
    renewed = attacker.control.call(
        "RenewLease", pb.RenewLeaseRequest(session_id=attacker.session_id, transfers=[guess])
    )
    assert [s.failure for s in renewed.statuses] == [pb.UNKNOWN_TRANSFER]
    aborted = attacker.control.call(
        "Abort", pb.AbortRequest(session_id=attacker.session_id, transfer=guess, reason="hijack")
    )
    assert aborted.failure == pb.UNKNOWN_TRANSFER
    assert not victim.future.done()
    with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as sender:
        victim.run(sender)
    assert receiver.stats.transfers_failed == 0


def test_a_capability_only_works_in_the_session_that_opened_the_transfer(receiver):
    victim = Victim(receiver)
    with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as sender:
        transfer = sender.open_transfer(victim.transfer_id, victim.capability)
        # someone who learned the capability afterwards, from another session
        thief = RawPeer(receiver)
        ref = thief.ref(victim.transfer_id, victim.capability)
        again = thief.control.call("OpenTransfer", pb.OpenTransferRequest(session_id=thief.session_id, transfer=ref))
        assert again.status.failure == pb.INVALID
        done = thief.control.call("Complete", pb.CompleteRequest(session_id=thief.session_id, transfer=ref))
        assert done.failure == pb.INVALID
        aborted = thief.control.call("Abort", pb.AbortRequest(session_id=thief.session_id, transfer=ref))
        assert aborted.failure == pb.INVALID
        send_all(transfer, victim.rows)
        transfer.complete(5, -0.5).result(WAIT_S)
        assert victim.future.result(WAIT_S).first_token == 5
        assert landed(receiver, victim.table, victim.num_tokens, victim.rows)


def test_frames_sprayed_over_guessed_keys_end_the_sprayers_session_not_the_victims(receiver):
    victims = [Victim(receiver, f"victim-{i}", table=(2 * i, 2 * i + 1), num_tokens=7) for i in range(3)]
    with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as sender:
        opened = [sender.open_transfer(v.transfer_id, v.capability) for v in victims]
        attacker = RawPeer(receiver)
        keys = [*range(1, 201), *(t.key for t in opened)]  # counting up, and even the real keys
        for key in keys:
            header = FrameHeader(key, 0, RowKind.LATENT, 0, 1, LAYOUT.latent_dim * 2)
            try:
                attacker.sock.sendall(header.pack(bytes(32)) + bytes(LAYOUT.latent_dim * 2))
            except OSError:
                break  # hung up on already
        assert attacker.closed_by_receiver()
        for victim, transfer in zip(victims, opened, strict=True):
            send_all(transfer, victim.rows)
            transfer.complete(5, -0.5).result(WAIT_S)
            victim.future.result(WAIT_S)
            assert landed(receiver, victim.table, victim.num_tokens, victim.rows)
    assert receiver.stats.transfers_failed == 0


def test_frames_beyond_what_was_registered_fail_only_that_transfer(receiver):
    """A sender with the capability sending more rows than registered, rows out of order, or a frame bigger than its
    transfer: refused before anything is allocated or written; the victim next to it lands exactly."""
    victim = Victim(receiver, "victim", table=(5, 6), num_tokens=6)
    with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as honest:
        victim_transfer = honest.open_transfer(victim.transfer_id, victim.capability)
        for attempt in ("too many rows", "out of order", "huge frame"):
            capability = new_capability()
            future = receiver.register(attempt, [0, 1], 6, lease_s=WAIT_S, capability=capability)
            peer = RawPeer(receiver)
            reply = peer.control.call(
                "OpenTransfer",
                pb.OpenTransferRequest(session_id=peer.session_id, transfer=peer.ref(attempt, capability)),
            )
            key = frame_key(capability, peer.session_id)
            row = LAYOUT.latent_dim * 2
            if attempt == "too many rows":
                frames = [(0, 6), (6, 3)]
            elif attempt == "out of order":
                frames = [(3, 3), (0, 3)]
            else:
                frames = [(0, 1 << 40)]
            for offset, count in frames:
                header = FrameHeader(reply.key, 1, RowKind.LATENT, offset, count, count * row)
                payload = bytes(count * row) if count < 100 else b""
                try:
                    peer.sock.sendall(header.pack(key) + payload)
                except OSError:
                    break  # hung up on already
            if attempt == "huge frame":
                assert peer.closed_by_receiver()  # a header announcing a frame beyond the bounds ends the session
            with pytest.raises(TransferFailed):
                future.result(WAIT_S)
        send_all(victim_transfer, victim.rows)
        victim_transfer.complete(5, -0.5).result(WAIT_S)
        victim.future.result(WAIT_S)
        assert landed(receiver, victim.table, victim.num_tokens, victim.rows)
    assert all(not torch.isnan(p.float()).any() for p in receiver.latent)


def test_a_corrupted_transfer_is_detected_by_its_checksum(receiver):
    """The sender's bytes change on the way (after it computed their checksum): the transfer fails as invalid, and
    the decode worker would recompute (test_remote_prefill_trust.py checks that end to end)."""
    from glmserve.kvtransfer.tcp_transport import TcpSendChannel

    class CorruptingChannel(TcpSendChannel):
        def send(self, chunk):
            nbytes, crc = super().send(chunk)
            return nbytes, crc ^ 1 if chunk.header.layer == 2 else crc  # as if layer 2's bytes had been damaged

    victim = Victim(receiver)
    with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as sender:
        sender._data = CorruptingChannel(sender._sock)
        transfer = sender.open_transfer(victim.transfer_id, victim.capability)
        send_all(transfer, victim.rows)
        try:  # the completion may overtake the last rows: then the receiver finds out after answering it
            transfer.complete(5, -0.5).result(WAIT_S)
        except TransferFailed as e:
            assert "corrupt" in e.reason
    with pytest.raises(TransferFailed) as info:
        victim.future.result(WAIT_S)
    assert info.value.kind is FailureKind.INVALID


def _threads() -> int:
    return threading.active_count()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_silent_connections_and_oversized_headers_stay_bounded():
    """400 connections that never say hello, then sessions whose first header announces 1 TiB of rows: the
    receiver's threads stay within its connection bound, its memory flat, and an honest sender still gets through."""
    latent, index = make_pools()
    limits = ReceiverLimits(max_connections=32, hello_timeout_s=2.0, read_timeout_s=1.0)
    with KVReceiver(LAYOUT, latent, index, secret=SECRET, limits=limits) as receiver:
        gc.collect()
        threads_before, rss_before = _threads(), _rss_mib()
        silent = []
        for _ in range(400):
            try:
                silent.append(socket.create_connection(("127.0.0.1", receiver.data_port), timeout=WAIT_S))
            except OSError:
                pass
        time.sleep(0.5)
        threads_during, rss_during = _threads(), _rss_mib()
        assert threads_during - threads_before <= limits.max_connections
        stats = receiver.stats  # each one beyond the bound closed at once, or at its hello timeout
        assert stats.connections_refused + stats.hellos_refused >= 400 - limits.max_connections - 8
        wait_until(lambda: _threads() - threads_before <= 2, timeout=limits.hello_timeout_s + 5)  # hello timeout
        for sock in silent:
            sock.close()
        # oversized headers from authenticated sessions
        peers = []
        for i in range(3):
            capability = new_capability()
            receiver.register(f"big-{i}", [0, 1], 6, lease_s=WAIT_S, capability=capability)
            peer = RawPeer(receiver)
            reply = peer.control.call(
                "OpenTransfer",
                pb.OpenTransferRequest(session_id=peer.session_id, transfer=peer.ref(f"big-{i}", capability)),
            )
            header = FrameHeader(reply.key, 0, RowKind.LATENT, 0, 6, 1 << 40)  # 1 TiB "follows"
            peer.sock.sendall(header.pack(frame_key(capability, peer.session_id)))
            peers.append(peer)
        assert all(peer.closed_by_receiver() for peer in peers)
        rss_after = _rss_mib()
        assert rss_after - rss_before < 64, (rss_before, rss_during, rss_after)
        victim = Victim(receiver)
        with KVSender.connect(receiver.address, LAYOUT, secret=SECRET) as sender:
            victim.run(sender)
        print(
            f"threads {threads_before} -> {threads_during} under 400 silent connections (bound "
            f"{limits.max_connections}); RSS {rss_before:.0f} -> {rss_during:.0f} -> {rss_after:.0f} MiB"
        )


def test_a_truncated_header_or_payload_closes_the_session_and_fails_its_transfer(receiver):
    for cut in ("header", "payload"):
        capability = new_capability()
        future = receiver.register(cut, [0, 1], 6, lease_s=WAIT_S, capability=capability)
        peer = RawPeer(receiver)
        ref = peer.ref(cut, capability)
        reply = peer.control.call("OpenTransfer", pb.OpenTransferRequest(session_id=peer.session_id, transfer=ref))
        header = FrameHeader(reply.key, 0, RowKind.LATENT, 0, 6, 6 * LAYOUT.latent_dim * 2)
        raw = header.pack(frame_key(capability, peer.session_id))
        began = time.monotonic()
        peer.sock.sendall(raw[:10] if cut == "header" else raw + bytes(7))  # and then nothing
        with pytest.raises(PeerLost):
            future.result(WAIT_S)
        assert time.monotonic() - began < receiver.limits.read_timeout_s + 2.0
        assert peer.closed_by_receiver()


def _listen_address(port: int) -> str:
    """The local address a listening TCP socket of this host is bound to, from /proc/net/tcp{,6}."""
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, hex_port = address.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                if len(host) == 8 or host.startswith("0000000000000000FFFF0000"):  # IPv4, or IPv4 mapped in IPv6
                    return socket.inet_ntoa(bytes.fromhex(host[-8:])[::-1])
                return host  # a real IPv6 address ("0" * 32: every interface)
    raise AssertionError(f"nothing listens on port {port}")


def test_only_the_configured_transport_and_interface():
    latent, index = make_pools()
    with KVReceiver(LAYOUT, latent, index, host="127.0.0.1", transports=("tcp",), secret=SECRET) as receiver:
        with pytest.raises(ConnectionError, match="not offered"):
            KVSender.connect(receiver.address, LAYOUT, transport="nccl", secret=SECRET)
        assert receiver._store is None  # no rendezvous store was started for the refused nccl handshake
        assert _listen_address(receiver.data_port) == "127.0.0.1"
        assert _listen_address(receiver.port) == "127.0.0.1"
    latent, index = make_pools()
    with KVReceiver(LAYOUT, latent, index, host="127.0.0.1", transports=("nccl",), secret=SECRET) as receiver:
        victim = Victim(receiver)
        with KVSender.connect(receiver.address, LAYOUT, transport="nccl", secret=SECRET) as sender:
            assert _listen_address(receiver._store.port) == "127.0.0.1"  # the store too, not 0.0.0.0
            victim.run(sender)
