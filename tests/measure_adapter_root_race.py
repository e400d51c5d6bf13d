"""The adapter-root race: a process swaps a symlink inside --adapter-root between an adapter inside the root and one
outside it while adapters are loaded through it, the way `/v1/load_lora_adapter` loads them. Counts the loads
that were refused, that read the inside adapter, and that read the outside one (compared tensor by tensor), and
every read of an outside file (inotify).

    python tests/measure_adapter_root_race.py --loads 60 [--mode dir|file]

Runs against this checkout's loader, or, where it lacks `adapters/files.py` (before issue 26), the old one
(`adapter_dir_under` resolving and checking the path, then `load_peft_adapter` re-opening it by path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.adapter_file_helpers import ReadWatch, SymlinkSwapper  # noqa: E402
from trtllm_bdlora.errors import BdLoraError  # noqa: E402
from trtllm_bdlora.llama.shape import LlamaShape  # noqa: E402

SHAPE = LlamaShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16)
RANK = 4


def write_adapter(directory: Path, seed: int) -> dict[str, torch.Tensor]:
    """A plain LoRA on q_proj and down_proj of every layer, random non-zero values; returns its tensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(SHAPE.num_layers):
        for parent, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
            inp, out = SHAPE.module_dims(name)
            key = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=gen)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}))
    return tensors


def loader(root: Path):
    """load(lora_path) -> Adapter, the way the OpenAI API's load reads a directory under `root`."""
    from trtllm_bdlora.adapters import load_peft_adapter

    try:
        from trtllm_bdlora.serving.openai.names import adapter_root

        opened = adapter_root(str(root), True)
        if hasattr(opened, "open_adapter"):
            def load(path):
                with opened.open_adapter(path) as directory:
                    return load_peft_adapter(directory, SHAPE, max_lora_rank=64)

            return load, "descriptors beneath the root (adapters/files.py)"
    except ImportError:
        pass
    from trtllm_bdlora.serving.openai.names import adapter_dir_under, adapter_root

    resolved = adapter_root(str(root), True)
    return (lambda path: load_peft_adapter(adapter_dir_under(resolved, path), SHAPE)), "resolve, check, re-open by path"


def which(adapter, inside: dict, outside: dict) -> str:
    a = adapter.modules[(0, "q_proj")].a
    if torch.equal(a, inside["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]):
        return "inside"
    if torch.equal(a, outside["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]):
        return "outside"
    return "neither"


def race(workdir: Path, loads: int, mode: str = "dir") -> dict:
    """Run `loads` loads through a symlink being swapped; returns the counts and the outside reads."""
    root, elsewhere = workdir / "root", workdir / "elsewhere"
    inside = write_adapter(root / "inside", seed=1)
    outside = write_adapter(elsewhere / "adapter", seed=2)
    if mode == "dir":  # the adapter directory itself is the symlink
        swapper = SymlinkSwapper(root / "swap", "inside", str(elsewhere / "adapter"))
        lora_path = "swap"
    else:  # a real directory whose weights file is the symlink
        (root / "filed").mkdir()
        (root / "filed" / "adapter_config.json").write_text((root / "inside" / "adapter_config.json").read_text())
        swapper = SymlinkSwapper(root / "filed" / "adapter_model.safetensors", "../inside/adapter_model.safetensors",
                                 str(elsewhere / "adapter" / "adapter_model.safetensors"))
        lora_path = "filed"
    load, how = loader(root)
    watch = ReadWatch([elsewhere / "adapter", elsewhere / "adapter" / "adapter_model.safetensors",
                       elsewhere / "adapter" / "adapter_config.json"])
    counts = {"refused": 0, "inside": 0, "outside": 0, "neither": 0}
    errors: dict[str, int] = {}
    try:
        time.sleep(0.2)
        watch.events()  # the swapper's own opens of the directory so far
        for _ in range(loads):
            try:
                counts[which(load(lora_path), inside, outside)] += 1
            except BdLoraError as err:
                counts["refused"] += 1
                key = str(err).replace(str(workdir), "<tmp>")
                errors[key] = errors.get(key, 0) + 1
    finally:
        swapper.close()
    reads = [e for e in watch.events() if e[1] == "read"]
    watch.close()
    return {"how": how, "mode": mode, "loads": loads, **counts, "outside_file_reads": len(reads),
            "refusals": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=60)
    parser.add_argument("--mode", choices=["dir", "file"], default="dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(race(Path(tmp), args.loads, args.mode)))


if __name__ == "__main__":
    main()
