// cuda-sim runtime: runs a kernel compiled from kernels/*.cu on the CPU with one fiber per CUDA
// thread, one block at a time per worker OS thread, under strict Volta+ rules. Every failure is
// returned as a message naming the kernel, block, thread and source line; nothing aborts.
//
// Fibers switch only at __syncthreads, warp collectives and exit (sim_context.cpp: a hand-written
// switch on x86-64, ucontext elsewhere). A fiber that faults (out-of-bounds global access, null
// pointer, stack overflow) is abandoned and its block fails (sim_memory.cpp).
#include "sim.cuh"
#include "sim_internal.h"

#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern "C" const sim::KernelEntry* const bert_sim_kernels[];
extern "C" const size_t bert_sim_kernel_total;

namespace sim {

thread_local const uint3* tl_thread_idx;
thread_local uint3 tl_block_idx;
thread_local dim3 tl_block_dim;
thread_local dim3 tl_grid_dim;
thread_local unsigned char* tl_dynamic_shared;
thread_local uint64_t tl_block_generation;
thread_local size_t tl_static_shared_bytes;  // static __shared__ bytes the running block has reached

namespace {

std::atomic<uint64_t> g_block_generation{0};

// The poisoners of file-scope __shared__ variables (registered during static initialisation).
std::vector<void (*)()>& file_scope_shared() {
    static std::vector<void (*)()> v;
    return v;
}

}  // namespace

SharedAtFileScope::SharedAtFileScope(void (*poison_here)()) { file_scope_shared().push_back(poison_here); }

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // MAP_NORESERVE: only touched pages cost; pooled (sim_context.cpp)
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xA5;
constexpr uint64_t kLanePoison = 0x7ff8dead7fc0deadull;  // NaN as f32 (low half) and as f64
constexpr size_t kMaxDynamicShared = 48 * 1024;  // what a kernel gets without cuFuncSetAttribute

enum class St { Ready, Barrier, Warp, Exited, Faulted };

struct Fiber {
    Ctx ctx;
    uint3 idx;
    unsigned linear;
    St st;
    const char* file;  // the sync point it waits at (or last passed)
    int line;
    int op;  // the warp operation it waits at or last passed; -1: __syncthreads
    unsigned mask;
    uint64_t val;
    unsigned size;
    int b;
    int width;
    uint64_t result;
};

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// How a completed warp collective computes each lane's result.
enum class Kind { Shuffle, Sync, Vote, Reduce, Match, Mma };

struct OpInfo {
    const char* name;
    Kind kind;
};

// Indexed by WarpOp; the signed and unsigned reductions share a name (CUDA's overloads).
constexpr OpInfo kOps[WARP_OP_COUNT] = {
    {"__shfl_up_sync", Kind::Shuffle},     {"__shfl_down_sync", Kind::Shuffle},   {"__shfl_xor_sync", Kind::Shuffle},
    {"__shfl_sync", Kind::Shuffle},        {"__syncwarp", Kind::Sync},            {"__ballot_sync", Kind::Vote},
    {"__any_sync", Kind::Vote},            {"__all_sync", Kind::Vote},            {"__reduce_add_sync", Kind::Reduce},
    {"__reduce_min_sync", Kind::Reduce},   {"__reduce_max_sync", Kind::Reduce},   {"__reduce_min_sync", Kind::Reduce},
    {"__reduce_max_sync", Kind::Reduce},   {"__reduce_and_sync", Kind::Reduce},   {"__reduce_or_sync", Kind::Reduce},
    {"__reduce_xor_sync", Kind::Reduce},   {"__match_any_sync", Kind::Match},     {"__match_all_sync", Kind::Match},
    {"mma.sync.m16n8k16 (bf16)", Kind::Mma}, {"mma.sync.m16n8k16 (f16)", Kind::Mma},
};

static_assert(std::all_of(std::begin(kOps), std::end(kOps), [](const OpInfo& o) { return o.name != nullptr; }), "one kOps entry per WarpOp");

const char* op_name(int op) { return op >= 0 && op < WARP_OP_COUNT ? kOps[op].name : "__syncthreads"; }

struct Launch {
    const KernelEntry* k;
    dim3 grid, block;
    size_t smem;
    bool opted_in;  // cuFuncSetAttribute raised the limit: static + dynamic may pass 48 KB
    void** args;
    int schedule;  // 0 forward, 1 reverse, 2 random
    uint64_t seed;
    bool use_asm;  // the hand-written context switch (else ucontext)
    std::atomic<uint64_t> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;
    void fail(std::string msg) {
        std::lock_guard<std::mutex> g(mu);
        if (error.empty()) error = std::move(msg);
        failed = true;
    }
};

// One worker's state while it runs a block.
struct Worker {
    Launch* L;
    std::vector<Fiber> fibers;
    std::vector<Stack> stacks;
    std::vector<unsigned> order;
    std::vector<unsigned char> smem_store;
    unsigned char* smem = nullptr;
    Ctx sched;
    Fiber* cur = nullptr;
    std::string error;  // set by a fiber that hit a violation; the block stops
    uint3 bidx;
    ~Worker() {
        give_back_stacks(stacks);
    }
    std::string where(const Fiber& f) const {
        return format("kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u)", L->k->name, bidx.x, bidx.y, bidx.z, f.idx.x, f.idx.y, f.idx.z);
    }
    std::string thread(const Fiber& f) const { return format("thread (%u,%u,%u)", f.idx.x, f.idx.y, f.idx.z); }
};

thread_local Worker* tl_worker;

// Called on a fiber: record the violation and never run this fiber again.
[[noreturn]] void fiber_fail(std::string msg) {
    Worker* W = tl_worker;
    W->error = W->where(*W->cur) + ": " + msg;
    Fiber* f = W->cur;
    switch_ctx(f->ctx, W->sched, W->L->use_asm);
    abort();  // unreachable: a failed fiber is never resumed
}

void fiber_main() {
    Worker* W = tl_worker;
    W->L->k->launch(W->L->args);
    Fiber* f = W->cur;
    f->st = St::Exited;
    switch_ctx(f->ctx, W->sched, W->L->use_asm);
    abort();
}

// Where the SIGSEGV handler sends a fiber that faulted (on the top of its stack; sim_memory.cpp):
// back to the scheduler, which reads tl_running.fault. Never resumed.
void fiber_fault_entry() {
    Worker* W = tl_worker;
    Fiber* f = W->cur;
    f->st = St::Faulted;
    switch_ctx(f->ctx, W->sched, W->L->use_asm);
    abort();
}

void block_wait(Fiber* f) {
    Worker* W = tl_worker;
    switch_ctx(f->ctx, W->sched, W->L->use_asm);
}

std::string sync_point(const char* file, int line, const char* op = nullptr) {
    return format("%s at %s:%d", op ? op : "__syncthreads", file, line);
}

bool canary_ok(const Worker& W) {
    const unsigned char* c = W.smem + W.L->smem;
    for (size_t i = 0; i < kCanaryBytes; ++i)
        if (c[i] != kCanary) return false;
    return true;
}

// Whether lane g waits at the same collective as lane f (operation, mask and operand size).
bool same_collective(const Fiber& f, const Fiber& g) { return g.st == St::Warp && g.mask == f.mask && g.op == f.op && g.size == f.size; }

// Source lane of a shuffle under the PTX shfl.sync rules (segment clamping); itself when out of range.
int shuffle_source(const Fiber& g, int lane) {
    const int seg = (32 - g.width) & 31;
    const int cval = g.op == SHFL_UP ? 0 : 31;
    const int bv = g.b & 31;
    const int max_lane = (lane & seg) | (cval & ~seg), min_lane = lane & seg;
    int src;
    bool in;
    switch (g.op) {
        case SHFL_UP: src = lane - bv; in = src >= max_lane; break;
        case SHFL_DOWN: src = lane + bv; in = src <= max_lane; break;
        case SHFL_BFLY: src = lane ^ bv; in = src <= max_lane; break;
        default: src = min_lane | (bv & ~seg); in = src <= max_lane; break;
    }
    return in ? src : lane;
}

// Folds the 32-bit operands of a __reduce_*_sync (the first lane's value seeds it).
uint32_t reduce(int op, uint32_t acc, uint32_t v) {
    switch (op) {
        case REDUCE_ADD: return acc + v;
        case REDUCE_MIN_U: return std::min(acc, v);
        case REDUCE_MAX_U: return std::max(acc, v);
        case REDUCE_MIN_S: return (uint32_t)std::min((int32_t)acc, (int32_t)v);
        case REDUCE_MAX_S: return (uint32_t)std::max((int32_t)acc, (int32_t)v);
        case REDUCE_AND: return acc & v;
        case REDUCE_OR: return acc | v;
        default: return acc ^ v;
    }
}

// A 16-bit mma operand element as f32 (exact): bf16 is the upper half of an f32; f16 is
// rebiased (subnormals scaled by 2^-24, inf and NaN kept).
float mma_operand(int op, uint32_t bits) {
    bits &= 0xffffu;
    if (op == MMA_BF16) return std::bit_cast<float>(bits << 16);
    const uint32_t sign = (bits & 0x8000u) << 16, e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) return std::bit_cast<float>(sign | std::bit_cast<uint32_t>((float)m * 0x1p-24f));
    return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

// D = A·B + C for a warp's m16n8k16 fragments (MmaFragments). Each product of two 16-bit values
// is exact in f32; the executor adds them to c in k order in f32 (the tensor cores' order and
// intermediate rounding are unspecified, so kernels are compared with tolerances, as with any
// summation order).
void complete_mma(Fiber* const (&lane)[32], int op) {
    float a[16][16], b[16][8], c[16][8];
    for (unsigned j = 0; j < 32; ++j) {
        const MmaFragments& f = *reinterpret_cast<const MmaFragments*>(lane[j]->val);
        const unsigned g = j >> 2, t = j & 3u;
        for (unsigned r = 0; r < 4; ++r) {
            // a[r]: rows g (r even) or g + 8 (r odd), columns 2t, 2t + 1 (+ 8 for r >= 2).
            const unsigned row = g + 8 * (r & 1u), col = 2 * t + 8 * (r >> 1);
            a[row][col] = mma_operand(op, f.a[r]);
            a[row][col + 1] = mma_operand(op, f.a[r] >> 16);
        }
        for (unsigned r = 0; r < 2; ++r) {
            // b[r]: rows (k) 2t, 2t + 1 (+ 8 for r = 1), column g.
            b[2 * t + 8 * r][g] = mma_operand(op, f.b[r]);
            b[2 * t + 8 * r + 1][g] = mma_operand(op, f.b[r] >> 16);
        }
        for (unsigned r = 0; r < 4; ++r) c[g + 8 * (r >> 1)][2 * t + (r & 1u)] = f.c[r];
    }
    for (unsigned j = 0; j < 32; ++j) {
        MmaFragments& f = *reinterpret_cast<MmaFragments*>(lane[j]->val);
        const unsigned g = j >> 2, t = j & 3u;
        for (unsigned r = 0; r < 4; ++r) {
            const unsigned row = g + 8 * (r >> 1), col = 2 * t + (r & 1u);
            float acc = c[row][col];
            for (unsigned k = 0; k < 16; ++k) acc += a[row][k] * b[k][col];
            f.d[r] = acc;
        }
    }
}

// Every lane named by `mask` of the warp at w0 has arrived at the same collective: set each
// lane's result and make it ready. Values arrive zero-extended, so 64-bit compares are exact.
void complete_collective(Worker& W, unsigned w0, unsigned mask, int op) {
    Fiber* lane[32] = {};
    for (unsigned j = 0; j < 32; ++j)
        if ((mask >> j) & 1u) lane[j] = &W.fibers[w0 + j];
    switch (kOps[op].kind) {
        case Kind::Shuffle:
            for (unsigned j = 0; j < 32; ++j) {
                if (!lane[j]) continue;
                const int src = shuffle_source(*lane[j], (int)j);
                // Reading a lane outside the mask is undefined on a GPU: poison it.
                lane[j]->result = lane[src] ? lane[src]->val : kLanePoison;
            }
            break;
        case Kind::Sync: break;
        case Kind::Vote: {
            uint32_t ballot = 0;
            for (unsigned j = 0; j < 32; ++j)
                if (lane[j] && lane[j]->val != 0) ballot |= 1u << j;
            const uint64_t r = op == VOTE_BALLOT ? ballot : op == VOTE_ANY ? ballot != 0 : ballot == mask;
            for (Fiber* g : lane)
                if (g) g->result = r;
            break;
        }
        case Kind::Reduce: {
            bool first = true;
            uint32_t acc = 0;
            for (Fiber* g : lane) {
                if (!g) continue;
                acc = first ? (uint32_t)g->val : reduce(op, acc, (uint32_t)g->val);
                first = false;
            }
            for (Fiber* g : lane)
                if (g) g->result = acc;
            break;
        }
        case Kind::Match: {
            // match.any: the lanes holding my value; match.all: the mask and a predicate (high
            // word) when every lane holds the same value, else 0.
            bool all = true;
            for (unsigned j = 0; j < 32; ++j) {
                if (!lane[j]) continue;
                uint32_t same = 0;
                for (unsigned k = 0; k < 32; ++k)
                    if (lane[k] && lane[k]->val == lane[j]->val) same |= 1u << k;
                lane[j]->result = same;
                all = all && same == mask;
            }
            if (op == MATCH_ALL)
                for (Fiber* g : lane)
                    if (g) g->result = all ? ((uint64_t)1 << 32) | mask : 0;
            break;
        }
        case Kind::Mma: complete_mma(lane, op); break;  // the mask is full (warp_op_at)
    }
    for (Fiber* g : lane)
        if (g) g->st = St::Ready;
}

// Resolves every warp collective whose named lanes have all arrived. Returns true on progress,
// sets W.error on a violation.
bool resolve_warps(Worker& W) {
    const unsigned n = (unsigned)W.fibers.size();
    bool progress = false;
    for (unsigned w0 = 0; w0 < n; w0 += 32) {
        const unsigned lanes = std::min(32u, n - w0);
        for (unsigned l = 0; l < lanes; ++l) {
            Fiber& f = W.fibers[w0 + l];
            if (f.st != St::Warp) continue;
            bool complete = true;
            for (unsigned j = 0; j < 32; ++j) {
                if (!((f.mask >> j) & 1u)) continue;
                if (j >= lanes) {
                    W.error = W.where(f) + format(": %s (%s:%d) with mask 0x%08x names lane %u, which does not exist (the block has %u threads)",
                                                  op_name(f.op), f.file, f.line, f.mask, j, n);
                    return false;
                }
                const Fiber& g = W.fibers[w0 + j];
                if (g.st == St::Exited) {
                    W.error = W.where(f) + format(": %s (%s:%d) with mask 0x%08x waits for lane %u (%s), which has exited",
                                                  op_name(f.op), f.file, f.line, f.mask, j, W.thread(g).c_str());
                    return false;
                }
                if (!same_collective(f, g)) complete = false;
            }
            if (!complete) continue;
            complete_collective(W, w0, f.mask, f.op);
            progress = true;
        }
    }
    return progress;
}

// Describes why no fiber can make progress.
std::string deadlock(const Worker& W) {
    const unsigned n = (unsigned)W.fibers.size();
    for (const Fiber& f : W.fibers) {
        if (f.st != St::Warp) continue;
        const unsigned w0 = f.linear & ~31u;
        for (unsigned j = 0; j < 32 && w0 + j < n; ++j) {
            if (!((f.mask >> j) & 1u)) continue;
            const Fiber& g = W.fibers[w0 + j];
            if (same_collective(f, g)) continue;
            std::string other = g.st == St::Barrier ? format("is at __syncthreads (%s:%d)", g.file, g.line)
                                                    : format("is at %s (%s:%d) with mask 0x%08x", op_name(g.op), g.file, g.line, g.mask);
            if (g.st == St::Warp && g.op == f.op && g.mask == f.mask)
                other += format(" and a value of %u bytes (this lane's has %u)", g.size, f.size);
            return W.where(f) + format(": deadlock: %s (%s:%d) with mask 0x%08x waits for lane %u (%s), which %s",
                                       op_name(f.op), f.file, f.line, f.mask, j, W.thread(g).c_str(), other.c_str());
        }
    }
    return format("kernel `%s`, block (%u,%u,%u): deadlock", W.L->k->name, W.bidx.x, W.bidx.y, W.bidx.z);
}

void run_block(Worker& W, uint64_t b) {
    Launch& L = *W.L;
    const dim3 g = L.grid, bd = L.block;
    W.bidx = uint3{(unsigned)(b % g.x), (unsigned)(b / g.x % g.y), (unsigned)(b / ((uint64_t)g.x * g.y))};
    tl_block_idx = W.bidx;
    tl_block_dim = bd;
    tl_grid_dim = g;
    const unsigned n = bd.x * bd.y * bd.z;
    // Dynamic shared memory: exactly L.smem bytes, poisoned, then a canary.
    poison(W.smem, L.smem);
    memset(W.smem + L.smem, kCanary, kCanaryBytes);
    tl_dynamic_shared = W.smem;
    // Static __shared__ arrays: poisoned when the block first reaches their declaration (SIM_SHARED)
    // or now (file scope).
    tl_block_generation = ++g_block_generation;
    tl_static_shared_bytes = 0;
    for (void (*p)() : file_scope_shared()) p();

    W.fibers.resize(n);
    while (W.stacks.size() < n) {
        Stack s;
        if (!take_stack(s, kStackBytes)) {
            W.error = "cuda-sim: cannot map a fiber stack";
            return;
        }
        W.stacks.push_back(s);
    }
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = W.fibers[i];
        f = Fiber{};
        f.idx = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
        f.linear = i;
        f.st = St::Ready;
        f.file = "(kernel start)";
        f.line = 0;
        f.op = -1;
        init_ctx(f.ctx, W.stacks[i], fiber_main, L.use_asm);
    }
    W.order.resize(n);
    for (unsigned i = 0; i < n; ++i) W.order[i] = L.schedule == 1 ? n - 1 - i : i;
    std::mt19937_64 rng(L.seed ^ (b * 0x9e3779b97f4a7c15ull));

