"""Security: loopback-only sockets by default, no unpickling of anything read from a socket
or a file, strict msgpack decoding, shared memory that is private and never left behind,
and no prompt or completion text in a trace unless `trace.capture_text: true`.

What stays behind after a SIGKILL of the master: its orphaned agents exit as soon as they
notice the closed connection (the master unlinks the arena names once every agent has
attached; an agent that attached before the master died unlinks them on its way out);
the spool files of every process stay, readable, which is the point of them. Nothing
else of the master's survives it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request

import msgpack
import psutil
import pytest

from engine.config import load_config
from engine.ipc import shm
from engine.ipc.tcp import FrameError, decode
from llmtrace.cli import build_parser

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_PROMPT = "ultramarine-okapi-7731 recites the tide tables"
REQUEST_ID = "visible-request-id-5150"
SERVE_CONFIG = """
model: {preset: tiny, seed: 0}
engine: {block_size: 16, max_num_seqs: 2, max_batched_tokens: 128, max_model_len: 128, num_blocks: 16}
trace: {capture_text: false}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`llmtrace serve --out` (default host) that answered one request with SECRET_PROMPT,
    then stopped: (its process info while it ran, the run directory)."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "serve.yaml").write_text(SERVE_CONFIG)
    out = tmp / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmtrace.cli",
            "serve",
            "--config",
            str(tmp / "serve.yaml"),
            "--port",
            "0",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+:\d+", line).group()
        body = ('{"prompt": "%s", "max_tokens": 6, "ignore_eos": true}' % SECRET_PROMPT).encode()
        req = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json", "X-Request-Id": REQUEST_ID}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        server = psutil.Process(proc.pid)
        info = {
            "url": url,
            "listening": _listening(server),
            "agents": {c.pid: _listening(c) for c in server.children()},
        }
    finally:
        proc.terminate()
        proc.wait(60)
    return info, out


def _listening(p: psutil.Process) -> list[str]:
    return [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


# ---- sockets -------------------------------------------------------------------------------------------


def test_engine_listens_on_loopback_only_unless_told_otherwise(served):
    info, _ = served
    assert info["url"].startswith("http://127.0.0.1:")
    assert info["listening"] == ["127.0.0.1"]  # the HTTP server; the agents' listener is closed after the handshake
    assert info["agents"] and all(not v for v in info["agents"].values())  # agents listen on nothing
    assert load_config({}).engine.host == "127.0.0.1"
    assert build_parser()[0].parse_args(["serve", "--config", "x"]).host is None  # None: the config's host


def test_msgpack_frames_are_plain_data_only():
    for body in (
        msgpack.packb(msgpack.ExtType(1, b"payload")),
        msgpack.packb({"t": msgpack.Timestamp(1, 0)}),
        msgpack.packb({1: "int key"}),
        b"\xdd\x7f\xff\xff\xff",  # an array claiming 2**31 items
        b"\x91" * 200_000 + b"\x00",
        b"\xc1",
    ):  # nesting past the decoder's stack; a reserved byte
        with pytest.raises(FrameError):
            decode(body)
    assert decode(msgpack.packb({"type": "step", "ids": [1, 2], "blob": b"\x00"})) == {
        "type": "step",
        "ids": [1, 2],
        "blob": b"\x00",
    }


UNSAFE_LOADERS = re.compile(
    r"^\s*(import|from)\s+(pickle|_pickle|marshal|shelve|dill|cloudpickle|joblib)\b"
    r"|pickle\.loads?\(|marshal\.loads?\(|yaml\.load\(|yaml\.unsafe_load"
    r"|allow_pickle\s*=\s*True"
    r"|torch\.load\((?![^)]*weights_only\s*=\s*True)",
    re.M,
)


def test_no_package_unpickles_what_it_reads():
    offenders = []
    for pkg in ("llmtrace", "engine", "tui"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    with open(path, encoding="utf-8") as fh:
                        for m in UNSAFE_LOADERS.finditer(fh.read()):
                            offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group().strip()}")
    assert not offenders, offenders


# ---- shared memory -------------------------------------------------------------------------------------


def test_arenas_are_private_with_unguessable_names():
    layout = shm.ArenaLayout([shm.Field("x", "int32", (4,))])
    arenas = [shm.ShmArena.create(layout) for _ in range(2)]
    try:
        for a in arenas:
            st = os.stat(os.path.join(shm.SHM_DIR, a.name))
            assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
            assert re.fullmatch(r"llmtrace-[0-9a-f]{32}", a.name)  # 128 random bits
        assert arenas[0].name != arenas[1].name
    finally:
        for a in arenas:
            a.unlink()
            a.close()


MASTER_SCRIPT = textwrap.dedent("""
    import asyncio
    from engine.config import load_config
    from engine.master import Master
    from engine.tokenizer import Tokenizer

    cfg = load_config({"model": {"preset": "tiny"}, "engine": {"max_model_len": 128, "max_batched_tokens": 128,
                                                                "num_blocks": 16}})

    async def main():
        await Master(cfg, Tokenizer()).start()
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def _mapped_arenas(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return set(re.findall(r"/dev/shm/(llmtrace-[0-9a-f]+)", f.read()))
    except OSError:
        return set()


def test_master_sigkilled_while_agents_load_leaves_no_shared_memory():
    """The window the master cannot cover: its arenas exist by name until every agent has
    attached and said ready. An agent that attached unlinks them when it finds the master gone."""
    master = subprocess.Popen([sys.executable, "-c", MASTER_SCRIPT])
    agent, names = None, set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not names:
            children = psutil.Process(master.pid).children()
            agent = children[0] if children else None
            names = _mapped_arenas(agent.pid) if agent else set()
            time.sleep(0.01)
        assert len(names) == 2, "the agent never attached the arenas"
    finally:
        master.kill()
        master.wait()
    still_named = {n for n in names if os.path.exists(os.path.join(shm.SHM_DIR, n))}
    if not still_named:
        pytest.skip("the handshake finished before the kill: nothing left to prove")
    agent.wait(60)  # the orphan notices the closed connection and exits
    assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)


# ---- text in traces ------------------------------------------------------------------------------------


def test_prompt_text_is_in_no_spool_file_nor_the_exported_trace(served, tmp_path):
    _, out = served
    trace_json = tmp_path / "trace.json"
    from llmtrace.cli import main as cli_main

    assert cli_main(["export", str(out), "-o", str(trace_json)]) == 0
    blobs = {p.name: p.read_bytes() for p in (out / "spool").iterdir()}
    blobs["exported trace.json"] = trace_json.read_bytes()
    for name in ("trace.json", "report.json", "report.md"):  # what `serve --out` wrote when it stopped
        blobs[name] = (out / name).read_bytes()
    assert len(blobs) >= 6  # master, agent, the export and serve's own outputs
    # The search finds strings where they are: the request id is recorded (as an attribute).
    assert any(REQUEST_ID.encode() in b for b in blobs.values())
    for word in ("ultramarine-okapi", "tide tables"):
        assert not [name for name, b in blobs.items() if word.encode() in b], word
