// runtime.cpp — scheduler of the interpreted mode (see cuda_interp.h for the model).
//
// interp_run() validates the launch, then a pool of OS worker threads (the
// caller is one of them) takes blocks from an atomic counter. A worker runs a
// block as one fiber per CUDA thread and round-robins over the fibers that are
// ready; a fiber runs until it blocks in __syncthreads / a warp collective or
// returns. Whoever completes a barrier or collective releases the waiters and
// simply continues, so the common case costs two context switches per thread
// per barrier.
//
// Errors (divergent barrier, bad warp mask, deadlock, __trap) fail the launch:
// the block is abandoned (its fibers are never resumed; their stacks are reused
// by the next block), no further blocks are started, and interp_run returns the
// first message.
//
// Fiber switching: a hand-written x86-64 switch (saves callee-saved registers
// and rsp, no syscall); elsewhere, or with -DCONTRA_INTERP_UCONTEXT, ucontext
// (swapcontext costs a sigprocmask syscall per switch: correct, but slower).
// AddressSanitizer and ThreadSanitizer are told about every stack switch
// (TSan then sees the fibers of a block as ordered by the switches, and still
// reports unsynchronised accesses between blocks).
//
// Environment knobs (read once):
//   CONTRA_INTERP_THREADS   max worker threads per launch (default min(cores, 16))
//   CONTRA_INTERP_STACK_KB  fiber stack size in KiB (default 256)
//   CONTRA_INTERP_REVERSE=1 run the threads of a block in descending order
//                           (another valid schedule: run tests both ways to
//                           shake out missing __syncthreads / __syncwarp)

#include "cuda_interp.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define INTERP_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__SANITIZE_THREAD__)
#define INTERP_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif

#if defined(__x86_64__) && !defined(CONTRA_INTERP_UCONTEXT)
#define INTERP_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// Built-in variables (declared in cuda_interp.h).
__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

namespace interp {
__thread unsigned char* tls_dynamic_shared;
__thread unsigned long long tls_dynamic_shared_bytes;
__thread unsigned long long tls_block_serial;
}

namespace {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned long long kMaxSharedBytes = 227 * 1024;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

unsigned env_unsigned(const char* name, unsigned fallback) {
    const char* v = getenv(name);
    if (!v || !*v) return fallback;
    char* end = nullptr;
    unsigned long x = strtoul(v, &end, 10);
    return (end && *end == 0 && x > 0 && x < (1ul << 20)) ? static_cast<unsigned>(x) : fallback;
}

size_t page_size() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

bool reverse_order() {
    static const bool r = env_unsigned("CONTRA_INTERP_REVERSE", 0) != 0;
    return r;
}

// 256 KiB: generous for kernels built at -O0 and/or with sanitizers; pages are
// only committed when touched (MAP_NORESERVE), so the reservation is cheap.
size_t stack_size() {
    static const size_t s = [] {
        size_t kb = env_unsigned("CONTRA_INTERP_STACK_KB", 256);
        size_t bytes = std::max<size_t>(kb, 16) * 1024;
        return (bytes + page_size() - 1) / page_size() * page_size();
    }();
    return s;
}

// ---------------------------------------------------------------------------
// Fiber stacks: one arena (N stacks, each below a PROT_NONE guard page so an
// overflow faults instead of silently corrupting a neighbour) per worker, kept
// in a global pool and reused by later launches to avoid mmap + page faults.
// ---------------------------------------------------------------------------
struct Arena {
    char* base = nullptr;
    size_t bytes = 0;
    unsigned slots = 0;
    bool dirty = false;  // a block was abandoned: stale ASan stack poisoning may remain