    for (;;) {
        if (L.schedule == 2) std::shuffle(W.order.begin(), W.order.end(), rng);
        for (unsigned i : W.order) {
            Fiber& f = W.fibers[i];
            if (f.st != St::Ready) continue;
            const char* from_file = f.file;
            const int from_line = f.line;
            const int from_op = f.op;
            W.cur = &f;
            tl_thread_idx = &f.idx;
            const Stack& stack = W.stacks[i];
            tl_running.lo = (uintptr_t)stack.map;
            tl_running.hi = stack.hi;
            tl_running.on_fault = fiber_fault_entry;
            tl_running.faulted = 0;
            switch_ctx(W.sched, f.ctx, L.use_asm);
            tl_running.lo = 0;
            if (f.st == St::Faulted) {
                const FaultRecord fault = tl_running.fault;
                std::string where = source_location(fault.pc);
                where = where.empty() ? std::string() : " at " + where;
                const std::string after = from_line == 0 ? std::string("before its first sync point")
                                                         : "after " + sync_point(from_file, from_line, from_op >= 0 ? op_name(from_op) : nullptr);
                W.error = W.where(f) + ": " + describe_fault(fault, stack, kStackBytes) + where + " (" + after + ")";
                return;
            }
            if (!W.error.empty()) return;
            if (!canary_ok(W)) {
                const std::string from = from_line == 0 ? std::string("the kernel's start") : sync_point(from_file, from_line, from_op >= 0 ? op_name(from_op) : nullptr);
                const std::string to = f.st == St::Exited ? std::string("its exit") : sync_point(f.file, f.line, f.op >= 0 ? op_name(f.op) : nullptr);
                W.error = W.where(f) + format(": wrote past the end of dynamic shared memory (%zu bytes; its canary changed) between %s and %s", L.smem,
                                              from.c_str(), to.c_str());
                return;
            }
        }
        if (resolve_warps(W)) continue;
        if (!W.error.empty()) return;
        unsigned live = 0, at_barrier = 0;
        const Fiber* exited = nullptr;
        const Fiber* first_barrier = nullptr;
        for (const Fiber& f : W.fibers) {
            if (f.st == St::Exited) {
                if (!exited) exited = &f;
                continue;
            }
            ++live;
            if (f.st == St::Barrier) {
                ++at_barrier;
                if (!first_barrier) first_barrier = &f;
            }
        }
        if (live == 0) return;  // the block finished
        if (at_barrier == live) {
            if (exited) {
                W.error = W.where(*exited) + format(": exited while %u other threads wait at __syncthreads (%s:%d)", at_barrier,
                                                    first_barrier->file, first_barrier->line);
                return;
            }
            for (const Fiber& f : W.fibers) {
                if (f.line != first_barrier->line || strcmp(f.file, first_barrier->file) != 0) {
                    W.error = W.where(f) + format(": reached __syncthreads at %s:%d while %s waits at %s:%d", f.file, f.line,
                                                  W.thread(*first_barrier).c_str(), first_barrier->file, first_barrier->line);
                    return;
                }
            }
            for (Fiber& f : W.fibers) f.st = St::Ready;
            continue;
        }
        W.error = deadlock(W);
        return;
    }
}

