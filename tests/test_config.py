"""The run config loader: defaults, round trip, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from engine.config import ConfigError, LengthDist, RunConfig, load_config
from engine.sampling_params import SamplingParams, SamplingParamsError
from llmtrace.errors import UserError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))

GOOD = """
model: {preset: tiny, dtype: float32, device: cpu, seed: 3}
engine:
  block_size: 32
  num_blocks: 512
  max_num_seqs: 8
  max_batched_tokens: 1024
  max_model_len: 1024
workload:
  duration_s: 30
  arrival: poisson
  rate: 2.5
  input_len: {dist: normal, mean: 100, std: 20}
  output_len: 64
trace:
  out: runs/x
  detail: full
  viztracer: {stages: [preprocess], steps: 5}
  py_spy: {}
antipatterns: {gc_churn: true, prefill_batch_1: true}
"""


def test_defaults():
    cfg = load_config({})
    assert cfg == RunConfig()
    assert cfg.model.preset == "tiny" and cfg.engine.block_size == 16 and cfg.engine.num_blocks is None
    assert cfg.workload.num_requests == 100 and cfg.workload.duration_s is None
    assert cfg.trace.viztracer is None and not any(vars(cfg.antipatterns).values())


def test_good_config_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.engine.block_size == 32 and cfg.engine.num_blocks == 512
    assert cfg.workload.num_requests is None and cfg.workload.duration_s == 30.0
    assert cfg.workload.rate == 2.5 and isinstance(cfg.workload.rate, float)
    assert cfg.workload.input_len == LengthDist(dist="normal", mean=100.0, std=20.0)
    assert cfg.workload.output_len == LengthDist(dist="fixed", value=64)
    assert cfg.trace.viztracer.stages == ("preprocess",) and cfg.trace.viztracer.steps == 5
    assert cfg.trace.py_spy.rate == 200
    assert cfg.antipatterns.gc_churn and cfg.antipatterns.prefill_batch_1 and not cfg.antipatterns.log_arrays
    plain = cfg.to_dict()
    assert plain["trace"]["viztracer"]["stages"] == ["preprocess"]  # lists, not tuples: YAML/JSON-ready
    assert load_config(plain) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    load_config(path)


def test_overrides_are_yaml_parsed():
    cfg = load_config(
        {"engine": {"block_size": 8}},
        [
            "engine.block_size=32",
            "workload.input_len.value=7",
            "trace.viztracer.steps=3",
            "antipatterns.host_sampling=true",
            "model.dtype=bfloat16",
            "trace.out=null",
        ],
    )
    assert cfg.engine.block_size == 32
    assert cfg.workload.input_len.value == 7
    assert cfg.trace.viztracer.steps == 3 and cfg.trace.viztracer.stages == ("preprocess", "sampling", "postprocess")
    assert cfg.antipatterns.host_sampling is True and cfg.model.dtype == "bfloat16" and cfg.trace.out is None


def test_overrides_do_not_touch_the_callers_dict():
    data = {"engine": {"block_size": 8}}
    load_config(data, ["engine.block_size=16"])
    assert data == {"engine": {"block_size": 8}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"engine": {"block_size": 17}}, "engine.block_size: 17 is not allowed; use one of 8, 16, 32"),
        (
            {"workload": {"arival": "closed"}},
            "workload.arival: unknown key (did you mean arrival?); allowed keys: arrival, concurrency, duration_s,",
        ),
        ({"egnine": {}}, "egnine: unknown key (did you mean engine?); allowed keys: antipatterns, engine, model,"),
        ({"model": {"dtype": "fp8"}}, "model.dtype: 'fp8' is not allowed; use one of auto, float32, bfloat16, float16"),
        ({"model": {"preset": "gpt5"}}, "model.preset: 'gpt5' is not allowed; use one of tiny, llama2-7b, llama3-8b"),
        ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs: 0 is not allowed; use a value at least 1"),
        ({"engine": {"max_num_seqs": "many"}}, "engine.max_num_seqs: 'many' is not allowed; expected an integer"),
        ({"engine": {"max_num_seqs": True}}, "engine.max_num_seqs: True is not allowed; expected an integer"),
        ({"engine": {"port": 70000}}, "engine.port: 70000 is not allowed; use a value at most 65535"),
        (
            {"engine": {"cuda_graphs": "yes please"}},
            "engine.cuda_graphs: 'yes please' is not allowed; expected true or false",
        ),
        ({"engine": {"num_blocks": -4}}, "engine.num_blocks: -4 is not allowed; use a value at least 1"),
        (
            {"engine": {"max_batched_tokens": 512}},
            "engine.max_batched_tokens: 512 is smaller than engine.max_model_len (2048)",
        ),
        (
            {"engine": {"max_model_len": 16, "max_batched_tokens": 16}},
            "engine.max_batched_tokens: 16 is smaller than engine.max_num_seqs (32)",
        ),
        (
            {"engine": {"num_blocks": 100, "block_size": 8}},
            "engine.num_blocks: 100 blocks of 8 tokens cannot hold one sequence of engine.max_model_len (2048) tokens; "
            "use at least 256",
        ),
        ({"engine": 5}, "engine: 5 is not allowed; expected a mapping with keys agents, async_scheduling, block_size,"),
        ({"workload": {"rate": 0}}, "workload.rate: 0.0 is not allowed; use a value greater than 0"),
        ({"workload": {"rate": float("nan")}}, "workload.rate: nan is not allowed; expected a finite number"),
        ({"workload": {"arrival": "poisson"}}, "workload.rate: missing; arrival poisson needs rate"),
        (
            {"workload": {"num_requests": 5, "duration_s": 2}},
            "workload.duration_s: give either num_requests or duration_s",
        ),
        (
            {"workload": {"input_len": {"dist": "zipf"}}},
            "workload.input_len.dist: 'zipf' is not allowed; use one of fixed, uniform, normal",
        ),
        (
            {"workload": {"input_len": {"dist": "uniform", "min": 5}}},
            "workload.input_len.max: missing; dist uniform needs min and max",
        ),
        (
            {"workload": {"output_len": {"dist": "fixed", "value": 5, "std": 2}}},
            "workload.output_len.std: not used by dist fixed; it takes value",
        ),
        (
            {"workload": {"input_len": {"dist": "uniform", "min": 50, "max": 10}}},
            "workload.input_len.max: 10 is smaller than min (50)",
        ),
        (
            {"workload": {"input_len": {"dist": "fixed", "value": 4000}}},
            "workload.input_len: prompts up to 4000 tokens do not fit engine.max_model_len (2048)",
        ),
        ({"workload": {"input_len": "long"}}, "workload.input_len: 'long' is not allowed; expected a mapping"),
        ({"trace": {"detail": "verbose"}}, "trace.detail: 'verbose' is not allowed; use one of basic, full"),
        (
            {"trace": {"viztracer": {"stages": "forward"}}},
            "trace.viztracer.stages: 'forward' is not allowed; expected a list",
        ),
        (
            {"trace": {"viztracer": {"stages": ["forward", 3]}}},
            "trace.viztracer.stages[1]: 3 is not allowed; expected a string",
        ),
        ({"trace": {"py_spy": {"rat": 100}}}, "trace.py_spy.rat: unknown key (did you mean rate?); allowed keys: rate"),
        ({"antipatterns": {"gc_churning": True}}, "antipatterns.gc_churning: unknown key (did you mean gc_churn?)"),
        ({"antipatterns": {"gc_churn": 1}}, "antipatterns.gc_churn: 1 is not allowed; expected true or false"),
        ({"model": {"path": "/nonexistent/ckpt"}}, "model.path: '/nonexistent/ckpt' is not a directory"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        load_config(data)
    assert message in str(err.value)
    assert isinstance(err.value, UserError)


def test_preset_and_path_are_exclusive(tmp_path):
    assert load_config({"model": {"path": str(tmp_path)}}).model.preset is None
    with pytest.raises(ConfigError, match=r"model\.path: give either preset or path, not both"):
        load_config({"model": {"preset": "tiny", "path": str(tmp_path)}})


def test_bad_override():
    with pytest.raises(ConfigError, match=r"--set 'engine\.block_size': expected KEY=VALUE"):
        load_config({}, ["engine.block_size"])
    with pytest.raises(ConfigError, match=r"engine\.block_size: 12 is not allowed; use one of 8, 16, 32"):
        load_config({}, ["engine.block_size=12"])
    with pytest.raises(ConfigError, match=r"engine\.blok_size: unknown key \(did you mean block_size\?\)"):
        load_config({}, ["engine.blok_size=16"])
    with pytest.raises(ConfigError, match=r"workload\.input_len is 5, not a mapping"):
        load_config({"workload": {"input_len": 5}}, ["workload.input_len.value=6"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  block_size: 16\n  max_num_seqs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: expected a mapping with the sections antipatterns, engine"):
        load_config(scalar)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("engine:\n  block_size: 17\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: engine\.block_size: 17 is not allowed") as err:
        load_config(wrong)
    assert err.value.key == "engine.block_size"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty) == RunConfig()


def test_resolve_dtype():
    cfg = load_config({}).model
    assert cfg.resolve_dtype("cpu") == "float32" and cfg.resolve_dtype("cuda") == "bfloat16"
    assert load_config({"model": {"dtype": "float16"}}).model.resolve_dtype("cpu") == "float16"
    assert load_config({"model": {"device": "cpu"}}).model.resolve_device() == "cpu"


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(temperature=0, stop_token_ids=[2, 7])
    assert p.greedy and p.stop_token_ids == (2, 7) and p.top_k == -1 and p.max_tokens == 16


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": "2"}, "stop_token_ids"),
        ({"stop_token_ids": [1, -3]}, "stop_token_ids"),
        ({"ignore_eos": "no"}, "ignore_eos"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_sampling_params_max_tokens_limit():
    SamplingParams(max_tokens=24).check_fits(num_prompt_tokens=8, max_model_len=32)
    with pytest.raises(SamplingParamsError, match=r"max_tokens: 25 is not allowed; the 8-token prompt leaves 24"):
        SamplingParams(max_tokens=25).check_fits(num_prompt_tokens=8, max_model_len=32)