    size_t stride() const { return page_size() + stack_size(); }
    char* stack(unsigned i) const { return base + i * stride() + page_size(); }
};

std::mutex g_pool_mu;
std::vector<Arena> g_pool;

bool acquire_arena(unsigned slots, Arena* out) {
    {
        std::lock_guard<std::mutex> lock(g_pool_mu);
        auto best = g_pool.end();
        for (auto it = g_pool.begin(); it != g_pool.end(); ++it)
            if (it->slots >= slots && (best == g_pool.end() || it->slots < best->slots)) best = it;
        if (best != g_pool.end()) {
            *out = *best;
            g_pool.erase(best);
            return true;
        }
    }
    // Round up so that arenas fit later launches with somewhat bigger blocks.
    unsigned n = 32;
    while (n < slots) n *= 2;
    Arena a;
    a.slots = n;
    a.bytes = n * a.stride();
    void* p = mmap(nullptr, a.bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    a.base = static_cast<char*>(p);
    // Guard pages. If the kernel refuses (too many mappings) we carry on without.
    for (unsigned i = 0; i < n; ++i) mprotect(a.base + i * a.stride(), page_size(), PROT_NONE);
    *out = a;
    return true;
}

void release_arena(const Arena& a) {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (g_pool.size() < 64) {
        g_pool.push_back(a);
    } else {
        munmap(a.base, a.bytes);
    }
}

// ---------------------------------------------------------------------------
// Context switch
// ---------------------------------------------------------------------------
#if INTERP_ASM_SWITCH
extern "C" {
// Saves callee-saved registers on the current stack, stores rsp in *save_sp,
// switches to load_sp and pops the registers saved there.
__attribute__((visibility("hidden"))) void interp_ctx_switch(void** save_sp, void* load_sp);
__attribute__((visibility("hidden"), used, noreturn)) void interp_fiber_main(void* fiber);
}
// A new fiber's stack holds 6 dummy registers (r12 = the Fiber*) and the
// address of interp_fiber_start, so the first switch "returns" into it.
asm(R"(
    .pushsection .text
    .p2align 4
    .globl interp_ctx_switch
    .hidden interp_ctx_switch
    .type interp_ctx_switch,@function
interp_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size interp_ctx_switch, .-interp_ctx_switch

    .p2align 4
    .globl interp_fiber_start
    .hidden interp_fiber_start
    .type interp_fiber_start,@function
interp_fiber_start:
    movq %r12, %rdi
    call interp_fiber_main
    ud2
    .size interp_fiber_start, .-interp_fiber_start
    .popsection
)");
extern "C" __attribute__((visibility("hidden"))) char interp_fiber_start[];
#endif

#if INTERP_TSAN
// TSan fiber contexts are costly to create and TSan slows down as dead ones
// pile up, so they are pooled and reused across launches.
struct TsanFiber {
    void* fiber = nullptr;
    unsigned runs = 0;
};
std::mutex g_tsan_mu;
std::vector<TsanFiber> g_tsan_pool;

TsanFiber tsan_fiber_get() {
    std::lock_guard<std::mutex> lock(g_tsan_mu);
    if (g_tsan_pool.empty()) return TsanFiber{__tsan_create_fiber(0), 0};
    TsanFiber f = g_tsan_pool.back();
    g_tsan_pool.pop_back();
    return f;
}

void tsan_fiber_put(const TsanFiber& f) {
    std::lock_guard<std::mutex> lock(g_tsan_mu);
    g_tsan_pool.push_back(f);
}
#endif

enum class State : unsigned char { Ready, AtBarrier, AtWarp, AtActiveMask, Done };

struct Worker;

struct Fiber {
    Worker* w = nullptr;
    char* stack = nullptr;
#if INTERP_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
#if INTERP_ASAN
    void* fake_stack = nullptr;
#endif
#if INTERP_TSAN
    TsanFiber tsan;
#endif
    uint3 tid{};
    unsigned lane = 0, warp = 0;
    State state = State::Ready;
    int sync_count = 0;         // result of the last __syncthreads_* for this thread
    std::uint64_t warp_result = 0;  // result of the last warp collective for this lane
};

enum WarpKind { WARP_SHFL, WARP_BALLOT, WARP_SYNC };
const char* warp_kind_name(int k) {
    return k == WARP_SHFL ? "__shfl*_sync" : k == WARP_BALLOT ? "__ballot/any/all_sync" : "__syncwarp";
}

// Lanes waiting in one collective call: grouped by their exact mask, as lanes
// in divergent branches may run independent collectives with disjoint masks.
struct WarpGroup {
    unsigned mask, arrived;
    int kind;
};

struct Warp {
    unsigned existing = 0;  // lanes that exist (partial last warp)
    unsigned exited = 0;
    unsigned at_activemask = 0;  // lanes waiting in __activemask()
    std::uint64_t in[32];   // value each waiting lane contributed
    int src[32];            // shfl: lane each lane reads from
    int ngroups = 0;
    WarpGroup groups[32];
};

struct Launch {
    InterpLaunchConfig cfg;
    void (*body)(const void*);
    const void* params;
    unsigned long long total_blocks;
    unsigned threads_per_block;
    std::atomic<unsigned long long> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;

    void fail(const std::string& msg) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = msg;
        failed.store(true);
    }
};

struct Worker {
    Launch* L = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Arena arena;
    unsigned char* dyn = nullptr;
    size_t dyn_bytes = 0;
    Fiber* cur = nullptr;
    unsigned nthreads = 0;
    unsigned done = 0;         // fibers that returned
    unsigned at_barrier = 0;   // fibers waiting in __syncthreads
    int barrier_count = 0;     // predicates accumulated for __syncthreads_count/and/or
    bool block_failed = false;
#if INTERP_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
#if INTERP_ASAN
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
#if INTERP_TSAN
    void* tsan_sched = nullptr;
#endif
};

__thread Worker* tls_worker;

#if !INTERP_ASM_SWITCH
void fiber_entry_uc();  // makecontext entry, defined after fiber_main
#endif

// ---- switching -------------------------------------------------------------

void switch_to_fiber(Worker* w, Fiber* f) {
    w->cur = f;
    threadIdx = f->tid;
#if INTERP_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f->stack, stack_size());
#endif
#if INTERP_TSAN
    __tsan_switch_to_fiber(f->tsan.fiber, 0);
#endif
#if INTERP_ASM_SWITCH
    interp_ctx_switch(&w->sched_sp, f->sp);
#else
    swapcontext(&w->sched_uc, &f->uc);
#endif
#if INTERP_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Back to the scheduler. `forever`: this fiber will never be resumed.
void switch_to_scheduler(Worker* w, Fiber* f, bool forever) {
#if INTERP_ASAN
    __sanitizer_start_switch_fiber(forever ? nullptr : &f->fake_stack, w->sched_stack_bottom,
                                   w->sched_stack_size);
#else
    (void)forever;
#endif
#if INTERP_TSAN
    __tsan_switch_to_fiber(w->tsan_sched, 0);
#endif
#if INTERP_ASM_SWITCH
    interp_ctx_switch(&f->sp, w->sched_sp);
#else
    swapcontext(&f->uc, &w->sched_uc);
#endif
#if INTERP_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
}

void reset_fiber_stack(Fiber* f) {
#if INTERP_ASAN
    // A finished fiber never returns from fiber_main, so ASan's redzones for
    // that frame (near the top of the stack) are still poisoned: clear them.
    // (Whole stacks of abandoned fibers are cleared in run_block.)
    const size_t top_bytes = std::min<size_t>(stack_size(), 16 * 1024);
    __asan_unpoison_memory_region(f->stack + stack_size() - top_bytes, top_bytes);
#endif
#if INTERP_TSAN
    // The TSan fiber's shadow call stack keeps the frames of the previous run
    // (fiber_main never returns): replace it now and then to bound that growth.
    if (++f->tsan.runs % 1024 == 0) {
        __tsan_destroy_fiber(f->tsan.fiber);
        f->tsan.fiber = __tsan_create_fiber(0);
    }
#endif
#if INTERP_ASM_SWITCH
    // Initial frame, popped by interp_ctx_switch: r15 r14 r13 r12 rbx rbp, return
    // address. rsp must be 16-byte aligned when interp_fiber_start executes `call`.
    char* top = f->stack + stack_size();  // page aligned
    void** sp = reinterpret_cast<void**>(top - 72);
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[3] = f;                                // r12
    sp[6] = reinterpret_cast<void*>(interp_fiber_start);
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = stack_size();
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_entry_uc, 0);
#endif
}

Worker* need_worker(const char* what) {
    Worker* w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "contra interp: %s called outside of a kernel launch\n", what);
        abort();
    }
    return w;
}