void worker_main(Launch* L) {
    AltStack alt;  // the fault handler needs a stack of its own when a fiber overflows its stack
    Worker W;
    W.L = L;
    tl_worker = &W;
    W.smem_store.resize(L->smem + kCanaryBytes + 16);
    W.smem = W.smem_store.data() + ((16 - ((uintptr_t)W.smem_store.data() & 15)) & 15);
    const uint64_t blocks = (uint64_t)L->grid.x * L->grid.y * L->grid.z;
    for (;;) {
        if (L->failed) break;
        const uint64_t b = L->next_block.fetch_add(1);
        if (b >= blocks) break;
        run_block(W, b);
        if (!W.error.empty()) {
            L->fail(W.error);
            break;
        }
    }
    tl_worker = nullptr;
}

}  // namespace

// Declared in sim.cuh, called by SIM_SHARED as a block first reaches a static array. The driver
// counts every static array of the kernel; the simulator counts those this block reaches, which is
// all of them in our kernels (declared at the top of the body; file-scope arrays are not counted).
void static_shared_reached(size_t bytes) {
    tl_static_shared_bytes += bytes;
    const Launch& L = *tl_worker->L;
    if (!L.opted_in && tl_static_shared_bytes + L.smem > kMaxDynamicShared)
        fiber_fail(format("%zu bytes of static __shared__ memory plus %zu dynamic exceed the %zu a block gets without a cuFuncSetAttribute opt-in "
                          "(the driver refuses such a launch with CUDA_ERROR_INVALID_VALUE)",
                          tl_static_shared_bytes, L.smem, kMaxDynamicShared));
}

