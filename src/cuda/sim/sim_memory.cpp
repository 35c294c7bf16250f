// cuda-sim device memory and the faults of kernels that leave it.
//
// Allocations: each is its own mapping, a PROT_NONE guard page, the data pages, a PROT_NONE guard
// page. The usable bytes start 16-byte aligned (cudaMalloc gives 256; 16 is what vector loads
// need) and end at most 15 bytes before the trailing guard page, so a read one element past the
// end faults. Contents start poisoned (f32 NaN words), as cudaMalloc memory is uninitialised.
// Freed mappings stay PROT_NONE for a while (a quarantine), so a use after free faults too.
//
// Faults: a SIGSEGV handler, installed once for the process, decides by the stack pointer whether
// the fault happened on a cuda-sim fiber; if not, it hands the signal to the handler that was
// installed before it (Rust's stack-overflow handler, say). On a fiber it only records the
// address, access kind and PC (async-signal-safe: plain stores) and makes the signal return into
// RunningFiber::on_fault on the fiber's own stack, which switches to the block scheduler; the
// fiber is never resumed. The message is composed there, in normal context.
#include "sim_internal.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <spawn.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <vector>

extern char** environ;

namespace sim {

thread_local RunningFiber tl_running __attribute__((tls_model("initial-exec")));

namespace {

std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// ---- allocations ----

struct Mapping {
    uintptr_t map;
    size_t map_len;
    uintptr_t start;  // what the caller got
    size_t size;      // what the caller asked for
    bool live;
};

constexpr size_t kQuarantine = 256;  // freed mappings kept PROT_NONE before they are unmapped

std::mutex g_mem_mu;
std::map<uintptr_t, Mapping> g_mappings;  // by map base: live allocations and the quarantine
std::deque<uintptr_t> g_quarantine;       // map bases of freed mappings, oldest first

void set_err(char* err, size_t len, const std::string& msg) {
    if (len) snprintf(err, len, "%s", msg.c_str());
}

// The mapping holding `addr`, if any (g_mem_mu held).
const Mapping* mapping_at(uintptr_t addr) {
    auto it = g_mappings.upper_bound(addr);
    if (it == g_mappings.begin()) return nullptr;
    --it;
    return addr < it->second.map + it->second.map_len ? &it->second : nullptr;
}

}  // namespace

void poison(void* p, size_t bytes) {
    unsigned char* b = static_cast<unsigned char*>(p);
    size_t i = 0;
    for (; i + 4 <= bytes; i += 4) memcpy(b + i, &kPoisonWord, 4);
    for (; i < bytes; ++i) b[i] = 0xff;
}

}  // namespace sim

// Allocates `bytes` of cuda-sim device memory (see the top of this file). Returns 0 and the start
// in *out, or 1 with a message.
extern "C" int bert_sim_alloc(size_t bytes, void** out, char* err, size_t err_len) {
    using namespace sim;
    const size_t page = page_bytes();
    if (bytes > (SIZE_MAX >> 2)) {
        set_err(err, err_len, fmt("cuda-sim: cannot allocate %zu bytes of device memory (more than the address space)", bytes));
        return 1;
    }
    // The poison commits every page: a size beyond the machine's memory would end in the OOM
    // killer rather than an error, so refuse it as cudaMalloc would refuse more than the device has.
    const long phys = sysconf(_SC_PHYS_PAGES);
    if (phys > 0 && bytes / page >= (size_t)phys) {
        set_err(err, err_len, fmt("cuda-sim: cannot allocate %zu bytes of device memory (the machine has %zu bytes)", bytes, (size_t)phys * page));
        return 1;
    }
    const size_t padded = (bytes + 15) & ~size_t(15);
    const size_t data = (padded + page - 1) / page * page;
    const size_t len = page + data + page;
    void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        set_err(err, err_len, fmt("cuda-sim: cannot allocate %zu bytes of device memory: mmap: %s", bytes, strerror(errno)));
        return 1;
    }
    const uintptr_t base = (uintptr_t)m;
    if (data && mprotect((void*)(base + page), data, PROT_READ | PROT_WRITE) != 0) {
        const int e = errno;
        munmap(m, len);
        set_err(err, err_len, fmt("cuda-sim: cannot allocate %zu bytes of device memory: mprotect: %s", bytes, strerror(e)));
        return 1;
    }
    const uintptr_t start = base + page + data - padded;
    poison((void*)start, padded);
