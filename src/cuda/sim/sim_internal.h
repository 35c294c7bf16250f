// cuda-sim internals shared by the executor's C++ files (not by kernel code): fiber contexts
// (sim_context.cpp).
#pragma once

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

namespace sim {

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

}  // namespace sim
