"""--threads-per-rank: its default from the cores and the TP, applied by init_ranks, said in the log."""

import logging
import os

import torch

from trtllm_bdlora.cli import parse_config
from trtllm_bdlora.distributed.launch import available_cores, default_threads_per_rank, init_ranks


def test_default_shares_the_cores_among_the_ranks():
    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert default_threads_per_rank(1) == cores
    assert default_threads_per_rank(cores + 1) == 1  # more ranks than cores: one thread each, never zero


def test_init_ranks_applies_and_logs_the_threads(caplog):
    before = torch.get_num_threads()
    package = logging.getLogger("trtllm_bdlora")  # once a command configured logging, it does not propagate
    package.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="trtllm_bdlora.launch"):
            init_ranks(1, "cpu", threads_per_rank=1)
        assert torch.get_num_threads() == 1
        assert "rank 0 of 1: 1 torch threads" in caplog.text
        init_ranks(1, "cpu")
        assert torch.get_num_threads() == default_threads_per_rank(1)
    finally:
        package.removeHandler(caplog.handler)
        torch.set_num_threads(before)


def test_flags_on_every_engine_command():
    for command in ("serve", "generate"):
        _, config = parse_config([command, "--threads-per-rank", "3", "--kv-cache-bytes", "1000000"]
                                 + (["--requests", "-"] if command == "generate" else []))
        assert (config.engine.threads_per_rank, config.engine.kv_cache_bytes) == (3, 1000000)
    _, bench = parse_config(["bench", "--threads", "2", "--kv-cache-bytes", "1000000"])
    assert (bench.threads_per_rank, bench.kv_cache_bytes) == (2, 1000000)  # --threads: bench's older name
