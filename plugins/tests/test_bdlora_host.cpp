// Unit test of the plugin's host logic (g++, no TensorRT, no GPU).
#include "bdlora_host.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace trtllm_bdlora;

static int failures = 0;
#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                                \
            ++failures;                                                                                                \
        }                                                                                                              \
    } while (0)

struct Batch
{
    std::vector<int32_t> types, lengths;
    std::vector<std::vector<int32_t>> ranks;
    std::vector<std::vector<int64_t>> pointers;
    std::vector<int32_t const*> rank_ptrs;
    std::vector<int64_t const*> pointer_ptrs;
    int64_t tokens = 0;

    HostInputs inputs()
    {
        rank_ptrs.clear();
        pointer_ptrs.clear();
        for (auto& r : ranks)
            rank_ptrs.push_back(r.data());
        for (auto& p : pointers)
            pointer_ptrs.push_back(p.data());
        HostInputs in;
        in.batch = static_cast<int32_t>(types.size());
        in.num_tokens = tokens;
        in.request_types = types.data();
        in.context_lengths = lengths.data();
        in.num_modules = static_cast<int32_t>(ranks.size());
        in.ranks = rank_ptrs.data();
        in.pointers = pointer_ptrs.data();
        return in;
    }
};

static Batch mixedBatch()
{
    Batch b;
    b.types = {0, 1, 0, 1};       // context, generation, context, generation
    b.lengths = {5, 9, 3, 12};    // generation requests own one token whatever their context length
    b.tokens = 5 + 1 + 3 + 1;
    b.ranks = {{16, 0, 8, 32}, {16, 0, 8, 32}, {64, 0, 8, 32}}; // 3 modules (q|k|v), request 1 has no adapter
    for (int j = 0; j < 3; ++j)
    {
        std::vector<int64_t> p;
        for (int i = 0; i < 4; ++i)
        {
            p.push_back(0x1000 * (j + 1) + 0x100 * i); // A
            p.push_back(0x9000 * (j + 1) + 0x100 * i); // B
            p.push_back(0);                            // DoRA
        }
        b.pointers.push_back(p);
    }
    return b;
}

static void testSegmentsAndBlocks()
{
    Batch b = mixedBatch();
    HostInputs in = b.inputs();
    for (int32_t rank = 0; rank < 8; ++rank)
    {
        LaunchTables t;
        std::string err = buildLaunchTables(in, 8, rank, t);
        CHECK(err.empty());
        CHECK((t.seg_start == std::vector<int32_t>{0, 5, 6, 9}));
        CHECK((t.seg_len == std::vector<int32_t>{5, 1, 3, 1}));
        CHECK(t.token_idx.size() == 10 && t.token_idx[9] == 9);
        CHECK(t.modules.size() == 3);
        ModuleTables const& q = t.modules[0];
        CHECK(q.meta[0] == 2 && q.meta[1] == rank * 2 && q.meta[2] == 16); // r=16 at tp 8: 2 rows from 2*rank
        CHECK(q.meta[3] == 0);                                             // no adapter: rank 0, skipped
        CHECK(q.meta[6] == 1 && q.meta[7] == rank && q.meta[8] == 8);
        CHECK(q.meta[9] == 4 && q.meta[10] == 4 * rank && q.meta[11] == 32);
        CHECK(q.ptr[0] == 0x1000 && q.ptr[1] == 0x9000 && q.ptr[6] == 0x1300 && q.ptr[7] == 0x9300);
        CHECK(q.max_rank == 4 && t.modules[2].max_rank == 8);
        CHECK(q.scale[0] == 1.0F);
    }
}

static void testErrors()
{
    Batch b = mixedBatch();
    b.ranks[1][2] = 12; // not divisible by 8
    LaunchTables t;
    std::string err = buildLaunchTables(b.inputs(), 8, 0, t);
    CHECK(err.find("not divisible by tp_size 8") != std::string::npos);

    Batch c = mixedBatch();
    c.tokens = 11;
    CHECK(buildLaunchTables(c.inputs(), 8, 0, t).find("cover 10 tokens") != std::string::npos);

    Batch d = mixedBatch();
    d.types[1] = 7;
    CHECK(buildLaunchTables(d.inputs(), 8, 0, t).find("unknown request type") != std::string::npos);

    Batch e = mixedBatch();
    e.pointers[0][3] = 5; // request 1's A pointer is irrelevant (rank 0) ...
    CHECK(buildLaunchTables(e.inputs(), 8, 0, t).empty());
    e.pointers[0][0] = 0; // ... request 0's is not
    CHECK(buildLaunchTables(e.inputs(), 8, 0, t).find("null weight pointer") != std::string::npos);

    Batch f = mixedBatch();
    CHECK(!buildLaunchTables(f.inputs(), 8, 8, t).empty());
}