void syncthreads_at(const char* file, int line) {
    Worker* W = tl_worker;
    Fiber* f = W->cur;
    f->st = St::Barrier;
    f->op = -1;
    f->file = file;
    f->line = line;
    block_wait(f);
}

uint64_t warp_op_at(const char* file, int line, int op, unsigned mask, uint64_t bits, unsigned size, int b, int width) {
    Worker* W = tl_worker;
    Fiber* f = W->cur;
    f->file = file;
    f->line = line;
    const unsigned lane = f->linear & 31u;
    if (!((mask >> lane) & 1u))
        fiber_fail(format("%s at %s:%d with mask 0x%08x, which does not include the calling lane %u", op_name(op), file, line, mask, lane));
    if (kOps[op].kind == Kind::Mma && mask != 0xffffffffu)
        fiber_fail(format("%s at %s:%d with mask 0x%08x: mma.sync.aligned is executed by all 32 lanes of the warp", op_name(op), file, line, mask));
    if (kOps[op].kind == Kind::Shuffle && (width < 1 || width > 32 || (width & (width - 1)) != 0))
        fiber_fail(format("%s at %s:%d with width %d (must be a power of two in 1..32)", op_name(op), file, line, width));
    f->op = op;
    f->mask = mask;
    f->val = bits;
    f->size = size;
    f->b = b;
    f->width = width;
    f->st = St::Warp;
    block_wait(f);
    return f->result;
}

