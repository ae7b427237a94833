"""The master/agent transport: TCP frames, shared-memory arenas, protocol checks, receive spans."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from engine import protocol
from engine.batch_state import BatchState
from engine.ipc import shm
from engine.ipc.shm import ArenaLayout, Field, ShmArena, ShmError
from engine.ipc.tcp import AsyncFrameStream, ConnectionClosed, FrameError, FrameSocket, FrameTooLarge, NagleFrameSocket


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


@pytest.fixture
def pair():
    a, b = tcp_pair()
    yield FrameSocket(a), FrameSocket(b)
    a.close()
    b.close()


def test_frames_round_trip_including_large_and_binary(pair):
    left, right = pair
    msgs = [
        protocol.message("step", step=3, carrier=[1, 2, 3], new=[[7, [0.0, 1.0, -1, -1, 0]]], drop=[]),
        {"blob": b"\x00\xff" * 3_000_000, "text": "é" * 1000},  # ~6 MB: many recv() calls
        {"nested": {"x": [1.5, None, True]}},
    ]
    sender = threading.Thread(target=lambda: [left.send(m) for m in msgs])  # 6 MB overflows the socket buffers
    sender.start()
    for m in msgs:
        right.wait()
        assert right.recv() == m
    sender.join()


def test_nodelay_flag_is_applied_and_nagle_mode_still_frames(pair):
    left, right = pair
    assert left.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    left = NagleFrameSocket(left.sock)  # the no_tcp_nodelay antipattern: header and body as two sends
    assert not left.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for i in range(3):
        left.send({"k": list(range(100 * i))})
    assert [right.recv() for _ in range(3)] == [{"k": list(range(100 * i))} for i in range(3)]


def test_oversized_frames_are_refused_on_both_sides(pair):
    left, right = pair
    small = FrameSocket(left.sock, limit=1000)
    with pytest.raises(FrameTooLarge, match="exceeds the 1000-byte limit"):
        small.send({"x": b"a" * 2000})
    left.send({"x": b"a" * 2000})
    strict = FrameSocket(right.sock, limit=1000)
    with pytest.raises(FrameTooLarge, match="frame of 2006 bytes"):
        strict.recv()


def test_garbage_and_non_map_frames_are_errors(pair):
    left, right = pair
    left.sock.sendall(b"\x00\x00\x00\x01\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(FrameError, match="undecodable"):
        right.recv()
    import msgpack

    body = msgpack.packb([1, 2])
    left.sock.sendall(len(body).to_bytes(4, "big") + body)
    with pytest.raises(FrameError, match="expected a map"):
        right.recv()


def test_peer_close_is_connection_closed(pair):
    left, right = pair
    left.send({"a": 1})
    left.sock.shutdown(socket.SHUT_WR)
    assert right.recv() == {"a": 1}
    with pytest.raises(ConnectionClosed):
        right.wait()


def test_async_side_talks_to_blocking_side():
    async def main():
        got = asyncio.Queue()

        async def on_conn(r, w):
            conn = AsyncFrameStream(r, w)
            hello = protocol.check(await conn.recv(), "hello")
            await conn.send(protocol.message("hello", echo=hello["rank"], blob=b"x" * 200_000))
            await conn.wait()
            await got.put(await conn.recv())
            await conn.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def agent():
            f = FrameSocket.connect("127.0.0.1", port)
            f.send(protocol.message("hello", rank=5))
            reply = protocol.check(f.recv(), "hello")
            f.send(protocol.message("reply", n=len(reply["blob"]), echo=reply["echo"]))
            f.close()

        await asyncio.to_thread(agent)
        msg = await asyncio.wait_for(got.get(), 5)
        server.close()
        return msg

    msg = asyncio.run(main())
    assert msg["n"] == 200_000 and msg["echo"] == 5


def test_version_mismatch_is_a_clear_error(pair):
    left, right = pair
    left.send({"v": protocol.VERSION + 1, "type": "hello", "rank": 0})
    mismatch = rf"version mismatch: peer speaks v{protocol.VERSION + 1}, this side speaks v{protocol.VERSION}"
    with pytest.raises(protocol.ProtocolError, match=mismatch):
        protocol.check(right.recv(), "hello")


def test_unexpected_type_and_peer_error():
    with pytest.raises(protocol.ProtocolError, match="unexpected message 'step', expected hello"):
        protocol.check(protocol.message("step"), "hello")
    with pytest.raises(protocol.PeerError, match="agent-0 .* out of memory"):
        protocol.check(protocol.message("error", message="agent-0 (pid 9): out of memory"), "reply")


LAYOUT = ArenaLayout([Field("a", "int32", (5,)), Field("b", "float32", (3, 4)), Field("c", "int64", (1,))])


def test_arena_layout_is_aligned_and_survives_the_wire():
    assert [LAYOUT.offsets[f] for f in ("a", "b", "c")] == [0, 64, 128]
    assert LAYOUT.size == 192
    again = ArenaLayout.from_wire(protocol.request_layout(4, 64, 8).to_wire())
    assert again.offsets == protocol.request_layout(4, 64, 8).offsets


def test_arena_create_attach_share_and_unlink():
    owner = ShmArena.create(LAYOUT)
    path = os.path.join(shm.SHM_DIR, owner.name)
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == LAYOUT.size
        assert owner.name.startswith("llmtrace-") and len(owner.name) == len("llmtrace-") + 32
        assert owner.name in shm.owned_names()
        other = ShmArena.attach(owner.name, LAYOUT)
        owner["a"][:] = [1, 2, 3, 4, 5]
        other["b"][1] = 2.5
        assert other["a"].tolist() == [1, 2, 3, 4, 5]
        assert owner["b"][1].tolist() == [2.5] * 4
        other.unlink()  # only the creator removes the name
        assert os.path.exists(path)
        owner.unlink()
        assert not os.path.exists(path) and owner.name not in shm.owned_names()
        other["c"][0] = 7  # the mapping outlives the name
        assert owner["c"][0] == 7
        other.close()
    finally:
        owner.unlink()
        owner.close()


def test_arena_names_are_unguessable_and_attach_checks():
    names = {ShmArena.create(LAYOUT) for _ in range(3)}
    try:
        assert len({a.name for a in names}) == 3
        with pytest.raises(ShmError, match="not an arena name"):
            ShmArena.attach("../etc/passwd", LAYOUT)
        with pytest.raises(ShmError, match="cannot attach"):
            ShmArena.attach("llmtrace-" + "0" * 32, LAYOUT)
        big = ArenaLayout([Field("x", "int64", (1000,))])
        with pytest.raises(ShmError, match="needs 8000"):
            ShmArena.attach(next(iter(names)).name, big)
    finally:
        for a in names:
            a.unlink()
            a.close()


def test_close_with_an_outstanding_view_does_not_raise():
    arena = ShmArena.create(LAYOUT)
    view = arena["a"]
    arena.unlink()
    arena.close()
    view[0] = 3  # still mapped until the view goes
    assert view[0] == 3


@pytest.mark.parametrize("how", ["exit", "sigterm", "sigint"])
def test_arenas_unlinked_on_every_exit_path(how):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from engine.ipc.shm import ArenaLayout, Field, ShmArena
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent may have ignored it
        a = ShmArena.create(ArenaLayout([Field("x", "int32", (4,))]))
        print(a.name, flush=True)
        if {how!r} == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)
        elif {how!r} == "sigint":
            os.kill(os.getpid(), signal.SIGINT); time.sleep(5)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    name = p.stdout.split()[0]
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name)), p.stderr
    if how == "sigterm":
        assert p.returncode == -15
    elif how == "sigint":
        assert "KeyboardInterrupt" in p.stderr


def test_batch_state_applies_diffs():
    bs = BatchState()
    bs.apply([[3, [0.0, 1.0, -1, -1, 0]], [9, [0.7, 0.9, 40, 123, 5]]], [])
    t, p, k, s, top = bs.sampling_arrays(np.array([9, 3, 9]))
    assert t.dtype == np.float32 and k.dtype == np.int32 and s.dtype == np.int64
    assert t.tolist() == pytest.approx([0.7, 0.0, 0.7]) and k.tolist() == [40, -1, 40] and s.tolist() == [123, -1, 123]
    assert top == 5 and bs.sampling_arrays(np.array([3]))[4] == 0  # the most any row of the step asked for
    bs.apply([], [3])
    assert len(bs) == 1
    with pytest.raises(protocol.ProtocolError, match="sequence 3"):
        bs.sampling_arrays(np.array([3]))
    assert bs.banned(np.array([9]), np.array([20])) == ()


def test_min_tokens_bans_eos_and_stop_tokens_until_the_count_is_reached():
    from engine.sampling_params import SamplingParams

    wire = protocol.sampling_to_wire(SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(5,)), 10, 2)
    assert wire[5:] == [13, [2, 5]]  # prompt 10 + 3: output positions 10, 11, 12 may not be EOS or 5
    assert protocol.sampling_to_wire(SamplingParams(max_tokens=8), 10, 2) == [1.0, 1.0, -1, -1, 0]
    bs = BatchState()
    bs.apply([[1, wire], [4, [0.0, 1.0, -1, -1, 0]]], [])
    assert bs.banned(np.array([4, 1]), np.array([11, 12])) == ((1, (2, 5)),)
    assert bs.banned(np.array([1]), np.array([13])) == ()
    bs.apply([], [1])
    assert bs.banned(np.array([4]), np.array([11])) == ()
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
