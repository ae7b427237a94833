"""Length-prefixed msgpack frames over TCP: the control channel between master and agents.

A frame is a 4-byte big-endian body length followed by one msgpack map. msgpack carries
plain data only (never pickle), so a peer cannot make the other run code. The master's
side is asyncio (`AsyncFrameStream`), the agent's side a blocking socket (`FrameSocket`).

Both sides can wait for a frame to arrive (`wait`) separately from reading and decoding
it (`recv`), so idle time and transport time land in different spans.

TCP_NODELAY is on by default. `nodelay=False` reproduces the seeds' channel (the
`no_tcp_nodelay` antipattern): Nagle on, and each frame written as two sends (length,
then body) -- the write-write-read pattern that stalls on the peer's delayed ACK.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct

import msgpack

LENGTH = struct.Struct(">I")
MAX_FRAME = 64 << 20  # bytes of msgpack per frame; bulk arrays travel through shared memory


class FrameError(Exception):
    """The channel is unusable: bad frame, oversized frame or closed by the peer."""


class FrameTooLarge(FrameError):
    def __init__(self, size: int, limit: int):
        super().__init__(
            f"frame of {size} bytes exceeds the {limit}-byte limit (bulk data belongs in the shared-memory arenas)"
        )
        self.size, self.limit = size, limit


class ConnectionClosed(FrameError):
    """The peer closed the connection (or died)."""


def encode(msg: dict, limit: int = MAX_FRAME) -> tuple[bytes, bytes]:
    """(length prefix, body) of one frame."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > limit:
        raise FrameTooLarge(len(body), limit)
    return LENGTH.pack(len(body)), body


def decode(body: bytes) -> dict:
    try:
        # Plain data only: no ext types (the protocol has none); str map keys; lengths are
        # bounded by the frame (msgpack's defaults), the frame by MAX_FRAME.
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as e:
        raise FrameError(f"undecodable frame of {len(body)} bytes: {e}") from None
    if not isinstance(msg, dict):
        raise FrameError(f"frame is a {type(msg).__name__}, expected a map")
    return msg


def _check_length(n: int, limit: int) -> int:
    if n > limit:
        raise FrameTooLarge(n, limit)
    return n


def set_nodelay(sock: socket.socket, on: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)


class FrameSocket:
    """Blocking frame channel (the agent's side): TCP_NODELAY on, each frame one write."""

    nodelay = True

    def __init__(self, sock: socket.socket, limit: int = MAX_FRAME):
        set_nodelay(sock, self.nodelay)
        self.sock, self.limit = sock, limit
        self._pending: int | None = None  # body length read by wait(), not yet consumed

    @classmethod
    def connect(cls, host: str, port: int, limit: int = MAX_FRAME, timeout_s: float = 30.0) -> FrameSocket:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.settimeout(None)
        return cls(sock, limit)

    def send(self, msg: dict) -> None:
        head, body = encode(msg, self.limit)
        try:
            self._write(head, body)
        except OSError as e:
            raise ConnectionClosed(f"send failed: {e}") from None

    def _write(self, head: bytes, body: bytes) -> None:
        self.sock.sendall(head + body)

    def _read_exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except OSError as e:
                raise ConnectionClosed(f"receive failed: {e}") from None
            if k == 0:
                raise ConnectionClosed("peer closed the connection")
            got += k
        return buf

    def wait(self) -> None:
        """Block until the next frame starts arriving (reads its length prefix)."""
        if self._pending is None:
            self._pending = _check_length(LENGTH.unpack(self._read_exactly(LENGTH.size))[0], self.limit)

    def recv(self) -> dict:
        self.wait()
        n, self._pending = self._pending, None
        return decode(self._read_exactly(n))

    def poll(self, timeout_s: float) -> bool:
        """Whether a frame (or the peer's close, which recv then raises) has arrived,
        waiting at most timeout_s."""
        if self._pending is not None:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout_s)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


class AsyncFrameStream:
    """asyncio frame channel (the master's side): TCP_NODELAY on, each frame one write."""

    nodelay = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int = MAX_FRAME):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            set_nodelay(sock, self.nodelay)
        self.reader, self.writer, self.limit = reader, writer, limit
        self._pending: int | None = None

    @classmethod
    async def connect(cls, host: str, port: int, limit: int = MAX_FRAME) -> AsyncFrameStream:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, limit)

    async def send(self, msg: dict) -> None:
        head, body = encode(msg, self.limit)
        try:
            await self._write(head, body)
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise ConnectionClosed(f"send failed: {e}") from None

    async def _write(self, head: bytes, body: bytes) -> None:
        self.writer.write(head + body)

    async def _read_exactly(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise ConnectionClosed("peer closed the connection") from None
        except (ConnectionError, OSError) as e:
            raise ConnectionClosed(f"receive failed: {e}") from None

    async def wait(self) -> None:
        """Return once the next frame starts arriving (reads its length prefix)."""
        if self._pending is None:
            head = await self._read_exactly(LENGTH.size)
            self._pending = _check_length(LENGTH.unpack(head)[0], self.limit)

    async def recv(self) -> dict:
        await self.wait()
        n, self._pending = self._pending, None
        return decode(await self._read_exactly(n))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # the peer is already gone


# ---- the no_tcp_nodelay mistake (engine/antipatterns.py's switch): Nagle's algorithm on and
# each frame written as header, then body: write-write-read meets the peer's delayed ACK


class NagleFrameSocket(FrameSocket):
    nodelay = False

    def _write(self, head: bytes, body: bytes) -> None:
        self.sock.sendall(head)
        self.sock.sendall(body)


class NagleFrameStream(AsyncFrameStream):
    nodelay = False

    async def _write(self, head: bytes, body: bytes) -> None:
        self.writer.write(head)
        await self.writer.drain()
        self.writer.write(body)
