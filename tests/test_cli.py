"""The command line: every flag of every command has help text and shows its default, reaches the field of the same
name in the command's configuration (trtllm_bdlora/config.py) and changes it; bad command lines, bad values, taken
ports and missing paths fail at once with one line naming the flag (with a suggestion for a mistyped flag), before
any rank starts; the log formats."""

import argparse
import dataclasses
import json
import logging
import re
import socket
import time

import pytest

from tests.serving_helpers import free_port
from trtllm_bdlora import __version__, cli
from trtllm_bdlora.cli.flags import HelpFormatter
from trtllm_bdlora.config import EngineConfig, LogConfig, ServeConfig

# configuration fields no flag sets, and where their value comes from
NOT_FLAGS = {"lora_kernel": "TRTLLM_BDLORA_KERNEL, read once at start-up", "progress_bars": "stderr is a terminal"}
NOT_FLAGS_OF = {"generate": {"allow_request_adapters"}}  # generate's requests carry no adapter weights
# flags that are refused without others
NEEDS = {"--adapter-root": ["--allow-adapter-loading"], "--allow-adapter-loading": ["--adapter-root", "/x"],
         "--allow-startup-adapter-unload": ["--allow-adapter-loading", "--adapter-root", "/x"]}
# values that make every required flag of a command parse (the files need not exist: nothing runs)
REQUIRED = {"inspect": ["adapter"], "generate": ["--requests", "r.jsonl"], "client": ["--text", "hi"],
            "fill-model-repo": ["--engine-dir", "e", "--tokenizer-dir", "t", "--output", "o"],
            "launch-triton": ["--world-size", "2", "--model-repo", "r"],
            "build": ["--model", "m", "--tp", "2", "--output", "o"], "convert-adapter": ["adapter", "--output", "o"],
            "aot": ["--output", "o"]}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return dict(cli.build_parser().commands)


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    from trtllm_bdlora.cli import smoke

    parsers = {**subcommands(), "smoke.sh": smoke.build_parser()}
    assert len(parsers) == 13
    for name, parser in parsers.items():
        assert parser.description and len(parser.description) > 40, name
        for action in flag_actions(parser):
            where = f"{name} {'/'.join(action.option_strings) or action.metavar}"
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, where
            text = HelpFormatter(name)._get_help_string(action) % {"default": action.default}
            shown = action.default not in (None, False, [], ()) and not action.required and action.option_strings
            assert not shown or "default" in text, where
            if text != action.help:  # the formatter appended the default: the value itself
                assert f"(default: {action.default})" in text, where
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in commands._choices_actions}  # the one-line help `trtllm-bdlora --help` lists
    assert set(helps) == set(subcommands()) and all(len(h) > 20 for h in helps.values()), helps


def _test_value(action: argparse.Action, index: int) -> list[str]:
    """Command-line words setting this flag to a value other than its default."""
    flag = action.option_strings[0] if action.option_strings else None
    special = {"--device": "cpu", "--adapter": "5=/x", "--set": "k=v", "--adapter-dir": "/x", "--url": "h:1",
               "--arch": "sm_90", "--block-r": "32", "--host": "0.0.0.0", "--gpu": "h100-sxm",
               "--allowed-origins": "https://app.example"}
    if flag is None:
        return ["other"]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--no-{flag[2:]}" if action.default else flag]
    if action.nargs == 0:
        return [flag]
    if action.type is int:
        value = 19000 + index if "port" in flag else (3 if action.default != 3 else 5)
        return [flag, str(value), *(["3"] if action.nargs == "+" else [])]
    if flag in special:
        return [flag, special[flag]]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    if action.type is float:
        return [flag, "2.5"]
    return [flag, f"value{index}"]


def _config_value(config, dest: str):
    section, field = dest.split(".")
    for f in dataclasses.fields(config):  # the section is the config itself, or one of its nested configurations
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and f.name == section:
            return getattr(value, field)
    return getattr(config, field)


