"""benchmarks/peer_cpu.py gives every AIPerf run prompts of its own (vLLM's prefix cache served a repeated run's
prefills from memory), the same prompts to the two runs of a pair; benchmarks/chat_turns.py reads both servers'
prefix cache counters."""

import importlib.util
import itertools
import json
import sys
import types

from tests.helpers import REPO


def _peer(name: str = "peer_cpu"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_run_of_a_row_has_its_own_prompt_seed():
    peer = _peer()
    runs = list(itertools.product(("base", "lora"), range(20)))  # warm-up runs and pairs of each load
    seeds = [peer.prompt_seed(*r) for r in runs]
    assert len(set(seeds)) == len(seeds)


def test_the_seed_reaches_aiperf(tmp_path):
    """A stand-in `aiperf` that records its command line and writes the export file AIPerf writes."""
    peer = _peer()
    fake = tmp_path / "aiperf"
    export = {"output_token_throughput": {"avg": 12.5}, "time_to_first_token": {"p50": 3.0, "p99": 4.0},
              "inter_token_latency": {"p50": 5.0, "p99": 6.0}, "request_count": {"avg": 4}}
    fake.write_text(f"#!{sys.executable}\nimport json, sys, pathlib\n"
                    "out = pathlib.Path(sys.argv[sys.argv.index('--output-artifact-dir') + 1])\n"
                    "out.mkdir(parents=True, exist_ok=True)\n"
                    "(out / 'argv.json').write_text(json.dumps(sys.argv))\n"
                    f"(out / 'profile_export_aiperf.json').write_text({json.dumps(json.dumps(export))})\n")
    fake.chmod(0o755)
    args = types.SimpleNamespace(aiperf=str(fake), concurrency=2, requests=4, isl=8, osl=4, model_dir="m")
    server = types.SimpleNamespace(port=1, sample=lambda on: None)
    row = peer.aiperf(args, server, ["base"], tmp_path / "run", peer.prompt_seed("lora", 1))
    argv = json.loads((tmp_path / "run" / "argv.json").read_text())
    assert argv[argv.index("--random-seed") + 1] == str(peer.prompt_seed("lora", 1)) == str(row["seed"])
    assert row["out_tok_s"] == 12.5 and row["requests"] == 4


def test_chat_turns_reads_both_servers_prefix_counters():
    parse_counters = _peer("chat_turns").parse_counters
    ours = ("# TYPE trtllm_bdlora_prefix_cache_queries counter\ntrtllm_bdlora_prefix_cache_queries_total 1876.0\n"
            "trtllm_bdlora_prefix_cache_hits_total 1574.0\n")
    vllm = ('vllm:prefix_cache_queries_total{engine="0",model_name="base"} 1.876e+03\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="base"} 768.0\n'
            'vllm:prefix_cache_hits_created{engine="0",model_name="base"} 1.7e9\n')
    assert parse_counters(ours) == {"queries": 1876.0, "hits": 1574.0}
    assert parse_counters(vllm) == {"queries": 1876.0, "hits": 768.0}