void syncwarp_at(const char* file, int line, unsigned mask) { warp_op_at(file, line, SYNCWARP, mask, 0, 0, 0, 32); }

void atomic_misaligned(const char* op, const char* file, int line, const void* p, unsigned size) {
    fiber_fail(format("%s at %s:%d on address %p, which is not aligned to its %u-byte operand (misaligned address)", op, file, line, p, size));
}

namespace {

// This module's thread-local block on the calling OS thread, where the static `__shared__`
// arrays (`static thread_local`) live.
struct TlsRange {
    uintptr_t lo = 0, hi = 0;
};

int find_own_tls(struct dl_phdr_info* info, size_t, void* out) {
    const uintptr_t probe = (uintptr_t)&tl_block_idx;
    for (unsigned i = 0; i < info->dlpi_phnum && info->dlpi_tls_data; ++i) {
        if (info->dlpi_phdr[i].p_type != PT_TLS) continue;
        const uintptr_t lo = (uintptr_t)info->dlpi_tls_data, hi = lo + info->dlpi_phdr[i].p_memsz;
        if (probe >= lo && probe < hi) {
            *static_cast<TlsRange*>(out) = TlsRange{lo, hi};
            return 1;
        }
    }
    return 0;
}

}  // namespace

bool is_shared_address(const void* p) {
    const uintptr_t a = (uintptr_t)p;
    const Worker* W = tl_worker;
    if (W && a >= (uintptr_t)tl_dynamic_shared && a < (uintptr_t)tl_dynamic_shared + W->L->smem) return true;
    static thread_local const TlsRange tls = [] {
        TlsRange r;
        dl_iterate_phdr(find_own_tls, &r);
        return r;
    }();
    return a >= tls.lo && a < tls.hi;
}

}  // namespace sim