def test_every_flag_reaches_its_configuration_field_and_changes_it():
    for name, parser in subcommands().items():
        base = [name, *REQUIRED.get(name, [])]
        _, default = cli.parse_config(base)
        flagged = set()
        for index, action in enumerate(flag_actions(parser)):
            if not action.option_strings:
                continue
            words = _test_value(action, index)
            words += NEEDS.get(words[0], [])
            if words[0] == "--max-seq-len":
                words[1] = "4096"
            _, config = cli.parse_config(base + words)
            field = action.dest.split(".")[1]
            flagged.add(field)
            assert _config_value(config, action.dest) != _config_value(default, action.dest), (name, words)
        sections = [default] + [getattr(default, f.name) for f in dataclasses.fields(default)
                                if dataclasses.is_dataclass(getattr(default, f.name))]
        fields = {f.name for s in sections for f in dataclasses.fields(s) if not dataclasses.is_dataclass(getattr(s, f.name))}
        positional = {a.dest.split(".")[1] for a in flag_actions(parser) if not a.option_strings}
        missing = fields - flagged - positional - set(NOT_FLAGS) - NOT_FLAGS_OF.get(name, set())
        assert not missing, f"{name}: configuration fields without a flag: {missing}"


def test_the_docker_entrypoint_knows_every_serve_setting():
    """A new serve flag must be passed on by the Triton route of docker/entrypoint.sh, or refused there."""
    from trtllm_bdlora.cli.entrypoint import TORCH_ONLY, TRITON_ROUTE

    config = ServeConfig()
    settings = {f"{section.name}.{f.name}" for section in dataclasses.fields(config)
                for f in dataclasses.fields(getattr(config, section.name)) if f.name not in NOT_FLAGS}
    assert settings == TRITON_ROUTE | set(TORCH_ONLY) and not TRITON_ROUTE & set(TORCH_ONLY)


def test_the_docker_entrypoint_writes_the_repository_serve_set_describes():
    """`serve --set KEY=VALUE` answers as the repository `fill-model-repo --set KEY=VALUE` writes: on the Triton
    route the entrypoint writes that repository."""
    from trtllm_bdlora.cli.entrypoint import trtllm_plan

    _, config = cli.parse_config(["serve", "--backend", "trtllm", "--model", "/models/llama", "--set",
                                  "decoupled_mode=false", "--set", "exclude_input_in_output=true"])
    fill = next(step for step in trtllm_plan(config, {}, engines_exist=True) if step[1] == "fill-model-repo")
    assert fill[-4:] == ["--set", "decoupled_mode=false", "--set", "exclude_input_in_output=true"]


def test_bench_offers_only_the_engine_flags_it_honours():
    bench = subcommands()["bench"]
    flags = {s for a in bench._actions for s in a.option_strings}
    assert {"--model", "--tp", "--dtype", "--device", "--max-loras", "--max-lora-rank", "--comm-interface"} <= flags
    assert not flags & {"--scheme", "--backend", "--adapter", "--max-batch-size", "--lora-cache-host-bytes",
                        "--pin-adapters", "--max-num-tokens"}
    assert {"--threads-per-rank", "--threads", "--kv-cache-bytes"} <= flags


