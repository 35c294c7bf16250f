// cuda-sim fiber contexts. On x86-64 a hand-written switch: it saves what the System V ABI says a
// callee must preserve (rbx, rbp, r12-r15, the stack pointer, MXCSR's control bits and the x87
// control word) and nothing else: no signal mask, so no syscall. ucontext (swapcontext saves and
// restores the signal mask: two syscalls per switch) is the fallback elsewhere and under
// CUDA_SIM_SWITCH=ucontext, for comparison.
#include "sim_internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <vector>

namespace sim {

size_t page_bytes() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

bool map_stack(Stack& s, size_t usable) {
    const size_t guard = page_bytes();
    void* m = mmap(nullptr, guard + usable, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) return false;
    if (mprotect(m, guard, PROT_NONE) != 0) {
        munmap(m, guard + usable);
        return false;
    }
    s.map = static_cast<unsigned char*>(m);
    s.lo = (uintptr_t)m + guard;
    s.hi = s.lo + usable;
#if SIM_VALGRIND
    s.valgrind_id = VALGRIND_STACK_REGISTER((void*)s.lo, (void*)s.hi);
#endif
    return true;
}

namespace {
// Stacks of finished launches, reused by the next ones: mapping, guarding and first touching a
// stack costs more than running a short kernel's thread. Bounded; the rest are unmapped.
constexpr size_t kPooledStacks = 4096;
std::mutex g_pool_mu;
std::vector<Stack> g_pool;
}  // namespace

bool take_stack(Stack& s, size_t usable) {
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        while (!g_pool.empty()) {
            s = g_pool.back();
            g_pool.pop_back();
            if (s.hi - s.lo == usable) return true;
            unmap_stack(s);
        }
    }
    return map_stack(s, usable);
}

void give_back_stacks(std::vector<Stack>& stacks) {
    std::lock_guard<std::mutex> g(g_pool_mu);
    for (Stack& s : stacks) {
        if (g_pool.size() < kPooledStacks) g_pool.push_back(s);
        else unmap_stack(s);
    }
    stacks.clear();
}

void unmap_stack(Stack& s) {
    if (!s.map) return;
#if SIM_VALGRIND
    VALGRIND_STACK_DEREGISTER(s.valgrind_id);
#endif
    munmap(s.map, s.hi - (uintptr_t)s.map);
    s = Stack{};
}

}  // namespace sim

#if SIM_ASM_SWITCH
// void bert_sim_switch(void** save_sp, void* load_sp): pushes the callee-saved registers and the
// FP control words on the current stack, stores the stack pointer in *save_sp, then pops the same
// from load_sp and returns into the other context.
extern "C" void bert_sim_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl bert_sim_switch
    .hidden bert_sim_switch
    .type bert_sim_switch, @function
bert_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bert_sim_switch, .-bert_sim_switch
)");
#endif

namespace sim {

void init_ctx(Ctx& c, const Stack& s, void (*entry)(), bool use_asm) {
#if SIM_ASM_SWITCH
    if (use_asm) {
        // The frame bert_sim_switch pops: FP control words, r15..r12, rbx, rbp, then `ret` into
        // entry with rsp = top - 8, as after a call (entry sees the ABI's alignment).
        uint64_t* sp = reinterpret_cast<uint64_t*>(s.hi & ~uintptr_t(15));
        *--sp = 0;  // entry's return address: never used, ends debugger backtraces
        *--sp = (uint64_t)(uintptr_t)entry;
        for (int i = 0; i < 6; ++i) *--sp = 0;
        uint32_t mxcsr;
        uint16_t fcw;
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(fcw));
        *--sp = mxcsr | ((uint64_t)fcw << 32);
        c.sp = sp;
        return;
    }
#endif
    (void)use_asm;
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = (void*)s.lo;
    c.uc.uc_stack.ss_size = s.hi - s.lo;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void switch_ctx(Ctx& from, Ctx& to, bool use_asm) {
#if SIM_ASM_SWITCH
    if (use_asm) {
        bert_sim_switch(&from.sp, to.sp);
        return;
    }
#endif
    (void)use_asm;
    swapcontext(&from.uc, &to.uc);
}

}  // namespace sim
