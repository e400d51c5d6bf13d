// Host-side logic of the BD-LoRA TensorRT plugin, free of TensorRT types so it builds and is tested with g++.
//
// Turns the per-request host inputs of TensorRT-LLM's Lora plugin (request types, context lengths, and per
// module: ranks and [A ptr, B ptr, DoRA ptr] pointers) into the kernel's token segments and adapter tables.
// This rank multiplies rows [tp_rank*r/tp, (tp_rank+1)*r/tp) of A and the same columns of B: its BD blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace trtllm_bdlora
{

enum class BdFactor : int32_t
{
    kA = 1, // row-parallel module (o, down): block-diagonal A
    kB = 2, // column-parallel module (q, k, v, gate, up): block-diagonal B
};

struct HostInputs
{
    int32_t batch = 0;
    int64_t num_tokens = 0;
    int32_t const* request_types = nullptr;   // [batch]: 0 context, 1 generation
    int32_t const* context_lengths = nullptr; // [batch]
    int32_t num_modules = 0;
    int32_t const* const* ranks = nullptr;    // [num_modules][batch]
    int64_t const* const* pointers = nullptr; // [num_modules][batch * pointer_width]
    int32_t pointer_width = 3;
};

// One module's tables, laid out as the kernel reads them (n_out = 1, num_slots = batch).
struct ModuleTables
{
    std::vector<int64_t> ptr;  // [batch][2]: A, B
    std::vector<int32_t> meta; // [batch][3]: local rank, rank offset, B row stride (full rank)
    std::vector<float> scale;  // [batch]: 1 (TensorRT-LLM folds the scaling into B)
    int32_t max_rank = 0;
};

struct LaunchTables
{
    std::vector<int32_t> token_idx; // [num_tokens]
    std::vector<int32_t> seg_start; // [batch]
    std::vector<int32_t> seg_len;   // [batch]
    std::vector<ModuleTables> modules;
};

// Byte offsets of each table inside one packed workspace buffer (each 256-byte aligned).
struct PackedLayout
{
    size_t token_idx = 0, seg_start = 0, seg_len = 0;
    std::vector<size_t> ptr, meta, scale, info; // info: int32 (out_offset = 0, out_size) per module
    size_t total = 0;
};

// Fills `out`; returns an empty string on success, else a one-line reason.
std::string buildLaunchTables(HostInputs const& in, int32_t tp_size, int32_t tp_rank, LaunchTables& out);

// True while TensorRT-LLM builds an engine: its Builder.build_engine runs with IS_BUILDING=1 (builder.py
// `_is_building`), and TensorRT then calls enqueue for tactic timing with host inputs that are not requests.
bool isBuildingEngine(char const* is_building_env);

enum class EnqueueStep
{
    kSkip,   // engine build (tactic timing): the host inputs are not requests; outputs stay zero
    kLaunch, // tables built: launch the kernel for every module with max_rank > 0
    kError,  // `message` says why
};

// enqueue's host side: decides from IS_BUILDING (passed in as its value, or nullptr) before any host input is read.
EnqueueStep prepareEnqueue(HostInputs const& in, int32_t tp_size, int32_t tp_rank, char const* is_building_env,
    LaunchTables& out, std::string& message);

PackedLayout packedLayout(int64_t num_tokens, int32_t batch, int32_t num_modules);
// Upper bound of the packed size, for TensorRT's workspace query.
size_t workspaceBound(int64_t max_tokens, int32_t max_batch, int32_t num_modules);
void packTables(LaunchTables const& tables, PackedLayout const& layout, std::vector<int32_t> const& out_sizes,
    std::vector<unsigned char>& buffer);

} // namespace trtllm_bdlora