def test_bench_honours_comm_interface(monkeypatch):
    """The ranks' process group binds to --comm-interface (it was accepted and dropped before), and the ranks
    watch each other with bench's --rank-timeout."""
    from trtllm_bdlora.perf import bench

    seen = {}

    def init_ranks(tp, device, interface=None, threads_per_rank=None, rank_timeout=None, command=None):
        seen.update(tp=tp, device=device, interface=interface, threads_per_rank=threads_per_rank,
                    rank_timeout=rank_timeout, command=command)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "init_ranks", init_ranks)
    _, config = cli.parse_config(["bench", "--comm-interface", "lo", "--device", "cpu", "--threads", "2",
                                  "--rank-timeout", "3.5"])
    with pytest.raises(RuntimeError, match="stop here"):
        bench.bench(config)
    assert seen == {"tp": 1, "device": "cpu", "interface": "lo", "threads_per_rank": 2, "rank_timeout": 3.5,
                    "command": "bench"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"trtllm-bdlora {__version__}"


def _one_line_error(capsys, *argv) -> str:
    """The command's only stderr line; exit status 2."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as exit_:
        rc = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, (argv, rc, err)
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a rank would be started."""
    import trtllm_bdlora.distributed.launcher as launcher

    def refuse(*args, **kwargs):
        raise AssertionError("a rank was launched")

    monkeypatch.setattr(launcher, "relaunch_ranks", refuse)


def test_bad_command_lines_are_one_line_naming_the_flag(capsys, tmp_path, tiny_llama, bd_adapters, no_launch):
    cases = {
        ("serve", "--http-port", "99999"): "--http-port 99999: not a TCP port (1-65535)",
        ("serve", "--tpp", "3"): "unrecognized arguments: --tpp (did you mean --tp?) 3",
        ("serv", "--tp", "3"): "invalid choice: 'serv'",
        ("serve", "--scheme", "bdlor"): "(did you mean bdlora?)",
        ("generate", "--requests", "-", "--stats", "--log-levle", "info"): "(did you mean --log-level?)",
        ("serve", "--adapter-root", str(tmp_path)): "--adapter-root is only used with --allow-adapter-loading",
        ("serve", "--allow-adapter-loading"): "--allow-adapter-loading needs --adapter-root",
        ("serve", "--tp", "0"): "--tp 0: must be >= 1",
        ("serve", "--openai-port", "8000"): "--openai-port 8000 is also --http-port",
        ("serve", "--adapter", "0=/x"): "argument --adapter: expected ID=DIR",
        ("serve", "--max-queue", "x"): "argument --max-queue: invalid int value: 'x'",
        ("serve", "--device", "gpu"): "--device gpu: expected cpu, cuda or cuda:N",
        ("serve", "--shutdown-timeout", "nan"): "--shutdown-timeout nan",
        ("bench", "--threads", "0"): "--threads-per-rank 0: must be >= 1",
        ("serve", "--rank-timeout", "-1"): "--rank-timeout -1.0: must be a finite number of seconds >= 0 (0: off)",
        ("generate", "--requests", "-", "--rank-timeout", "inf"): "--rank-timeout inf: must be a finite number",
        ("serve", "--tp", "2", "--model", str(tiny_llama), "--adapter", f"1={tmp_path / 'none'}"):
            f"--adapter 1={tmp_path / 'none'}: adapter directory not found",
        ("serve", "--tp", "2", "--model", str(tmp_path)): f"--model: {tmp_path}: not a Hugging Face model directory",
        ("serve", "--tp", "3", "--model", str(tiny_llama)): "--tp 3 does not divide num_attention_heads=8",
        ("serve", "--tp", "2", "--model", str(tiny_llama), "--adapter", f"alpha:1={bd_adapters[0]}",
         "--served-model-name", "alpha"): "adapter name 'alpha' is the base model's name",
        ("serve", "--tp", "2", "--model", str(tiny_llama), "--host", "no.such.host.invalid"): "--host no.such.host.invalid",
        ("bench", "--model", str(tiny_llama), "--comm-interface", "nosuch0"): "--comm-interface nosuch0: no such",
        ("generate", "--model", str(tiny_llama), "--tp", "2", "--requests", str(tmp_path / "none.jsonl")):
            "--requests",
    }
    for argv, expected in cases.items():
        line = _one_line_error(capsys, *argv)
        assert expected in line, (argv, line)
        assert line.startswith(f"trtllm-bdlora {argv[0] if argv[0] != 'serv' else ''}".rstrip()), line


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port", "--openai-port"])
def test_every_taken_port_fails_serve_before_any_rank_starts(flag, capsys, tiny_llama, no_launch):
    """Issue 29 item 7: each of serve's four ports is checked before any rank starts, and the error names its flag."""
    ports = {f: free_port() for f in ("--http-port", "--grpc-port", "--metrics-port", "--openai-port")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[flag]))
        taken.listen()
        t0 = time.monotonic()
        line = _one_line_error(capsys, "serve", "--model", str(tiny_llama), "--tp", "2",
                               *[str(x) for kv in ports.items() for x in kv])
    assert f"cannot listen on 127.0.0.1:{ports[flag]} ({flag})" in line, line
    assert time.monotonic() - t0 < 30  # before any model is loaded (the checks read config.json only)