// cuLaunchKernel's shape: kernel by name, grid, block, dynamic shared bytes, one pointer per
// parameter. Returns 0, or 1 with a message in `err` (truncated to err_len).
extern "C" int bert_sim_launch(const char* name, const unsigned* grid, const unsigned* block, size_t smem, size_t max_smem, int opted_in, void** args, size_t nargs,
                               int schedule, uint64_t seed, char* err, size_t err_len) {
    auto fail = [&](const std::string& msg) {
        if (err_len) snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    const sim::KernelEntry* k = nullptr;
    for (size_t i = 0; i < bert_sim_kernel_total; ++i)
        if (strcmp(bert_sim_kernels[i]->name, name) == 0) k = bert_sim_kernels[i];
    if (!k) return fail(sim::format("cuda-sim: no kernel named `%s` is compiled into the executor", name));
    if (nargs != k->nparams) return fail(sim::format("cuda-sim: kernel `%s` takes %u parameters, %zu given", name, k->nparams, nargs));
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
        return fail(sim::format("cuda-sim: kernel `%s`: launch with a zero grid (%u,%u,%u) or block (%u,%u,%u) dimension is invalid", name, grid[0],
                                grid[1], grid[2], block[0], block[1], block[2]));
    if (threads > 1024 || block[2] > 64 || grid[1] > 65535 || grid[2] > 65535)
        return fail(sim::format("cuda-sim: kernel `%s`: block (%u,%u,%u) / grid (%u,%u,%u) exceeds the device limits (1024 threads, z <= 64, grid y,z <= 65535)",
                                name, block[0], block[1], block[2], grid[0], grid[1], grid[2]));
    if (smem > max_smem)
        return fail(sim::format("cuda-sim: kernel `%s`: %zu bytes of dynamic shared memory exceed this launch's limit of %zu bytes%s", name, smem, max_smem,
                                max_smem == sim::kMaxDynamicShared ? " (what a kernel gets without a cuFuncSetAttribute opt-in)" : ""));
    if (schedule < 0 || schedule > 2) return fail(sim::format("cuda-sim: unknown schedule %d", schedule));
    bool use_asm = SIM_ASM_SWITCH;
    if (const char* e = getenv("CUDA_SIM_SWITCH"); e && *e) {
        if (strcmp(e, "ucontext") == 0) use_asm = false;
        else if (strcmp(e, "asm") == 0 && SIM_ASM_SWITCH) use_asm = true;
        else return fail(sim::format("cuda-sim: CUDA_SIM_SWITCH=%s: expected ucontext%s", e, SIM_ASM_SWITCH ? " or asm" : " (no hand-written switch on this host)"));
    }
    sim::install_fault_handler();
    sim::Launch L;
    L.k = k;
    L.grid = dim3{grid[0], grid[1], grid[2]};
    L.block = dim3{block[0], block[1], block[2]};
    L.smem = smem;
    L.opted_in = opted_in != 0;
    L.args = args;
    L.schedule = schedule;
    L.seed = seed;
    L.use_asm = use_asm;
    const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    unsigned workers = std::max(1u, std::thread::hardware_concurrency());
    if (const char* e = getenv("CUDA_SIM_THREADS")) workers = std::max(1, atoi(e));
    workers = (unsigned)std::min<uint64_t>(workers, blocks);
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < workers; ++i) pool.emplace_back(sim::worker_main, &L);
    for (auto& t : pool) t.join();
    if (!L.error.empty()) return fail(L.error);
    return 0;
}

extern "C" size_t bert_sim_kernel_count() { return bert_sim_kernel_total; }
extern "C" const char* bert_sim_kernel_name(size_t i) { return i < bert_sim_kernel_total ? bert_sim_kernels[i]->name : nullptr; }