// Fails the launch and abandons the current block; never returns. printf-style
// so that no heap object is alive on the abandoned stack (it would leak).
[[noreturn]] void fail_block(Worker* w, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
[[noreturn]] void fail_block(Worker* w, const char* fmt, ...) {
    Fiber* f = w->cur;
    {
        char msg[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        w->L->fail(format("%s [block (%u,%u,%u), thread (%u,%u,%u)]", msg, blockIdx.x, blockIdx.y,
                          blockIdx.z, f->tid.x, f->tid.y, f->tid.z));
    }
    w->block_failed = true;
    switch_to_scheduler(w, f, true);
    abort();  // unreachable: abandoned fibers are never resumed
}

void on_fiber_exit(Worker* w, Fiber* f) {
    f->state = State::Done;
    ++w->done;
    Warp& wp = w->warps[f->warp];
    const unsigned bit = 1u << f->lane;
    wp.exited |= bit;
    for (int g = 0; g < wp.ngroups; ++g) {
        if (wp.groups[g].mask & bit)
            fail_block(w, "thread exited while lanes 0x%08x of its warp wait for it in %s with mask 0x%08x",
                       wp.groups[g].arrived, warp_kind_name(wp.groups[g].kind), wp.groups[g].mask);
    }
    if (w->at_barrier > 0)
        fail_block(w, "divergent __syncthreads: thread exited while %u threads of its block wait at a barrier",
                   w->at_barrier);
}

void fiber_main(Fiber* f) {
    Worker* w = f->w;
#if INTERP_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
    bool threw = false;
    try {
        w->L->body(w->L->params);
    } catch (...) {
        threw = true;  // fail outside the handler, which must be left normally
    }
    if (threw) fail_block(w, "%s", "C++ exception escaped the kernel");
    on_fiber_exit(w, f);
    switch_to_scheduler(w, f, true);
    abort();  // unreachable
}

}  // namespace

#if INTERP_ASM_SWITCH
extern "C" __attribute__((visibility("hidden"))) void interp_fiber_main(void* fiber) {
    fiber_main(static_cast<Fiber*>(fiber));
}
#else
namespace {
void fiber_entry_uc() { fiber_main(tls_worker->cur); }  // makecontext passes no pointer portably
}  // namespace
#endif

namespace {

// ---- running one block -----------------------------------------------------

void diagnose_stall(Worker* w) {
    std::string msg = format("deadlock: %u threads wait at __syncthreads", w->at_barrier);
    for (size_t i = 0; i < w->warps.size(); ++i) {
        const Warp& wp = w->warps[i];
        for (int g = 0; g < wp.ngroups; ++g) {
            msg += format("; warp %zu: lanes 0x%08x wait in %s for mask 0x%08x", i,
                          wp.groups[g].arrived, warp_kind_name(wp.groups[g].kind), wp.groups[g].mask);
        }
    }
    w->L->fail(format("%s [block (%u,%u,%u)]", msg.c_str(), blockIdx.x, blockIdx.y, blockIdx.z));
    w->block_failed = true;
}

// __activemask(): the lanes that reach it together are those waiting in it once
// no other lane of the warp can run (the rest exited or block elsewhere), which
// is what a diverged warp reports on real hardware. Checked after every switch
// back from a lane of a warp with waiters: only a lane's own run can make the
// warp quiescent.
void maybe_complete_activemask(Worker* w, unsigned warp) {
    Fiber* lanes = &w->fibers[warp * 32];
    const unsigned n = std::min(32u, w->nthreads - warp * 32);
    for (unsigned l = 0; l < n; ++l)
        if (lanes[l].state == State::Ready) return;
    Warp& wp = w->warps[warp];
    for (unsigned l = 0; l < n; ++l) {
        if (wp.at_activemask >> l & 1u) {
            lanes[l].warp_result = wp.at_activemask;
            lanes[l].state = State::Ready;
        }
    }
    wp.at_activemask = 0;
}

bool run_block(Worker* w, unsigned long long linear) {
    const InterpLaunchConfig& c = w->L->cfg;
    blockIdx = uint3{static_cast<unsigned>(linear % c.grid[0]),
                     static_cast<unsigned>(linear / c.grid[0] % c.grid[1]),
                     static_cast<unsigned>(linear / (static_cast<unsigned long long>(c.grid[0]) * c.grid[1]))};
    if (w->dyn_bytes) memset(w->dyn, 0xff, w->dyn_bytes);  // NaN garbage, like uninitialised smem
    ++interp::tls_block_serial;
#if INTERP_ASAN
    if (w->arena.dirty) {  // frames of abandoned fibers were never unpoisoned
        __asan_unpoison_memory_region(w->arena.base, w->arena.bytes);
        w->arena.dirty = false;
    }
#endif
    for (Fiber& f : w->fibers) {
        f.state = State::Ready;
        reset_fiber_stack(&f);
    }
    for (Warp& wp : w->warps) {
        wp.exited = 0;
        wp.at_activemask = 0;
        wp.ngroups = 0;
    }
    w->done = w->at_barrier = 0;
    w->barrier_count = 0;
    w->block_failed = false;

    const bool reverse = reverse_order();
    // Odd blocks run warp by warp: each warp until all its threads wait at a barrier or exit,
    // so one warp gets far ahead of the others (a missing __syncthreads between a warp's
    // reads of shared memory and another warp's next writes then shows); even blocks
    // round-robin over the threads. Both are schedules a GPU may run.
    const bool warp_by_warp = linear % 2 == 1 && !reverse;
    const size_t n = w->fibers.size();
    while (w->done < w->nthreads) {
        bool ran = false;
        for (size_t i = 0; i < n; ++i) {
            Fiber& f = w->fibers[reverse ? n - 1 - i : i];
            if (f.state != State::Ready) continue;
            ran = true;
            switch_to_fiber(w, &f);
            if (w->block_failed) break;
            Warp& wp = w->warps[f.warp];
            if (wp.at_activemask) maybe_complete_activemask(w, f.warp);
            if (!warp_by_warp || f.lane != 31 || w->done >= w->nthreads) continue;
            // The warp's last lane ran: go back to its first lane while any lane is ready.
            const size_t first = f.warp * 32;
            bool ready = false;
            for (size_t l = first; l < std::min(first + 32, n); ++l) ready = ready || w->fibers[l].state == State::Ready;
            if (ready) i = first - 1;  // the loop's ++i resumes at `first`
        }
        if (!w->block_failed && !ran) diagnose_stall(w);
        if (w->block_failed) {
            w->arena.dirty = true;
            w->cur = nullptr;
            return false;
        }
    }
    w->cur = nullptr;
    return true;
}

void worker_body(Launch* L) {
    const InterpLaunchConfig& c = L->cfg;
    Worker w;
    w.L = L;
    w.nthreads = L->threads_per_block;
    if (!acquire_arena(w.nthreads, &w.arena)) {
        L->fail("cannot allocate fiber stacks (mmap failed)");
        return;
    }
    w.dyn_bytes = c.shared_bytes;
    void* dyn = nullptr;
    if (posix_memalign(&dyn, 128, std::max<size_t>(w.dyn_bytes, 1)) != 0) {
        release_arena(w.arena);
        L->fail("cannot allocate dynamic shared memory");
        return;
    }
    w.dyn = static_cast<unsigned char*>(dyn);

    w.fibers.resize(w.nthreads);
    w.warps.resize((w.nthreads + 31) / 32);
    for (unsigned i = 0; i < w.nthreads; ++i) {
        Fiber& f = w.fibers[i];
        f.w = &w;
        f.stack = w.arena.stack(i);
        f.tid = uint3{i % c.block[0], i / c.block[0] % c.block[1], i / (c.block[0] * c.block[1])};
        f.lane = i % 32;
        f.warp = i / 32;
        w.warps[f.warp].existing |= 1u << f.lane;
    }

#if INTERP_TSAN
    w.tsan_sched = __tsan_get_current_fiber();
    for (Fiber& f : w.fibers) f.tsan = tsan_fiber_get();
#endif
    tls_worker = &w;
    interp::tls_dynamic_shared = w.dyn;
    interp::tls_dynamic_shared_bytes = w.dyn_bytes;
    blockDim = dim3(c.block[0], c.block[1], c.block[2]);
    gridDim = dim3(c.grid[0], c.grid[1], c.grid[2]);
    while (!L->failed.load(std::memory_order_relaxed)) {
        unsigned long long b = L->next_block.fetch_add(1);
        if (b >= L->total_blocks || !run_block(&w, b)) break;
    }
    tls_worker = nullptr;
    interp::tls_dynamic_shared = nullptr;
    interp::tls_dynamic_shared_bytes = 0;

#if INTERP_TSAN
    for (Fiber& f : w.fibers) tsan_fiber_put(f.tsan);
#endif
    free(w.dyn);
    release_arena(w.arena);
}

void worker_main(Launch* L) {
    try {
        worker_body(L);
    } catch (...) {  // allocation failure; must not escape a std::thread
        tls_worker = nullptr;
        L->fail("interp: out of memory in worker thread");
    }
}

unsigned max_workers() {
    static const unsigned n = [] {
        unsigned hw = std::thread::hardware_concurrency();
        return env_unsigned("CONTRA_INTERP_THREADS", std::min(std::max(hw, 1u), 16u));
    }();
    return n;
}

void write_err(char* err, unsigned long err_len, const std::string& msg) {
    if (!err || err_len == 0) return;
    size_t n = std::min<size_t>(msg.size(), err_len - 1);
    memcpy(err, msg.data(), n);
    err[n] = 0;
}

std::string validate(const InterpLaunchConfig* c, void (*body)(const void*)) {
    if (!c) return "invalid launch: null config";
    if (!body) return "invalid launch: null kernel/params";
    for (int i = 0; i < 3; ++i) {
        if (c->grid[i] == 0 || c->block[i] == 0)
            return format("invalid configuration: zero dimension in grid (%u,%u,%u) / block (%u,%u,%u)",
                          c->grid[0], c->grid[1], c->grid[2], c->block[0], c->block[1], c->block[2]);
    }
    const unsigned long long threads =
        static_cast<unsigned long long>(c->block[0]) * c->block[1] * c->block[2];
    if (threads > kMaxBlockThreads || c->block[2] > 64)
        return format("invalid configuration: block (%u,%u,%u) has %llu threads (max 1024, z <= 64)",
                      c->block[0], c->block[1], c->block[2], threads);
    if (c->grid[0] > 0x7fffffffu || c->grid[1] > 65535 || c->grid[2] > 65535)
        return format("invalid configuration: grid (%u,%u,%u) exceeds (2^31-1, 65535, 65535)",
                      c->grid[0], c->grid[1], c->grid[2]);
    if (c->shared_bytes > kMaxSharedBytes)
        return format("invalid configuration: %llu bytes of dynamic shared memory (max %llu)",
                      c->shared_bytes, kMaxSharedBytes);
    return {};
}

}  // namespace

// ---------------------------------------------------------------------------
// Device-side hooks (declared in cuda_interp.h)
// ---------------------------------------------------------------------------
namespace interp {

int sync_block(int op, int pred) {
    Worker* w = need_worker("__syncthreads");
    Fiber* f = w->cur;
    if (w->done > 0)
        fail_block(w, "divergent __syncthreads: %u threads of the block already exited", w->done);
    w->barrier_count += pred != 0;
    if (++w->at_barrier == w->nthreads) {
        // Last to arrive: release everyone (no thread has exited, so all wait here).
        for (Fiber& o : w->fibers) {
            o.state = State::Ready;
            o.sync_count = w->barrier_count;
        }
        w->at_barrier = 0;
        w->barrier_count = 0;
    } else {
        f->state = State::AtBarrier;
        switch_to_scheduler(w, f, false);
    }
    const int count = f->sync_count;
    switch (op) {
        case SYNC_COUNT: return count;
        case SYNC_AND: return count == static_cast<int>(w->nthreads);
        case SYNC_OR: return count > 0;
        default: return 0;
    }
}

namespace {
// Common part of all warp collectives: validate the mask, join the group of
// lanes with the same mask, and either complete it (compute every lane's
// result, wake them up) or wait. Results go to each lane's own slot, so a lane
// that races ahead into the next collective cannot clobber them.
std::uint64_t warp_collective(Worker* w, int kind, unsigned mask, std::uint64_t value, int src) {
    Fiber* f = w->cur;
    Warp& wp = w->warps[f->warp];
    const unsigned bit = 1u << f->lane;
    const char* name = warp_kind_name(kind);
    if (!(mask & bit))
        fail_block(w, "%s: calling lane %u is not in mask 0x%08x", name, f->lane, mask);
    if (mask & ~wp.existing)
        fail_block(w, "%s: mask 0x%08x names lanes 0x%08x that do not exist (block of %u threads has a partial last warp)",
                   name, mask, mask & ~wp.existing, w->nthreads);
    if (mask & wp.exited)
        fail_block(w, "%s: mask 0x%08x names lanes 0x%08x that already exited", name, mask, mask & wp.exited);
    wp.in[f->lane] = value;
    wp.src[f->lane] = src;

    int g = 0;
    while (g < wp.ngroups && wp.groups[g].mask != mask) ++g;
    if (g == wp.ngroups) {
        wp.groups[g] = WarpGroup{mask, 0, kind};
        ++wp.ngroups;
    } else if (wp.groups[g].kind != kind) {
        fail_block(w, "mismatched warp collectives with mask 0x%08x: %s vs %s", mask, name,
                   warp_kind_name(wp.groups[g].kind));
    }
    WarpGroup& grp = wp.groups[g];
    grp.arrived |= bit;
    if (grp.arrived != mask) {
        f->state = State::AtWarp;
        switch_to_scheduler(w, f, false);
        return f->warp_result;
    }

    // Last lane to arrive: compute everybody's result.
    unsigned ballot = 0;
    if (kind == WARP_BALLOT)
        for (unsigned l = 0; l < 32; ++l)
            if ((mask >> l & 1u) && wp.in[l]) ballot |= 1u << l;
    Fiber* lanes = &w->fibers[f->warp * 32];
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        std::uint64_t r = 0;
        if (kind == WARP_SHFL) {
            const int s = wp.src[l];
            // Reading a lane that does not participate is undefined in CUDA: poison it.
            r = (mask >> s & 1u) ? wp.in[s] : ~std::uint64_t{0};
        } else if (kind == WARP_BALLOT) {
            r = ballot;
        }
        lanes[l].warp_result = r;
        lanes[l].state = State::Ready;
    }
    wp.groups[g] = wp.groups[wp.ngroups - 1];
    --wp.ngroups;
    return f->warp_result;
}
}  // namespace

std::uint64_t warp_shfl(unsigned mask, std::uint64_t bits, int mode, int arg, int width) {
    Worker* w = need_worker("__shfl*_sync");
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail_block(w, "__shfl*_sync: width %d is not a power of two in [1, 32]", width);
    const int lane = static_cast<int>(w->cur->lane);
    const int seg = lane & ~(width - 1);  // first lane of this lane's width-segment
    const int last = seg + width - 1;
    int src = lane;
    switch (mode) {
        case SHFL_IDX: src = seg + (arg & (width - 1)); break;
        case SHFL_UP: src = lane - (arg & 31); if (src < seg) src = lane; break;
        case SHFL_DOWN: src = lane + (arg & 31); if (src > last) src = lane; break;
        case SHFL_XOR: src = lane ^ (arg & 31); if (src > last) src = lane; break;
    }
    return warp_collective(w, WARP_SHFL, mask, bits, src);
}

unsigned warp_ballot(unsigned mask, int pred) {
    Worker* w = need_worker("__ballot_sync");
    return static_cast<unsigned>(warp_collective(w, WARP_BALLOT, mask, pred != 0, 0));
}

void warp_sync(unsigned mask) {
    Worker* w = need_worker("__syncwarp");
    warp_collective(w, WARP_SYNC, mask, 0, 0);
}

// Waits until the rest of the warp is blocked or gone; see maybe_complete_activemask.
unsigned active_mask() {
    Worker* w = need_worker("__activemask");
    Fiber* f = w->cur;
    w->warps[f->warp].at_activemask |= 1u << f->lane;
    f->state = State::AtActiveMask;
    switch_to_scheduler(w, f, false);
    return static_cast<unsigned>(f->warp_result);
}

void trap(const char* what) {
    Worker* w = need_worker(what);
    fail_block(w, "%s", what);
}

}  // namespace interp

