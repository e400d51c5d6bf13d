#include "bdlora_host.h"

#include <cstring>

namespace trtllm_bdlora
{
namespace
{
constexpr size_t kAlign = 256;

size_t alignUp(size_t n)
{
    return (n + kAlign - 1) / kAlign * kAlign;
}

template <typename T>
void copyAt(std::vector<unsigned char>& buffer, size_t offset, std::vector<T> const& values)
{
    if (!values.empty())
    {
        std::memcpy(buffer.data() + offset, values.data(), values.size() * sizeof(T));
    }
}
} // namespace

std::string buildLaunchTables(HostInputs const& in, int32_t tp_size, int32_t tp_rank, LaunchTables& out)
{
    if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size)
    {
        return "invalid tp_size/tp_rank " + std::to_string(tp_size) + "/" + std::to_string(tp_rank);
    }
    if (in.batch < 0 || in.num_modules < 1 || in.pointer_width < 2)
    {
        return "invalid batch, module count or pointer width";
    }
    out.seg_start.assign(in.batch, 0);
    out.seg_len.assign(in.batch, 0);
    int64_t offset = 0;
    for (int32_t i = 0; i < in.batch; ++i)
    {
        int32_t const type = in.request_types[i];
        if (type != 0 && type != 1)
        {
            return "request " + std::to_string(i) + ": unknown request type " + std::to_string(type);
        }
        int32_t const length = type == 0 ? in.context_lengths[i] : 1;
        if (length < 0)
        {
            return "request " + std::to_string(i) + ": negative context length";
        }
        out.seg_start[i] = static_cast<int32_t>(offset);
        out.seg_len[i] = length;
        offset += length;
    }
    if (offset != in.num_tokens)
    {
        return "requests cover " + std::to_string(offset) + " tokens but the input has " + std::to_string(in.num_tokens);
    }
    out.token_idx.resize(static_cast<size_t>(in.num_tokens));
    for (int64_t t = 0; t < in.num_tokens; ++t)
    {
        out.token_idx[t] = static_cast<int32_t>(t); // tokens of a request are contiguous (remove_input_padding)
    }
    out.modules.assign(in.num_modules, ModuleTables{});
    for (int32_t j = 0; j < in.num_modules; ++j)
    {
        ModuleTables& m = out.modules[j];
        m.ptr.assign(static_cast<size_t>(in.batch) * 2, 0);
        m.meta.assign(static_cast<size_t>(in.batch) * 3, 0);
        m.scale.assign(in.batch, 1.0F);
        for (int32_t i = 0; i < in.batch; ++i)
        {
            int32_t const rank = in.ranks[j][i];
            if (rank < 0)
            {
                return "module " + std::to_string(j) + ", request " + std::to_string(i) + ": negative rank";
            }
            if (rank == 0)
            {
                continue; // no adapter for this request
            }
            if (rank % tp_size != 0)
            {
                return "module " + std::to_string(j) + ", request " + std::to_string(i) + ": rank " + std::to_string(rank)
                    + " is not divisible by tp_size " + std::to_string(tp_size)
                    + " (convert the adapter with `trtllm-bdlora convert-adapter --tp`)";
            }
            int64_t const a = in.pointers[j][static_cast<size_t>(i) * in.pointer_width];
            int64_t const b = in.pointers[j][static_cast<size_t>(i) * in.pointer_width + 1];
            if (a == 0 || b == 0)
            {
                return "module " + std::to_string(j) + ", request " + std::to_string(i) + ": null weight pointer";
            }
            int32_t const local = rank / tp_size;
            m.ptr[2 * i] = a;
            m.ptr[2 * i + 1] = b;
            m.meta[3 * i] = local;
            m.meta[3 * i + 1] = tp_rank * local;
            m.meta[3 * i + 2] = rank;
            if (local > m.max_rank)
            {
                m.max_rank = local;
            }
        }
    }
    return {};
}

bool isBuildingEngine(char const* is_building_env)
{
    return is_building_env != nullptr && std::strcmp(is_building_env, "1") == 0;
}

EnqueueStep prepareEnqueue(HostInputs const& in, int32_t tp_size, int32_t tp_rank, char const* is_building_env,
    LaunchTables& out, std::string& message)
{
    if (isBuildingEngine(is_building_env))
    {
        return EnqueueStep::kSkip;
    }
    message = buildLaunchTables(in, tp_size, tp_rank, out);
    return message.empty() ? EnqueueStep::kLaunch : EnqueueStep::kError;
}

PackedLayout packedLayout(int64_t num_tokens, int32_t batch, int32_t num_modules)
{
    PackedLayout layout;
    size_t at = 0;
    auto take = [&at](size_t bytes) {
        size_t const here = at;
        at += alignUp(bytes);
        return here;
    };
    layout.token_idx = take(static_cast<size_t>(num_tokens) * sizeof(int32_t));
    layout.seg_start = take(static_cast<size_t>(batch) * sizeof(int32_t));
    layout.seg_len = take(static_cast<size_t>(batch) * sizeof(int32_t));
    for (int32_t j = 0; j < num_modules; ++j)
    {
        layout.ptr.push_back(take(static_cast<size_t>(batch) * 2 * sizeof(int64_t)));
        layout.meta.push_back(take(static_cast<size_t>(batch) * 3 * sizeof(int32_t)));
        layout.scale.push_back(take(static_cast<size_t>(batch) * sizeof(float)));
        layout.info.push_back(take(2 * sizeof(int32_t)));
    }
    layout.total = at;
    return layout;
}

size_t workspaceBound(int64_t max_tokens, int32_t max_batch, int32_t num_modules)
{
    return packedLayout(max_tokens, max_batch, num_modules).total + kAlign;
}

void packTables(LaunchTables const& tables, PackedLayout const& layout, std::vector<int32_t> const& out_sizes,
    std::vector<unsigned char>& buffer)
{
    buffer.assign(layout.total, 0);
    copyAt(buffer, layout.token_idx, tables.token_idx);
    copyAt(buffer, layout.seg_start, tables.seg_start);
    copyAt(buffer, layout.seg_len, tables.seg_len);
    for (size_t j = 0; j < tables.modules.size(); ++j)
    {
        copyAt(buffer, layout.ptr[j], tables.modules[j].ptr);
        copyAt(buffer, layout.meta[j], tables.modules[j].meta);
        copyAt(buffer, layout.scale[j], tables.modules[j].scale);
        copyAt(buffer, layout.info[j], std::vector<int32_t>{0, out_sizes.at(j)});
    }
}

} // namespace trtllm_bdlora
