// BdLora TensorRT plugin (IPluginV3, namespace "trtllm_bdlora"): TensorRT-LLM's Lora plugin interface, computing
// only this rank's block-diagonal blocks. Inputs, as TensorRT-LLM's Lora plugin (remove_input_padding):
//   [0] input [tokens, in_hidden_size]    [1] host_request_types [batch] (host)
//   [2, 2+N) lora_ranks [batch] (host)     [2+N, 2+2N) lora_weights_pointers [batch, 3] (host)
//   [2+2N] host_context_lengths [batch] (host)
// Outputs: N tensors [tokens, out_hidden_size_j]. The kernel is the AOT-compiled Triton kernel (bdlora_kernels.h).
#include "bdlora_host.h"
#include "bdlora_kernels.h"

#include <NvInfer.h>
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace trtllm_bdlora
{
namespace
{
constexpr char const* kPluginName = "BdLora";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "trtllm_bdlora";
constexpr int32_t kMaxModules = 8;

void logError(std::string const& message)
{
    std::cerr << "[trtllm_bdlora] BdLora: " << message << std::endl;
}

int32_t kernelDtype(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return 0;
    case DataType::kHALF: return 1;
    case DataType::kBF16: return 2;
    default: return -1;
    }
}

size_t elementSize(DataType type)
{
    return type == DataType::kFLOAT ? 4 : 2;
}
} // namespace

struct BdLoraParams
{
    int32_t in_hidden_size = 0;
    int32_t num_lora_modules = 1;
    int32_t out_hidden_sizes[kMaxModules] = {};
    int32_t bd_factors[kMaxModules] = {};
    int32_t type_id = static_cast<int32_t>(DataType::kHALF);
    int32_t remove_input_padding = 1;
    int32_t max_low_rank = 64;
    int32_t tp_size = 1;
    int32_t tp_rank = 0;
};

class BdLoraPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit BdLoraPlugin(BdLoraParams const& params)
        : mParams(params)
    {
        initFields();
    }

    BdLoraPlugin(BdLoraPlugin const& other)
        : mParams(other.mParams)
    {
        initFields();
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) BdLoraPlugin(*this);
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return mParams.num_lora_modules; }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return nbInputs == numInputs() && nbOutputs == mParams.num_lora_modules ? 0 : -1;
    }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t /*nbInputs*/) const noexcept override
    {
        for (int32_t j = 0; j < nbOutputs; ++j)
        {
            outputTypes[j] = inputTypes[0];
        }
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        for (int32_t j = 0; j < nbOutputs; ++j)
        {
            outputs[j] = inputs[0];
            outputs[j].d[inputs[0].nbDims - 1] = exprBuilder.constant(mParams.out_hidden_sizes[j]);
        }
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        int32_t const n = mParams.num_lora_modules;
        if (pos == 0)
        {
            return desc.type == static_cast<DataType>(mParams.type_id);
        }
        if (pos == 1 || (pos >= 2 && pos < 2 + n) || pos == 2 + 2 * n)
        {
            return desc.type == DataType::kINT32;
        }
        if (pos >= 2 + n && pos < 2 + 2 * n)
        {
            return desc.type == DataType::kINT64;
        }
        return pos >= nbInputs && desc.type == inOut[0].desc.type;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        int64_t const maxTokens = inputs[0].max.d[0];
        int32_t const maxBatch = static_cast<int32_t>(inputs[1].max.d[0]);
        return workspaceBound(maxTokens, maxBatch, mParams.num_lora_modules);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        int32_t const n = mParams.num_lora_modules;
        int64_t const numTokens = inputDesc[0].dims.d[0];
        int32_t const batch = static_cast<int32_t>(inputDesc[1].dims.d[0]);
        for (int32_t j = 0; j < n; ++j)
        {
            size_t const bytes = static_cast<size_t>(numTokens) * mParams.out_hidden_sizes[j] * elementSize(outputDesc[j].type);
            if (cudaMemsetAsync(outputs[j], 0, bytes, stream) != cudaSuccess)
            {
                return -1;
            }
        }
        if (numTokens == 0 || batch == 0)
        {
            return 0;
        }
        std::vector<int32_t const*> ranks(n);
        std::vector<int64_t const*> pointers(n);
        for (int32_t j = 0; j < n; ++j)
        {
            ranks[j] = static_cast<int32_t const*>(inputs[2 + j]);
            pointers[j] = static_cast<int64_t const*>(inputs[2 + n + j]);
        }
        HostInputs host;
        host.batch = batch;
        host.num_tokens = numTokens;
        host.request_types = static_cast<int32_t const*>(inputs[1]);
        host.context_lengths = static_cast<int32_t const*>(inputs[2 + 2 * n]);
        host.num_modules = n;
        host.ranks = ranks.data();
        host.pointers = pointers.data();
        host.pointer_width = static_cast<int32_t>(inputDesc[2 + n].dims.d[1]);
        std::string error;
        switch (prepareEnqueue(host, mParams.tp_size, mParams.tp_rank, std::getenv("IS_BUILDING"), mTables, error))
        {
        case EnqueueStep::kSkip: return 0; // engine build: tactic timing with host inputs that are not requests
        case EnqueueStep::kError: logError(error); return -1;
        case EnqueueStep::kLaunch: break;
        }
        PackedLayout const layout = packedLayout(numTokens, batch, n);
        packTables(mTables, layout, std::vector<int32_t>(mParams.out_hidden_sizes, mParams.out_hidden_sizes + n),
            mHostBuffer);
        if (cudaMemcpyAsync(workspace, mHostBuffer.data(), layout.total, cudaMemcpyHostToDevice, stream) != cudaSuccess)
        {
            return -1;
        }
        auto const base = reinterpret_cast<CUdeviceptr>(workspace);
        int32_t const dtype = kernelDtype(inputDesc[0].type);
        for (int32_t j = 0; j < n; ++j)
        {
            int32_t const maxRank = mTables.modules[j].max_rank;
            if (maxRank == 0)
            {
                continue;
            }
            int32_t const m = mParams.out_hidden_sizes[j];
            int32_t const mBlocks = (m + BDLORA_BLOCK_M - 1) / BDLORA_BLOCK_M;
            auto const gridX = static_cast<unsigned>((numTokens + BDLORA_BLOCK_T - 1) / BDLORA_BLOCK_T * mBlocks);
            CUresult const status = bdlora_launch(reinterpret_cast<CUstream>(stream), dtype, maxRank, gridX, 1,
                static_cast<unsigned>(batch), reinterpret_cast<CUdeviceptr>(inputs[0]),
                reinterpret_cast<CUdeviceptr>(outputs[j]), base + layout.token_idx, base + layout.seg_start,
                base + layout.seg_len, base + layout.ptr[j], base + layout.meta[j], base + layout.scale[j],
                base + layout.info[j], base + layout.info[j] + sizeof(int32_t), mParams.in_hidden_size,
                mParams.in_hidden_size, m, batch, mBlocks);
            if (status != CUDA_SUCCESS)
            {
                logError("kernel launch failed (CUresult " + std::to_string(status) + ", dtype " + std::to_string(dtype)
                    + ", max rank " + std::to_string(maxRank) + ")");
                return -1;
            }
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mFieldCollection;
    }

private:
    int32_t numInputs() const
    {
        return 3 + 2 * mParams.num_lora_modules;
    }

    void initFields()
    {
        mFields = {
            PluginField("in_hidden_size", &mParams.in_hidden_size, PluginFieldType::kINT32, 1),
            PluginField("num_lora_modules", &mParams.num_lora_modules, PluginFieldType::kINT32, 1),
            PluginField("out_hidden_sizes", mParams.out_hidden_sizes, PluginFieldType::kINT32, mParams.num_lora_modules),
            PluginField("bd_factors", mParams.bd_factors, PluginFieldType::kINT32, mParams.num_lora_modules),
            PluginField("type_id", &mParams.type_id, PluginFieldType::kINT32, 1),
            PluginField("remove_input_padding", &mParams.remove_input_padding, PluginFieldType::kINT32, 1),
            PluginField("max_low_rank", &mParams.max_low_rank, PluginFieldType::kINT32, 1),
            PluginField("tp_size", &mParams.tp_size, PluginFieldType::kINT32, 1),
            PluginField("tp_rank", &mParams.tp_rank, PluginFieldType::kINT32, 1),
        };
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    BdLoraParams mParams;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
    LaunchTables mTables;
    std::vector<unsigned char> mHostBuffer;
};

class BdLoraPluginCreator : public IPluginCreatorV3One
{
public:
    BdLoraPluginCreator()
    {
        for (char const* name : {"in_hidden_size", "num_lora_modules", "out_hidden_sizes", "bd_factors", "type_id",
                 "remove_input_padding", "max_low_rank", "tp_size", "tp_rank"})
        {
            mFieldNames.emplace_back(name, nullptr, PluginFieldType::kINT32, 0);
        }
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        BdLoraParams p;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            auto const* v = static_cast<int32_t const*>(f.data);
            std::string const name = f.name;
            if (f.type != PluginFieldType::kINT32 || v == nullptr)
            {
                logError("field " + name + " must be INT32");
                return nullptr;
            }
            if (name == "out_hidden_sizes" || name == "bd_factors")
            {
                if (f.length > kMaxModules)
                {
                    logError("at most 8 LoRA modules per plugin");
                    return nullptr;
                }
                std::memcpy(name == "out_hidden_sizes" ? p.out_hidden_sizes : p.bd_factors, v, f.length * sizeof(int32_t));
            }
            else if (name == "in_hidden_size") p.in_hidden_size = *v;
            else if (name == "num_lora_modules") p.num_lora_modules = *v;
            else if (name == "type_id") p.type_id = *v;
            else if (name == "remove_input_padding") p.remove_input_padding = *v;
            else if (name == "max_low_rank") p.max_low_rank = *v;
            else if (name == "tp_size") p.tp_size = *v;
            else if (name == "tp_rank") p.tp_rank = *v;
        }
        if (p.num_lora_modules < 1 || p.num_lora_modules > kMaxModules || p.tp_size < 1 || p.tp_rank < 0
            || p.tp_rank >= p.tp_size || !p.remove_input_padding)
        {
            logError("invalid fields (num_lora_modules 1..8, 0 <= tp_rank < tp_size, remove_input_padding required)");
            return nullptr;
        }
        return new (std::nothrow) BdLoraPlugin(p);
    }

private:
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
};

namespace
{
// Registers the creator when the library is loaded (ctypes when building, LD_PRELOAD in tritonserver).
struct Registrar
{
    Registrar()
    {
        static BdLoraPluginCreator creator;
        getPluginRegistry()->registerCreator(creator, kPluginNamespace);
    }
};
Registrar const gRegistrar{};
} // namespace

} // namespace trtllm_bdlora