// ---------------------------------------------------------------------------
// C ABI
// ---------------------------------------------------------------------------
namespace {
int run_launch(const InterpLaunchConfig* cfg, void (*body)(const void* params), const void* params,
               char* err, unsigned long err_len) {
    std::string problem = validate(cfg, body);
    if (problem.empty() && tls_worker) problem = "interp_run called from inside a running kernel";
    if (!problem.empty()) {
        write_err(err, err_len, problem);
        return 1;
    }
    Launch L;
    L.cfg = *cfg;
    L.body = body;
    L.params = params;
    L.total_blocks = static_cast<unsigned long long>(cfg->grid[0]) * cfg->grid[1] * cfg->grid[2];
    L.threads_per_block = cfg->block[0] * cfg->block[1] * cfg->block[2];

    const unsigned long long want = std::min<unsigned long long>(max_workers(), L.total_blocks);
    std::vector<std::thread> helpers;
    for (unsigned long long i = 1; i < want; ++i) {
        try {
            helpers.emplace_back(worker_main, &L);
        } catch (...) {
            break;  // fewer threads is fine
        }
    }
    worker_main(&L);  // the calling thread works too
    for (std::thread& t : helpers) t.join();

    if (L.failed.load()) {
        write_err(err, err_len, L.error);
        return 1;
    }
    write_err(err, err_len, "");
    return 0;
}
}  // namespace

extern "C" int interp_run(const InterpLaunchConfig* cfg, void (*body)(const void* params),
                          const void* params, char* err, unsigned long err_len) {
    try {  // nothing may unwind into the C / Rust caller
        return run_launch(cfg, body, params, err, err_len);
    } catch (...) {
        write_err(err, err_len, "interp_run: internal error (out of memory?)");
        return 2;
    }
}
