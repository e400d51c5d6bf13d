"""The pure parts of distributed/hosts.py: what hosts disagree on, file digests, naming a lost host from gloo's
error (the launches across hosts are in test_multi_host.py)."""

from __future__ import annotations

import copy
import hashlib
import os

from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.distributed.hosts import WHOLE_FILE_BYTES, describe_loss, disagreement, file_digest


def _print(host: str) -> dict:
    return {"host": host, "versions": {"trtllm-bdlora": "0.1.0", "torch": "2.13.0", "transformers": "4.57",
                                       "python": "3.11.7"},
            "command": "serve", "layout": {"tp": 2, "scheme": "bdlora", "dtype": "float32", "max_loras": 8,
                                           "max_lora_rank": None, "rank": None, "num_adapters": None},
            "model": {"path": "/m", "digest": "a" * 64}}


def test_hosts_that_agree_pass():
    assert disagreement([_print("h1"), _print("h1"), _print("h2"), _print("h2")]) is None


def test_one_line_names_what_differs_and_each_hosts_value():
    prints = [_print("h1"), _print("h1"), _print("h2"), _print("h2")]
    for p in prints[2:]:
        p["versions"]["torch"] = "2.12.0"
        p["model"]["digest"] = "d" * 64
    message = disagreement(prints)
    assert "\n" not in message
    assert message.startswith("the hosts disagree on torch version: 2.13.0 on h1; 2.12.0 on h2")
    assert "(and 1 more: model /m)" in message


def test_another_model_and_another_scheme_are_named():
    prints = [_print("h1"), _print("h2")]
    prints[1]["model"]["digest"] = "e" * 64
    assert disagreement(prints).startswith("the hosts disagree on model /m: aaaaaaaaaaaa on h1; eeeeeeeeeeee on h2")
    prints = [_print("h1"), _print("h2")]
    prints[1]["layout"]["scheme"] = "slora"
    assert disagreement(copy.deepcopy(prints)).startswith("the hosts disagree on --scheme: bdlora on h1; slora on h2")


def test_small_files_are_hashed_whole_and_large_ones_by_samples(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(os.urandom(1000))
    expected = hashlib.sha256(b"1000" + small.read_bytes()).hexdigest()
    assert file_digest(small) == expected
    big = tmp_path / "big"
    data = bytearray(os.urandom(WHOLE_FILE_BYTES + (3 << 20)))
    big.write_bytes(data)
    before = file_digest(big)
    data[10] ^= 1  # inside the first sampled piece
    big.write_bytes(data)
    flipped = file_digest(big)
    assert flipped != before
    big.write_bytes(data + b"x")  # the size is part of the digest
    assert file_digest(big) != flipped


def test_a_lost_peer_is_named_from_gloos_error():
    comm = Comm(0, 4, hosts=["h1", "h1", "h2", "h2"], addrs=["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    error = ("[/x/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:40411: Connection reset by peer. This is "
             "typically caused by a remote worker hanging. GLHF!")
    assert describe_loss(comm, error) == "rank 0 lost host h2 (ranks 2, 3): Read error [10.0.0.2]:40411: Connection reset by peer"


def test_without_a_peer_in_the_error_and_no_store_nothing_is_guessed():
    comm = Comm(1, 2, hosts=["h1", "h2"], addrs=["10.0.0.1", "10.0.0.2"])
    assert describe_loss(comm, "Timed out waiting 15000ms for recv operation to complete") == (
        "rank 1 lost contact with the other ranks (Timed out waiting 15000ms for recv operation to complete)")
