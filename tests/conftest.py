import os

import pytest
import torch

# The Triton kernel runs in Triton's interpreter on CPU. Set before any test module is imported: @triton.jit reads
# it when the kernel module is first imported, whichever test (or pytest-xdist worker) does that first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import make_peft_adapter, make_tiny_llama  # noqa: E402

# Every test module's tier (pytest -m TIER); a test's own tier marker wins. unit: in this process only;
# serve: runs the package's commands (serve, generate, bench, ...) as processes; container: builds and runs images;
# route: the production route (real tritonserver, the TensorRT plugin and TensorRT-LLM stand-ins, compilers).
TIERS = {
    "unit": """adapter_cache adapter_files adapters config_json edge_units example_training fuzz_decoders hosts_check avx2 kernel
        kserve_extensions_units kv_cache layout linear logprobs_units lora_cpu peer_cpu prefix_cache rotary sampling
        serving_edge_owners serving_scheduler sharding text_tracker threads tiers triton_interface trtllm_network
        trtllm_request_adapters""",
    "serve": """adapter_identity bad_input_kserve bad_input_openai bench bench_exit build_cli cli edge_hostile engine_tp
        error_model example_adapters example_deps
        generate_cli inspect
        kserve_extensions liveness multi_host openai_api openai_examples openai_logprobs openai_units parity projection
        rank_failure rank_liveness reliability_serve serve serve_failure shm_allreduce serving_edge serving_edge_limits
        serving_scheduler_serve smollm2 triton_serve""",
    "container": "docker_cpu trtllm_docker",
    "route": """aot gpu_suite model_repo_python model_repo_wheel plugin_build plugin_cmake real_triton real_triton_vs_serve
        triton_repo trtllm_build trtllm_model_class trtllm_prefetch trtllm_runtime_model""",
}
TIER_OF = {f"test_{name}": tier for tier, names in TIERS.items() for name in names.split()}


# Modules whose tests share one server (a session fixture) run on one pytest-xdist worker (`--dist loadgroup`), so
# that each server is started once per run; every other module is a group of its own (its module-scoped servers).
SHARED_SERVERS = {
    "triton_served": "serve triton_serve serving_edge fuzz_decoders bad_input_kserve".split(),
    "openai_served": "openai_api bad_input_openai".split(),
}
GROUP_OF = {f"test_{name}": group for group, names in SHARED_SERVERS.items() for name in names}

# The longest modules collected first (pytest-xdist's loadfile scheduling does not fully keep this order)
SLOWEST_FIRST = """bench_exit example_adapters parity multi_host real_triton docker_cpu rank_liveness triton_serve smollm2
    openai_logprobs engine_tp gpu_suite real_triton_vs_serve openai_api edge_hostile""".split()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    rank = {f"test_{name}": i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(getattr(pytest.mark, TIER_OF[item.path.stem]))
        item.add_marker(pytest.mark.xdist_group(GROUP_OF.get(item.path.stem, item.path.stem)))


@pytest.fixture
def cpu_kernels(request):
    """The engine's float32 CPU kernels for one test, by indirect parametrization: "torch" (oneDNN and SDPA) or
    "avx2" (kernels/avx2.c; skipped where the CPU lacks AVX2 and FMA). Yields the kernels module."""
    from trtllm_bdlora.kernels import avx2

    choice = getattr(request, "param", "auto")
    if choice == "avx2" and not avx2.cpu_has_avx2():
        pytest.skip("the AVX2 kernels need AVX2 and FMA")
    saved = avx2.CHOICE
    avx2.CHOICE = choice
    avx2._library.cache_clear()
    yield avx2
    avx2.CHOICE = saved
    avx2._library.cache_clear()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def bd_adapters(tiny_llama, tmp_path_factory):
    """Three BD-LoRA adapters (nblocks 8) of different ranks, made with real PEFT."""
    root = tmp_path_factory.mktemp("bd")
    return [make_peft_adapter(tiny_llama, root / f"a{i}", seed=10 + i, r=r) for i, r in enumerate((16, 8, 32))]


@pytest.fixture(scope="session")
def lora_adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "plain", seed=99, r=12, nblocks=None)


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory):
    """A random Llama carrying smollm2's tokenizer (vocabulary 49152)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_tok") / "model", tokenizer=True)


@pytest.fixture(scope="session")
def triton_served(tiny_llama_with_tokenizer, tmp_path_factory):
    """One `serve --tp 2` (tiny random Llama with smollm2's tokenizer) shared by the serving tests: adapters 1-3
    registered from PEFT directories, 4 left for first-use registration, 2 slots per rank."""
    from tests.serving_helpers import Server

    root = tmp_path_factory.mktemp("serve")
    model = tiny_llama_with_tokenizer
    adapters = {i + 1: make_peft_adapter(model, root / f"a{i + 1}", seed=30 + i, r=16) for i in range(4)}
    server = Server(model, {t: adapters[t] for t in (1, 2, 3)}, tp=2, max_loras=2)
    try:
        server.wait_ready()
        yield server, model, adapters
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.fixture(scope="session")
def openai_served(tmp_path_factory):
    """One `serve --tp 2` under the user's `mpirun -n 2` shared by the OpenAI tests: adapters 1 and `alpha` (2)
    registered, a1-a3 loadable at run time from --adapter-root (with a symlink `escape` leading outside it), and what
    `generate` answers for every case of tests/test_openai_api.py (the reference)."""
    from tests.serving_helpers import Server
    from tests.test_openai_api import generate_reference

    root = tmp_path_factory.mktemp("openai")
    model = make_tiny_llama(root / "model", tokenizer=True)
    adapter_root = root / "adapters"
    adapters = {i: make_peft_adapter(model, adapter_root / f"a{i}", seed=50 + i, r=16) for i in (1, 2, 3)}
    outside = make_peft_adapter(model, root / "outside", seed=60, r=8)
    (adapter_root / "escape").symlink_to(outside)  # inside the root by name, outside once resolved
    expected = generate_reference(model, adapters)  # first: its ranks' ports cannot take the server's
    server = Server(model, {1: adapters[1], "alpha:2": adapters[2]}, tp=2, max_loras=2,
                    extra=["--allow-adapter-loading", "--adapter-root", str(adapter_root)], mpirun=True)
    try:
        server.wait_ready()
        yield server, model, adapters, outside, expected
    finally:
        assert server.stop() == 0, server.output()[-3000:]