#if SIM_VALGRIND
    // The slack before the start and the tail padding are not the caller's: memcheck reports them.
    VALGRIND_MAKE_MEM_NOACCESS((void*)(base + page), start - (base + page));
    VALGRIND_MAKE_MEM_NOACCESS((void*)(start + bytes), padded - bytes);
#endif
    {
        std::lock_guard<std::mutex> g(g_mem_mu);
        g_mappings[base] = Mapping{base, len, start, bytes, true};
    }
    *out = (void*)start;
    return 0;
}

// Frees an allocation of bert_sim_alloc. A pointer that is not the start of a live allocation is
// an error (1 and a message), not undefined behaviour.
extern "C" int bert_sim_free(void* p, char* err, size_t err_len) {
    using namespace sim;
    const uintptr_t a = (uintptr_t)p;
    std::lock_guard<std::mutex> g(g_mem_mu);
    const Mapping* hit = mapping_at(a);
    if (!hit || hit->start != a) {
        if (hit && hit->live)
            set_err(err, err_len, fmt("cuda-sim: free of %p, which is %zu bytes into the %zu-byte allocation at 0x%zx, not its start", p, (size_t)(a - hit->start),
                                      hit->size, (size_t)hit->start));
        else
            set_err(err, err_len, fmt("cuda-sim: free of %p, which is not a cuda-sim allocation", p));
        return 1;
    }
    if (!hit->live) {
        set_err(err, err_len, fmt("cuda-sim: double free of the %zu-byte allocation at %p", hit->size, p));
        return 1;
    }
    Mapping& m = g_mappings[hit->map];
    m.live = false;
    // Give the pages back but keep the addresses unusable: a later access faults as a use after free.
    madvise((void*)m.map, m.map_len, MADV_DONTNEED);
    mprotect((void*)m.map, m.map_len, PROT_NONE);
    g_quarantine.push_back(m.map);
    if (g_quarantine.size() > kQuarantine) {
        auto old = g_mappings.find(g_quarantine.front());
        g_quarantine.pop_front();
        if (old != g_mappings.end()) {
            munmap((void*)old->second.map, old->second.map_len);
            g_mappings.erase(old);
        }
    }
    return 0;
}

namespace sim {

namespace {

// ---- the SIGSEGV handler ----

struct sigaction g_previous;
std::once_flag g_install_once;

void chain(int sig, siginfo_t* si, void* ctx) {
    if (g_previous.sa_flags & SA_SIGINFO) {
        if (g_previous.sa_sigaction) {
            g_previous.sa_sigaction(sig, si, ctx);
            return;
        }
    } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
        g_previous.sa_handler(sig);
        return;
    }
    // Nobody else wants it: restore the default action; returning re-executes the faulting
    // instruction, which then ends the process as it would have without cuda-sim.
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
}

void on_segv(int sig, siginfo_t* si, void* ctx) {
#if SIM_CATCH_FAULTS
    ucontext_t* uc = static_cast<ucontext_t*>(ctx);
    RunningFiber& r = tl_running;
#if defined(__x86_64__)
    const uintptr_t sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
#else
    const uintptr_t sp = (uintptr_t)uc->uc_mcontext.sp;
#endif
    if (r.lo != 0 && sp >= r.lo && sp <= r.hi && !r.faulted) {
        FaultRecord& f = r.fault;
        f.addr = (uintptr_t)si->si_addr;
#if defined(__x86_64__)
        const greg_t code = uc->uc_mcontext.gregs[REG_ERR];
        f.pc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
        f.general_protection = uc->uc_mcontext.gregs[REG_TRAPNO] == 13;
        f.access = f.general_protection ? Access::Unknown : (code & 16) ? Access::Execute : (code & 2) ? Access::Write : Access::Read;
        // Resume in on_fault at the top of the fiber's stack (rsp as after a call), never here.
        uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)r.on_fault;
        uc->uc_mcontext.gregs[REG_RSP] = (greg_t)((r.hi & ~uintptr_t(15)) - 64 - 8);
#else
        f.pc = (uintptr_t)uc->uc_mcontext.pc;
        f.general_protection = false;
        f.access = Access::Unknown;
        uc->uc_mcontext.pc = (uintptr_t)r.on_fault;
        uc->uc_mcontext.sp = (r.hi & ~uintptr_t(15)) - 64;
        uc->uc_mcontext.regs[30] = 0;
#endif
        r.faulted = 1;
        return;
    }
#endif
    chain(sig, si, ctx);
}

