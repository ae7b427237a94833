"""Transport boundaries: sockets (stage `tcp`, or `ipc` for Unix sockets) with bytes and,
on TCP, the socket's TCP_NODELAY; multiprocessing connections and queues and pyzmq
sockets and pollers (`ipc`; zmq with bytes; zmq.asyncio's sockets, whose calls return
futures, are not timed). A receive or poll span that blocks is the time the process
waited for its peer, which the analyzer replaces by what the peer did meanwhile
(analyze/peers.py), or reports as a wait no peer answered (wait-in-step)."""

from __future__ import annotations

import _socket
import socket
import weakref

from .. import names, recorder
from .caller import name_if_slow
from .patching import on_import, replace, traced

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_family = _socket.socket.family.__get__  # the int: socket.socket.family converts to an enum (~0.6 us)
_type = _socket.socket.type.__get__
NAGLE_BYTES = 1024  # Nagle delays only sends smaller than a segment: only those ask the socket
_SEND, _RECV = ({st: st + verb for st in (names.TCP, names.IPC)} for verb in (".send", ".recv"))
_SOCKETS: dict[int, list] = {}  # id(socket) -> [stage, TCP stream, TCP_NODELAY or None], while it lives


def _facts(sock) -> list:
    """[stage, whether a TCP stream, TCP_NODELAY (None until a small send asks)] of a socket:
    read once (its family and type getters, ~0.3 us, were read at every call) and dropped
    when it is freed, before its id can be reused."""
    facts = _SOCKETS.get(id(sock))
    if facts is None:
        tcp = _family(sock) in _TCP_FAMILIES
        facts = _SOCKETS[id(sock)] = [names.TCP if tcp else names.IPC, tcp and _type(sock) == socket.SOCK_STREAM, None]
        weakref.finalize(sock, _SOCKETS.pop, id(sock), None)
    return facts


def _stage(sock) -> str:
    return _facts(sock)[0]


def _nbytes(data) -> int:
    n = getattr(data, "nbytes", None)
    return n if n is not None else len(data)