static void testTpOneIsFullRank()
{
    Batch b = mixedBatch();
    LaunchTables t;
    CHECK(buildLaunchTables(b.inputs(), 1, 0, t).empty());
    CHECK(t.modules[2].meta[0] == 64 && t.modules[2].meta[1] == 0);
}

static void testPacking()
{
    Batch b = mixedBatch();
    LaunchTables t;
    CHECK(buildLaunchTables(b.inputs(), 4, 3, t).empty());
    PackedLayout layout = packedLayout(b.tokens, 4, 3);
    CHECK(layout.total <= workspaceBound(b.tokens, 4, 3));
    CHECK(workspaceBound(4096, 256, 3) >= packedLayout(4096, 256, 3).total);
    std::vector<unsigned char> buf;
    packTables(t, layout, {64, 16, 16}, buf);
    CHECK(buf.size() == layout.total);
    int32_t seg_start[4];
    std::memcpy(seg_start, buf.data() + layout.seg_start, sizeof(seg_start));
    CHECK(seg_start[3] == 9);
    int32_t meta[12];
    std::memcpy(meta, buf.data() + layout.meta[2], sizeof(meta));
    CHECK(meta[0] == 16 && meta[1] == 48 && meta[2] == 64);
    int64_t ptr[8];
    std::memcpy(ptr, buf.data() + layout.ptr[1], sizeof(ptr));
    CHECK(ptr[0] == 0x2000 && ptr[1] == 0x12000);
    CHECK(layout.ptr[0] % 256 == 0 && layout.meta[2] % 256 == 0);
    int32_t info[2];
    std::memcpy(info, buf.data() + layout.info[0], sizeof(info));
    CHECK(info[0] == 0 && info[1] == 64);
}

static void testEngineBuildGuard()
{
    // During an engine build TensorRT times tactics with host inputs that are not requests: here, dangling
    // pointers and a batch that does not match the token count. Nothing may be read while IS_BUILDING=1.
    HostInputs garbage;
    garbage.batch = 1 << 20;
    garbage.num_tokens = 7;
    garbage.num_modules = 3;
    garbage.request_types = reinterpret_cast<int32_t const*>(0x10);
    garbage.context_lengths = reinterpret_cast<int32_t const*>(0x20);
    garbage.ranks = reinterpret_cast<int32_t const* const*>(0x30);
    garbage.pointers = reinterpret_cast<int64_t const* const*>(0x40);
    LaunchTables t;
    std::string message;
    CHECK(prepareEnqueue(garbage, 8, 0, "1", t, message) == EnqueueStep::kSkip);
    CHECK(t.modules.empty() && message.empty());
    CHECK(isBuildingEngine("1") && !isBuildingEngine(nullptr) && !isBuildingEngine("0") && !isBuildingEngine(""));

    Batch b = mixedBatch(); // outside a build the same call builds the tables ...
    CHECK(prepareEnqueue(b.inputs(), 8, 3, nullptr, t, message) == EnqueueStep::kLaunch);
    CHECK(message.empty() && t.modules.size() == 3 && t.modules[0].meta[1] == 6);
    b.ranks[0][0] = 12; // ... and reports bad requests
    CHECK(prepareEnqueue(b.inputs(), 8, 3, "0", t, message) == EnqueueStep::kError);
    CHECK(message.find("not divisible by tp_size 8") != std::string::npos);
}

int main()
{
    testEngineBuildGuard();
    testSegmentsAndBlocks();
    testErrors();
    testTpOneIsFullRank();
    testPacking();
    if (failures)
    {
        std::printf("%d failed\n", failures);
        return 1;
    }
    std::printf("bdlora_host: all checks passed\n");
    return 0;
}