void install() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous);
}

// ---- what the faulting instruction accessed ----

// Bytes of memory an x86-64 instruction at `p` reads or writes, for the load/store forms g++
// emits for kernel code (integer moves and ALU, SSE/AVX moves and scalar or packed float
// arithmetic); 0 when not recognised.
int x86_access_bytes(const unsigned char* p) {
    bool o16 = false, f2 = false, f3 = false, rex_w = false;
    for (int i = 0; i < 14; ++i, ++p) {
        const unsigned char c = *p;
        if (c == 0x66) o16 = true;
        else if (c == 0xF2) f2 = true;
        else if (c == 0xF3) f3 = true;
        else if (c == 0x2E || c == 0x36 || c == 0x3E || c == 0x26 || c == 0x64 || c == 0x65 || c == 0x67 || c == 0xF0) continue;
        else break;
    }
    int vex_len = 0;  // 16 or 32 under a VEX prefix
    unsigned map = 0;
    if (*p == 0xC5) {
        const unsigned char b = p[1];
        vex_len = (b & 4) ? 32 : 16;
        o16 = (b & 3) == 1, f3 = (b & 3) == 2, f2 = (b & 3) == 3;
        map = 1;
        p += 2;
    } else if (*p == 0xC4) {
        const unsigned char b1 = p[1], b2 = p[2];
        map = b1 & 31;
        rex_w = b2 & 0x80;
        vex_len = (b2 & 4) ? 32 : 16;
        o16 = (b2 & 3) == 1, f3 = (b2 & 3) == 2, f2 = (b2 & 3) == 3;
        p += 3;
    } else {
        if ((*p & 0xF0) == 0x40) {
            rex_w = *p & 8;
            ++p;
        }
        if (*p == 0x0F) {
            map = 1;
            ++p;
        }
    }
    const int osz = rex_w ? 8 : o16 ? 2 : 4;
    const int vec = vex_len ? vex_len : 16;
    const int scalar_or_vec = f3 ? 4 : f2 ? 8 : vec;
    const unsigned op = *p;
    if (map == 0) {
        if (op < 0x40 && (op & 7) <= 3) return (op & 1) ? osz : 1;  // add/or/adc/sbb/and/sub/xor/cmp
        switch (op) {
            case 0x88: case 0x8A: case 0xC6: case 0x80: case 0x84: case 0xF6: case 0xFE: return 1;
            case 0x89: case 0x8B: case 0xC7: case 0x81: case 0x83: case 0x85: case 0xF7: case 0xFF: return osz;
            case 0x63: return 4;
            default: return 0;
        }
    }
    if (map != 1) return 0;
    switch (op) {
        case 0xB6: case 0xBE: return 1;
        case 0xB7: case 0xBF: return 2;
        case 0xAF: return osz;
        case 0x10: case 0x11: case 0x51: case 0x54: case 0x55: case 0x56: case 0x57: case 0x58: case 0x59:
        case 0x5C: case 0x5D: case 0x5E: case 0x5F: case 0xC2: return scalar_or_vec;
        case 0x28: case 0x29: case 0x2B: case 0x5B: case 0x14: case 0x15: return vec;
        case 0x12: case 0x13: case 0x16: case 0x17: case 0xD6: return 8;
        case 0x2E: case 0x2F: return o16 ? 8 : 4;
        case 0x2A: return (f2 || f3) ? (rex_w ? 8 : 4) : 8;
        case 0x2C: case 0x2D: return f3 ? 4 : 8;
        case 0x5A: return f3 ? 4 : f2 ? 8 : o16 ? vec : vec / 2;
        case 0x6E: return rex_w ? 8 : 4;
        case 0x7E: return f3 ? 8 : rex_w ? 8 : 4;
        case 0x6F: case 0x7F: return (o16 || f3) ? vec : 8;
        default: break;
    }
    if ((op & 0xF0) == 0x40) return osz;  // cmov
    if (o16 && ((op >= 0x60 && op <= 0x6D) || (op >= 0x70 && op <= 0x76) || op >= 0xD0)) return vec;  // SSE2 integer
    return 0;
}

