"""`llmtrace run --config FILE`: start the engine, drive it through its HTTP API with the
workload, collect every process's trace, write trace.json + report.json + report.md and
print the breakdown.

The engine (server + master, which spawns the agents) runs as a child process so the
load generator in this process does not share a GIL with the code being measured.
"""

from __future__ import annotations

import asyncio
import os
import signal

import llmtrace
from engine.engine_process import EngineCrashed, EngineProcess
from llmtrace.errors import UserError
from llmtrace.outputs import default_out_dir

HEALTH_TIMEOUT_S = 5.0


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the engine on a workload, trace it, write trace + report")
    p.add_argument("--config", required=True, help="YAML config (see examples/quickstart.yaml)")
    p.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    p.add_argument("--tui", action="store_true", help="show the live TUI while the workload runs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set workload.num_requests=8",
    )


def main(args) -> int:
    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        raise UserError(str(e)) from None
    out = os.path.abspath(args.out or cfg.trace.out or default_out_dir())
    os.makedirs(out, exist_ok=True)
    _clear_old_spool(out)
    config_path = os.path.join(out, "config.yaml")
    _write_yaml(cfg.to_dict(), config_path)
    llmtrace.configure(out=out, process_name="client", sample_hz=0, gc=True)
    os.environ[llmtrace.ENV_SAMPLE_HZ] = str(_sample_hz(cfg))  # the engine's processes, not the load generator
    if cfg.trace.viztracer is not None:  # the engine's processes trace inside these stages, N steps
        from llmtrace.integrations.viztracer import ENV, WindowSpec

        os.environ[ENV] = WindowSpec.parse(cfg.trace.viztracer.stages, cfg.trace.viztracer.steps).to_env()
    if cfg.trace.device_activity:
        from llmtrace.device_activity import ENV as DEVICE_ACTIVITY

        os.environ[DEVICE_ACTIVITY] = str(cfg.trace.device_activity)
    pyspy = _pyspy_env(cfg, out)
    engine = EngineProcess(config_path, out, out=out, env=dict(os.environ, LLMTRACE_PROCESS_NAME="master"))
    if pyspy is not None:  # the engine waits at its py-spy gate until py-spy samples it
        pyspy.start(engine.proc.pid)
        pyspy.open_gate_when_sampling(engine.alive, float(cfg.trace.py_spy.rate), "run")
    failure: str | None = None
    workload_result = None
    try:
        url = engine.wait_ready()
        print(f"engine ready at {url}  (trace -> {out})")
        workload_result = _drive(cfg, url, engine, live=out if args.tui else None)
    except EngineCrashed as e:
        failure = str(e) + ("\n" + e.log_tail if e.log_tail else "")
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        rc = engine.stop()
        if pyspy is not None:
            pyspy.finish()
        llmtrace.shutdown()
    if failure is None and rc not in (0, -signal.SIGTERM):
        failure = engine.describe_exit("the engine exited abnormally")
    return _finish(out, cfg, workload_result, failure)


def _clear_old_spool(out: str) -> None:
    """A reused output directory must not mix an earlier run's processes into this one."""
    from llmtrace.timeline import spool_files

    for path in spool_files(out) if os.path.isdir(os.path.join(out, "spool")) else ():
        os.remove(path)


def _pyspy_env(cfg, out: str):
    """With trace.py_spy: a py-spy recorder whose gate the engine's processes will wait at
    (in-process sampling at that rate where py-spy is missing)."""
    if cfg.trace.py_spy is None:
        return None
    from llmtrace import ENV_SAMPLE_HZ
    from llmtrace.integrations.pyspy import gate_env, recorder_for

    pyspy = recorder_for(out, cfg.trace.py_spy.rate, "run")
    os.environ.update(gate_env(pyspy.gate) if pyspy else {ENV_SAMPLE_HZ: str(cfg.trace.py_spy.rate)})
    return pyspy


FULL_DETAIL_SAMPLE_HZ = 1000.0  # at 200 a second, mistakes of ~1% of a token were found in 0 of 3 runs


def _sample_hz(cfg) -> float:
    """Stack samples per second with `trace.detail: full` (function names inside stages;
    the sampler still holds the GIL at most 2% of the time, slowing down if it must)."""
    return FULL_DETAIL_SAMPLE_HZ if cfg.trace.detail == "full" else 0.0


def _drive(cfg, url: str, engine: EngineProcess, live: str | None):
    """Run the workload against the engine, with a progress bar, or under the live TUI
    watching run directory `live` (the workload then runs in a background thread)."""
    from engine.tokenizer import Tokenizer, tokenizer_path
    from engine.workload import run_workload

    from .progress import WorkloadProgress

    tokenizer = Tokenizer(tokenizer_path(cfg.model))

    async def go(progress):
        task = asyncio.ensure_future(
            run_workload(url, cfg.workload, tokenizer, max_model_len=cfg.engine.max_model_len, progress=progress)
        )
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                await _check_engine(engine, url)
            await _check_engine(engine, url)  # a death near the end fails the last requests quickly
        finally:
            task.cancel()
        _, summary = task.result()
        return summary

    if live:
        from tui.header import RunInfo
        from tui.live import run_live

        return run_live(live, RunInfo.from_config(cfg.to_dict()), go)

    async def with_bar():
        with WorkloadProgress(cfg.workload) as bar:
            return await go(bar.update)

    return asyncio.run(with_bar())


async def _check_engine(engine: EngineProcess, url: str) -> None:
    """Raise EngineCrashed if the server process died, or if it is up but its engine is not
    (an agent died: the server answers 503 and /health says which process and how)."""
    import aiohttp

    if not engine.alive():
        raise EngineCrashed(engine.describe_exit("the engine died during the workload"), engine.log_tail())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as s:
            async with s.get(url + "/health") as r:
                if r.status != 503:
                    return
                message = (await r.json()).get("message", "unavailable")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return  # busy or going away; the process check above or the next poll tells
    raise EngineCrashed(f"the engine stopped during the workload: {message}", engine.log_tail())


def _finish(out: str, cfg, workload_result, failure: str | None) -> int:
    """Write trace.json, report.json, report.md from whatever was recorded, then print."""
    from llmtrace.load import load_trace
    from llmtrace.outputs import write_outputs

    trace = load_trace(out)
    trace.meta["config"] = _shareable_config(cfg)
    if workload_result is not None:
        trace.meta["workload"] = workload_result.to_dict()
    return write_outputs(out, trace, failure, command="run")


def _shareable_config(cfg) -> dict:
    """The config as trace.json carries it: a fixed prompt's text only with capture_text."""
    conf = cfg.to_dict()
    prompt = conf["workload"].get("prompt")
    if not cfg.trace.capture_text and prompt not in (None, "random"):
        conf["workload"]["prompt"] = f"<{len(prompt)} characters; trace.capture_text is off>"
    return conf


def _write_yaml(data: dict, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
