// cuda-sim internals shared by the executor's C++ files (not by kernel code): fiber contexts
// (sim_context.cpp), device memory and out-of-bounds faults (sim_memory.cpp).
#pragma once

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <ucontext.h>

#include <string>
#include <vector>

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>) && __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#include <valgrind/valgrind.h>
#define SIM_VALGRIND 1
#endif
#endif
#ifndef SIM_VALGRIND
#define SIM_VALGRIND 0
#endif

// The hand-written switch exists for x86-64 System V only; elsewhere every fiber is a ucontext.
#if defined(__x86_64__) && defined(__linux__)
#define SIM_ASM_SWITCH 1
#else
#define SIM_ASM_SWITCH 0
#endif

// Faults on a fiber are caught where the signal context can be redirected (see sim_memory.cpp).
#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
#define SIM_CATCH_FAULTS 1
#else
#define SIM_CATCH_FAULTS 0
#endif

namespace sim {

constexpr uint32_t kPoisonWord = 0x7fc0dead;  // a quiet NaN as f32: a read of unwritten memory shows up

size_t page_bytes();

// ---- fiber contexts (sim_context.cpp) ----

// A fiber's saved state: `sp` for the hand-written switch (its registers are on its stack), `uc`
// for ucontext.
struct Ctx {
    void* sp;
    ucontext_t uc;
};

// A fiber stack: [lo, hi) usable, the page below lo a PROT_NONE guard, so an overflow faults.
struct Stack {
    unsigned char* map = nullptr;  // the guard page; the mapping is guard + usable bytes
    uintptr_t lo = 0, hi = 0;
    unsigned valgrind_id = 0;
};

bool map_stack(Stack& s, size_t usable);
void unmap_stack(Stack& s);
// A stack from the process-wide pool of finished launches' stacks, else a new mapping.
bool take_stack(Stack& s, size_t usable);
// Returns stacks to the pool (or unmaps those beyond its bound); empties `stacks`.
void give_back_stacks(std::vector<Stack>& stacks);

// Prepares `c` so that switching to it runs `entry()` on `s` (entry never returns).
void init_ctx(Ctx& c, const Stack& s, void (*entry)(), bool use_asm);
// Saves the current context in `from` and resumes `to`.
void switch_ctx(Ctx& from, Ctx& to, bool use_asm);

// ---- faults on a fiber (sim_memory.cpp) ----

enum class Access : int { Read, Write, Unknown, Execute };

// Written by the SIGSEGV handler (async-signal-safe: plain stores), read on the scheduler.
struct FaultRecord {
    uintptr_t addr;
    uintptr_t pc;
    Access access;
    bool general_protection;  // x86-64 #GP: non-canonical address or misaligned vector access; addr unknown
};

// What the handler needs about the fiber running on this OS thread: its stack (a fault with the
// stack pointer inside it is the kernel's) and where to go instead of the faulting instruction.
// lo == 0: no fiber is running here.
struct RunningFiber {
    uintptr_t lo, hi;           // the whole mapping, guard page included
    void (*on_fault)();         // entered on the fiber's stack after the handler returns
    FaultRecord fault;
    volatile sig_atomic_t faulted;
};
extern thread_local RunningFiber tl_running __attribute__((tls_model("initial-exec")));

// Installs the process-wide SIGSEGV handler once (chaining to the one before it).
void install_fault_handler();
// Per worker OS thread: an alternate signal stack, so a fiber stack overflow can be reported.
struct AltStack {
    void* mem = nullptr;
    size_t bytes = 0;
    bool installed = false;
    AltStack();
    ~AltStack();
};

// "out-of-bounds global read of 4 bytes at 0x...: 0 bytes past the end of a 256-byte cuda-sim
// allocation at 0x..." and the like; `stack` is the faulting fiber's, to name an overflow.
std::string describe_fault(const FaultRecord& f, const Stack& stack, size_t stack_usable);
// "file:line" of a code address (innermost inlined frame first, " (inlined into file:line)"), or
// "" when no symbolizer or no line information is available.
std::string source_location(uintptr_t pc);

}  // namespace sim