int access_bytes(uintptr_t pc) {
#if defined(__x86_64__)
    return x86_access_bytes(reinterpret_cast<const unsigned char*>(pc));
#else
    (void)pc;
    return 0;
#endif
}

// ---- source lines ----

struct ObjectAt {
    uintptr_t pc;
    std::string path;
    uintptr_t bias;
    bool found;
};

// The main program's file (dl_iterate_phdr names it ""). Its path, not /proc/self/exe, which the
// symbolizer would read as itself; readlink here also sees through valgrind, which runs the
// program under its own executable.
std::string main_program() {
    char buf[4096];
    const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n > 0 && access(std::string(buf, (size_t)n).c_str(), R_OK) == 0) return std::string(buf, (size_t)n);
    return fmt("/proc/%d/exe", (int)getpid());
}

int find_object(struct dl_phdr_info* info, size_t, void* data) {
    ObjectAt* o = static_cast<ObjectAt*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD) continue;
        const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (o->pc >= lo && o->pc < lo + ph.p_memsz) {
            o->path = info->dlpi_name && info->dlpi_name[0] ? std::string(info->dlpi_name) : main_program();
            o->bias = info->dlpi_addr;
            o->found = true;
            return 1;
        }
    }
    return 0;
}

// Runs `argv` with stdout to a pipe; returns what it printed ("" when it cannot run).
std::string run_tool(const char* const* argv) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return "";
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, const_cast<char* const*>(argv), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    std::string out;
    if (rc == 0) {
        char buf[4096];
        for (;;) {
            const ssize_t n = read(fds[0], buf, sizeof buf);
            if (n > 0) out.append(buf, (size_t)n);
            else if (n < 0 && errno == EINTR) continue;
            else break;
        }
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) out.clear();
    }
    close(fds[0]);
    return out;
}

// "dir/.../tests/sim_kernels/x.cu:12" -> "tests/sim_kernels/x.cu:12": the #line names are
// relative to the crate; the symbolizer may prefix the compilation directory.
std::string crate_relative(std::string loc) {
    for (const char* root : {"/kernels/", "/tests/sim_kernels/", "/src/cuda/sim/"}) {
        const size_t at = loc.rfind(root);
        if (at != std::string::npos) return loc.substr(at + 1);
    }
    return loc;
}

}  // namespace

std::string source_location(uintptr_t pc) {
    const char* tool = getenv("CUDA_SIM_ADDR2LINE");
    if (tool && !*tool) return "";  // turned off
    // The same faulting instruction tends to come back (a test repeating a launch): ask once.
    static std::mutex cache_mu;
    static std::map<uintptr_t, std::string> cache;
    {
        std::lock_guard<std::mutex> g(cache_mu);
        if (auto it = cache.find(pc); it != cache.end()) return it->second;
    }
    ObjectAt o{pc, "", 0, false};
    dl_iterate_phdr(find_object, &o);
    if (!o.found) return "";
    const std::string addr = fmt("0x%zx", (size_t)(pc - o.bias));
    // llvm-addr2line reads only what it needs (0.2 s on a test binary); GNU addr2line loads all
    // debug information first (4 s there), so it comes second.
    std::string out;
    for (const char* t : {tool, "llvm-addr2line", "addr2line"}) {
        if (!t) continue;
        const char* argv[] = {t, "-f", "-C", "-i", "-e", o.path.c_str(), addr.c_str(), nullptr};
        out = run_tool(argv);
        if (!out.empty() || tool) break;
    }
    // Pairs of lines, function then file:line, innermost inlined frame first; "??" or ":0" where
    // there is no line information.
    struct Frame {
        std::string func, loc;
    };
    std::vector<Frame> frames;
    std::vector<std::string> lines;
    for (size_t pos = 0; pos < out.size();) {
        size_t nl = out.find('\n', pos);
        if (nl == std::string::npos) nl = out.size();
        lines.push_back(out.substr(pos, nl - pos));
        pos = nl + 1;
    }
    for (size_t i = 0; i + 1 < lines.size(); i += 2) {
        std::string loc = lines[i + 1];
        if (const size_t d = loc.find(" (discriminator"); d != std::string::npos) loc.resize(d);
        if (loc.compare(0, 2, "??") == 0 || loc.back() == '?' || (loc.size() > 2 && loc.compare(loc.size() - 2, 2, ":0") == 0)) continue;
        frames.push_back(Frame{lines[i], crate_relative(loc)});
    }
    std::string s;
    if (!frames.empty()) {
        s = frames.front().loc;
        // A helper inlined into the kernel: name both.
        const Frame& outer = frames.back();
        if (outer.func != frames.front().func) s += " (in " + frames.front().func + ", inlined into " + outer.func + " at " + outer.loc + ")";
    }
    std::lock_guard<std::mutex> g(cache_mu);
    cache[pc] = s;
    return s;
}