def _nodelay(sock, facts: list) -> int:
    """The socket's TCP_NODELAY: read once (a getsockopt, ~0.6 us, was one per small send)
    and again after the program sets the option (`_setsockopt`)."""
    if facts[2] is None:
        try:
            facts[2] = int(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        except OSError:
            return -1
    return facts[2]


def _setsockopt(orig):
    def setsockopt(sock, level, option, *args):
        try:
            return orig(sock, level, option, *args)
        finally:
            facts = _SOCKETS.get(id(sock))
            if facts is not None and level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY:
                facts[2] = None  # read again at the next small send

    return setsockopt


def _sender(orig):
    def send(sock, data, *args):
        if not recorder.is_enabled():
            return orig(sock, data, *args)
        facts, n = _facts(sock), _nbytes(data)
        stage = facts[0]
        attrs = {names.A_BYTES: n}
        if n < NAGLE_BYTES and facts[1]:
            attrs[names.A_NODELAY] = _nodelay(sock, facts)
        with recorder.span(_SEND[stage], stage=stage, **attrs) as sp:
            try:
                return orig(sock, data, *args)
            finally:
                name_if_slow(sp)

    return send


def _receiver(orig, size, stage_of=_stage):
    """A receive span with the bytes size(result) says it got."""

    def recv(sock, *args, **kwargs):
        if not recorder.is_enabled():
            return orig(sock, *args, **kwargs)
        stage = stage_of(sock)
        with recorder.span(_RECV[stage], stage=stage) as sp:
            got = orig(sock, *args, **kwargs)
            sp.set(**{names.A_BYTES: size(got)})
            return got

    return recv


def _datagram_size(got) -> int:
    return len(got[0] if isinstance(got, tuple) else got)


def install_sockets() -> None:
    cls = socket.socket
    replace(cls, "setsockopt", _setsockopt)
    for attr in ("send", "sendall", "sendto"):
        replace(cls, attr, _sender)
    for attr in ("recv", "recvfrom"):
        replace(cls, attr, lambda orig: _receiver(orig, _datagram_size))
    for attr in ("recv_into", "recvfrom_into"):
        replace(cls, attr, lambda orig: _receiver(orig, lambda n: n if isinstance(n, int) else n[0]))


def _pipe_write(orig):
    """The bytes a Connection writes (its send pickles first): nested in `ipc.send`."""

    def _send_bytes(conn, buf, *args):
        if not recorder.is_enabled():
            return orig(conn, buf, *args)
        with recorder.span(names.PIPE_WRITE, stage=names.IPC, **{names.A_BYTES: _nbytes(buf)}) as sp:
            try:
                return orig(conn, buf, *args)
            finally:
                name_if_slow(sp)

    return _send_bytes


def _pipe_read(orig):
    """The bytes a Connection read (a BytesIO: its recv unpickles them): nested in `ipc.recv`."""

    def _recv_bytes(conn, *args):
        if not recorder.is_enabled():
            return orig(conn, *args)
        with recorder.span(names.PIPE_READ, stage=names.IPC) as sp:
            got = orig(conn, *args)
            sp.set(**{names.A_BYTES: got.getbuffer().nbytes})
            return got

    return _recv_bytes


def _patch_connection(mod) -> None:
    base = mod._ConnectionBase
    for attr, name in (
        ("send", "ipc.send"),
        ("send_bytes", "ipc.send"),
        ("recv", "ipc.recv"),
        ("recv_bytes", "ipc.recv"),
        ("recv_bytes_into", "ipc.recv"),
        ("poll", "ipc.poll"),
    ):
        replace(base, attr, traced(name, names.IPC))
    replace(mod.Connection, "_send_bytes", _pipe_write)
    replace(mod.Connection, "_recv_bytes", _pipe_read)


def _queue_get(orig):
    """Queue.get; a get asked not to wait says so (its time, however long on a loaded
    machine, is no wait for work)."""

    def get(q, block=True, timeout=None):
        if not recorder.is_enabled():
            return orig(q, block, timeout)
        attrs = {names.A_NONBLOCKING: 1} if not block or timeout == 0 else {}
        with recorder.span("ipc.get", stage=names.IPC, **attrs):
            return orig(q, block, timeout)

    return get


def _patch_queues(mod) -> None:
    replace(mod.Queue, "put", traced("ipc.put", names.IPC))
    replace(mod.Queue, "get", _queue_get)


def _zmq_size(msg) -> int:
    """Bytes of a zmq message part: bytes, a Frame or a buffer."""
    try:
        return _nbytes(msg)
    except TypeError:  # a str (send_string encodes it later) or a tracker
        return 0


def _zmq_sender(orig):
    def send(sock, msg, *args, **kwargs):
        if not recorder.is_enabled():
            return orig(sock, msg, *args, **kwargs)
        with recorder.span("ipc.send", stage=names.IPC, **{names.A_BYTES: _zmq_size(msg)}) as sp:
            try:
                return orig(sock, msg, *args, **kwargs)
            finally:
                name_if_slow(sp)

    return send


def _patch_zmq(mod) -> None:
    """send/recv only: send_multipart and recv_multipart call them once per part."""
    cls = mod.Socket
    replace(cls, "send", _zmq_sender)
    replace(cls, "recv", lambda orig: _receiver(orig, _zmq_size, stage_of=lambda _: names.IPC))
    replace(cls, "poll", traced("ipc.poll", names.IPC))


def _patch_zmq_poller(mod) -> None:
    replace(mod.Poller, "poll", traced("ipc.poll", names.IPC))


def install() -> None:
    install_sockets()
    on_import("multiprocessing.connection", _patch_connection)
    on_import("multiprocessing.queues", _patch_queues)
    on_import("zmq.sugar.socket", _patch_zmq)
    on_import("zmq.sugar.poll", _patch_zmq_poller)