def test_configurations_check_their_values_from_python_too():
    with pytest.raises(Exception, match="--max-loras 0: must be >= 1"):
        EngineConfig(max_loras=0)
    with pytest.raises(Exception, match="--adapter: task id 1 given twice"):
        cli.parse_config(["serve", "--adapter", "1=/a", "--adapter", "1=/b"])
    config = ServeConfig()
    assert config.server.ports == {"--http-port": 8000, "--grpc-port": 8001, "--metrics-port": 8002, "--openai-port": 9000}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.engine.tp = 2


def test_kernel_choice_is_read_once_into_the_configuration(monkeypatch):
    from trtllm_bdlora.config import lora_kernel_from_env

    monkeypatch.setenv("TRTLLM_BDLORA_KERNEL", "reference")
    _, config = cli.parse_config(["serve"])
    assert config.engine.lora_kernel == "reference"
    with pytest.raises(Exception, match="TRTLLM_BDLORA_KERNEL=fast: choose from auto, triton, torch, reference"):
        lora_kernel_from_env({"TRTLLM_BDLORA_KERNEL": "fast"})


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_log_formats(fmt, capsys, monkeypatch):
    from trtllm_bdlora.engine.request import Request
    from trtllm_bdlora.logs import configure_logging, log_event, log_request, startup

    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    req = Request(4, "req 1", 7, [1, 2, 3], 5, output_ids=[9], times_ns={"arrival": 0, "first_scheduled": 2_000_000})
    try:
        configure_logging(LogConfig(level="info", format=fmt, progress_bars=False))
        log_request(req, "ensemble", "length")
        log_event(startup, "loading weights done", seconds=1.25, model="m")
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        package = logging.getLogger("trtllm_bdlora")
        package.handlers.clear()
        package.setLevel(logging.NOTSET)
        package.propagate = True
    assert len(lines) == 2
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    if fmt == "kv":
        assert re.fullmatch(stamp + r' INFO trtllm_bdlora\.access id="req 1" seq=4 model=ensemble adapter=7 tokens_in=3 '
                            r"tokens_out=1 queue_ms=2\.0 compute_ms=\d+\.\d outcome=length", lines[0]), lines[0]
        assert re.fullmatch(stamp + r" INFO trtllm_bdlora\.startup loading weights done seconds=1\.2 model=m", lines[1])
    else:
        access, phase = map(json.loads, lines)
        assert re.fullmatch(stamp, access["time"]) and access["level"] == "info"
        assert {k: access[k] for k in ("logger", "id", "seq", "adapter", "tokens_in", "outcome")} == {
            "logger": "trtllm_bdlora.access", "id": "req 1", "seq": 4, "adapter": 7, "tokens_in": 3, "outcome": "length"}
        assert (phase["message"], phase["seconds"], phase["model"]) == ("loading weights done", 1.25, "m")
    import os

    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # not a terminal


def test_checks_read_the_models_shape_as_transformers_does(tiny_llama, tmp_path):
    """The checks before any rank starts read config.json without transformers; the shape must be transformers'."""
    from tests.helpers import make_tiny_llama
    from trtllm_bdlora.llama.config_json import read_config_shape
    from trtllm_bdlora.llama.loader import load_model_config

    nine = make_tiny_llama(tmp_path / "nine", heads=9, kv_heads=3, hidden=144)
    bare = tmp_path / "bare"  # the fields LlamaConfig defaults left out
    bare.mkdir()
    full = json.loads((tiny_llama / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({k: v for k, v in full.items()
                                                  if k not in ("num_key_value_heads", "head_dim", "vocab_size")}))
    for model in (tiny_llama, nine, bare):
        assert read_config_shape(model) == load_model_config(str(model)), model
    (bare / "config.json").write_text(json.dumps({**full, "model_type": "mistral"}))
    with pytest.raises(Exception, match="model_type 'mistral' is not llama"):
        read_config_shape(bare)