std::string describe_fault(const FaultRecord& f, const Stack& stack, size_t stack_usable) {
    const char* kind = f.access == Access::Read ? "read" : f.access == Access::Write ? "write" : "access";
    if (f.access == Access::Execute) return fmt("jump to invalid code address 0x%zx", (size_t)f.addr);
    if (f.general_protection)
        return "invalid global access (general protection fault: a non-canonical address, or a misaligned aligned-vector access)";
    const int bytes = access_bytes(f.pc);
    const std::string of = bytes ? fmt(" of %d byte%s", bytes, bytes == 1 ? "" : "s") : std::string();
    if (f.addr >= (uintptr_t)stack.map && f.addr < stack.lo)
        return fmt("stack overflow: the thread used up its %zu KiB cuda-sim stack (deep recursion or large local arrays) with a %s at 0x%zx", stack_usable / 1024,
                   kind, (size_t)f.addr);
    std::lock_guard<std::mutex> g(g_mem_mu);
    const Mapping* m = mapping_at(f.addr);
    if (m && !m->live)
        return fmt("use after free: global %s%s at 0x%zx, %td bytes from the start of a %zu-byte cuda-sim allocation (0x%zx) that was freed", kind, of.c_str(),
                   (size_t)f.addr, (ptrdiff_t)(f.addr - m->start), m->size, (size_t)m->start);
    if (m && f.addr >= m->start + m->size)
        return fmt("out-of-bounds global %s%s at 0x%zx: %zu bytes past the end of a %zu-byte cuda-sim allocation (0x%zx)", kind, of.c_str(), (size_t)f.addr,
                   (size_t)(f.addr - (m->start + m->size)), m->size, (size_t)m->start);
    if (m && f.addr < m->start)
        return fmt("out-of-bounds global %s%s at 0x%zx: %zu bytes before the start of a %zu-byte cuda-sim allocation (0x%zx)", kind, of.c_str(), (size_t)f.addr,
                   (size_t)(m->start - f.addr), m->size, (size_t)m->start);
    return fmt("invalid global %s at address 0x%zx%s", kind, (size_t)f.addr,
               bytes ? fmt(" (a %d-byte access outside every cuda-sim allocation)", bytes).c_str() : " (outside every cuda-sim allocation)");
}

void install_fault_handler() {
#if SIM_CATCH_FAULTS
    std::call_once(g_install_once, install);
#endif
}

AltStack::AltStack() {
#if SIM_CATCH_FAULTS
    size_t want = 64 * 1024;
#ifdef _SC_SIGSTKSZ
    const long min = sysconf(_SC_SIGSTKSZ);
    if (min > 0 && (size_t)min * 4 > want) want = (size_t)min * 4;
#endif
    stack_t old;
    if (sigaltstack(nullptr, &old) == 0 && !(old.ss_flags & SS_DISABLE)) return;  // the thread has one already
    void* m = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return;
    stack_t ss;
    ss.ss_sp = m;
    ss.ss_size = want;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, nullptr) != 0) {
        munmap(m, want);
        return;
    }
    mem = m;
    bytes = want;
    installed = true;
#endif
}

AltStack::~AltStack() {
    if (!installed) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    munmap(mem, bytes);
}

}  // namespace sim

// 1 when a fault can be reported with its source line here (a symbolizer and line information).
extern "C" int bert_sim_source_lines_available() {
    static const int yes = !sim::source_location((uintptr_t)&bert_sim_source_lines_available).empty();
    return yes;
}
