// cuda_emu.h: run CUDA C++ kernels on the CPU to test their logic on a machine without a GPU.
//
// Model: a launch runs synchronously. Blocks are spread over CUDA_EMU_WORKERS OS threads (default: cores); the
// threads of one block are cooperative fibers on one OS thread, switched only at __syncthreads() and at warp
// collectives (__syncwarp, __shfl*_sync, __ballot/__any/__all_sync), so barriers behave as on the GPU and a
// barrier that not every live thread reaches (or that threads reach at different call sites) is reported.
// Launch limits of an sm_90 GPU are checked (block <= 1024 threads, z <= 64; grid y, z <= 65535; dynamic shared
// memory <= 48 KiB unless raised by cudaFuncSetAttribute, <= 227 KiB). Shared memory is fresh per block and
// filled with 0xFF bytes (NaN for floats) so reads of unwritten shared memory show.
//   CUDA_EMU_WORKERS=n    OS threads for blocks      CUDA_EMU_ORDER=forward|reverse|random  thread/block order
//   CUDA_EMU_SEED=n       seed for random order      CUDA_EMU_ABORT=1   abort() on an emulator-detected error
// Built with -fsanitize=address, fiber stacks are annotated for ASan (out-of-bounds reads/writes of host buffers);
// with -fsanitize=thread, each CUDA thread is a TSan fiber and only barriers / launch boundaries order them, so
// TSan reports shared- and global-memory races between threads of a block and between blocks.
// Not modelled: warp-synchronous code without *_sync (lanes run one after another), the weak memory model
// (between barriers memory is sequentially consistent), asynchrony of launches and streams, half/bfloat16 types,
// textures, cooperative groups, dynamic parallelism, device/host pointer distinctions.
#pragma once
#define CUDA_EMU 1   // vc_launch.cuh: VC_LAUNCH / VC_SHARED expand to the emulator's launch and shared memory
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_acquire(void *addr);
extern "C" void __tsan_release(void *addr);
extern "C" void AnnotateIgnoreReadsBegin(const char *f, int l);
extern "C" void AnnotateIgnoreReadsEnd(const char *f, int l);
extern "C" void AnnotateIgnoreWritesBegin(const char *f, int l);
extern "C" void AnnotateIgnoreWritesEnd(const char *f, int l);
#define CUDA_EMU_TSAN 1
// the emulator's own bookkeeping is invisible to TSan: only the kernels' memory accesses are checked
#define CUDA_EMU_IGNORE_BEGIN() (AnnotateIgnoreReadsBegin(__FILE__, __LINE__), AnnotateIgnoreWritesBegin(__FILE__, __LINE__))
#define CUDA_EMU_IGNORE_END() (AnnotateIgnoreReadsEnd(__FILE__, __LINE__), AnnotateIgnoreWritesEnd(__FILE__, __LINE__))
#else
#define CUDA_EMU_IGNORE_BEGIN() ((void)0)
#define CUDA_EMU_IGNORE_END() ((void)0)
#endif

// ------------------------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__
// emulate.py rewrites `__shared__ T name[..];` and `extern __shared__ T name[];` into per-block storage; this
// fallback (one copy per OS thread, not poisoned) only catches forms it did not recognise.
#define __shared__ static thread_local

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
#define CUDA_EMU_VEC2(T, N) struct N##2 { T x, y; }; inline N##2 make_##N##2(T a, T b) { return {a, b}; }
#define CUDA_EMU_VEC4(T, N) struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) N##4 { T x, y, z, w; }; \
    inline N##4 make_##N##4(T a, T b, T c, T d) { return {a, b, c, d}; }
CUDA_EMU_VEC2(float, float) CUDA_EMU_VEC4(float, float) CUDA_EMU_VEC2(double, double) CUDA_EMU_VEC4(double, double)
CUDA_EMU_VEC2(int, int) CUDA_EMU_VEC4(int, int)
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------- runtime API
enum cudaError_t {
    cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100, cudaErrorInvalidDevice = 101, cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalAddress = 700, cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
    char name[256]; int major, minor, multiProcessorCount, maxThreadsPerBlock, warpSize;
    size_t sharedMemPerBlock, sharedMemPerBlockOptin; int maxThreadsDim[3], maxGridSize[3];
};

namespace cuda_emu {
constexpr size_t SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN = 227 * 1024, STATIC_SMEM_MAX = 48 * 1024;

inline cudaError_t &last_error() { static thread_local cudaError_t e = cudaSuccess; return e; }
inline cudaError_t set_error(cudaError_t e) { if (e != cudaSuccess && last_error() == cudaSuccess) last_error() = e; return e; }
inline std::vector<std::pair<const void *, size_t>> &func_smem() { static std::vector<std::pair<const void *, size_t>> v; return v; }
inline std::mutex &global_mutex() { static std::mutex m; return m; }
inline std::atomic<long> &error_count() { static std::atomic<long> n{0}; return n; }
inline std::atomic<long> &warning_count() { static std::atomic<long> n{0}; return n; }

inline long env_long(const char *name, long dflt) { const char *s = getenv(name); return s && *s ? atol(s) : dflt; }
inline int order_mode() {   // 0 forward, 1 reverse, 2 random
    const char *s = getenv("CUDA_EMU_ORDER");
    return !s ? 0 : !strcmp(s, "reverse") ? 1 : !strcmp(s, "random") ? 2 : 0;
}
[[gnu::format(printf, 1, 2)]] inline void report(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    std::lock_guard<std::mutex> g(global_mutex());
    fputs("cuda_emu: ", stderr); vfprintf(stderr, fmt, ap); fputc('\n', stderr);
    va_end(ap);
    if (env_long("CUDA_EMU_ABORT", 0)) abort();
}

// ---------------------------------------------------------------------------------------------- context switch
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void **save_sp, void *load_sp);
extern "C" void cuda_emu_trampoline();
asm(R"(
    .text
    .weak cuda_emu_switch
    .hidden cuda_emu_switch
    .type cuda_emu_switch,@function
cuda_emu_switch:
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
    .size cuda_emu_switch, .-cuda_emu_switch
    .weak cuda_emu_trampoline
    .hidden cuda_emu_trampoline
    .type cuda_emu_trampoline,@function
cuda_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cuda_emu_trampoline, .-cuda_emu_trampoline
)");
inline void *make_stack_frame(char *lo, size_t size, void (*fn)(void *), void *arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size - 64) & ~uintptr_t(15);
    uint64_t *f = reinterpret_cast<uint64_t *>(top - 64);
    uint32_t mx; uint16_t cw;
    asm volatile("stmxcsr %0" : "=m"(mx)); asm volatile("fnstcw %0" : "=m"(cw));
    f[0] = uint64_t(mx) | (uint64_t(cw) << 32);
    f[1] = 0; f[2] = 0;                                                         // r15 r14
    f[3] = reinterpret_cast<uint64_t>(fn); f[4] = reinterpret_cast<uint64_t>(arg);  // r13 r12
    f[5] = 0; f[6] = 0;                                                         // rbx rbp
    f[7] = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);
    return f;
}
#else
#error "cuda_emu.h: only x86-64 has a context switch here (add one, or a ucontext fallback)"
#endif

// --------------------------------------------------------------------------------------------------- scheduler
enum State : int { READY, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Thread {
    void *sp = nullptr;
    uint3 tid{};
    std::atomic<int> state{READY};
    std::atomic<const char *> file{nullptr};
    std::atomic<int> line{0};
    std::atomic<unsigned> mask{0};          // warp collective: lanes taking part
    unsigned gen = 0;                       // barrier generation at arrival (TSan sync object parity)
    void *fake_stack = nullptr;             // ASan
    unsigned fiber = 0;                     // stack (and TSan fiber) this thread runs on in the current block
    alignas(16) unsigned char slot[16];     // warp exchange
};

struct Worker;
inline Worker *&tl_worker() { static thread_local Worker *w = nullptr; return w; }

struct Worker {
    // set per launch
    dim3 grid, block;
    void (*body)(void *) = nullptr; void *ctx = nullptr;
    // per block
    uint3 bid{};
    unsigned nthreads = 0;
    std::vector<Thread> th;
    std::vector<char *> stacks;
    std::vector<void *> tsan_fibers;        // one per stack, kept for the launch (stack j always runs fiber j)
    unsigned long long blocks_run = 0;
    size_t stack_size = 0;
    void *sched_sp = nullptr;
    std::atomic<Thread *> cur{nullptr};
    unsigned char *smem = nullptr; size_t smem_cap = 0, dyn_bytes = 0;
    // TSan: every block gets never-used shared memory (TSan keeps no history there), from regions unmapped at the end
    std::vector<std::pair<void *, size_t>> regions; size_t region_used = 0;
    std::atomic<size_t> static_used{0};
    static constexpr int MAX_SHARED_VARS = 64;
    std::atomic<const void *> var_key[MAX_SHARED_VARS];
    std::atomic<size_t> var_off[MAX_SHARED_VARS];
    std::atomic<unsigned> block_gen{0};
    std::vector<unsigned> warp_gen;
    std::atomic<bool> failed{false};
    const void *sched_bottom = nullptr; size_t sched_size = 0; void *sched_fake = nullptr;   // ASan
    void *sched_tsan = nullptr;
    char tsan_block_sync[2], tsan_warp_sync[32][2];
    std::mt19937 rng;

    ~Worker();
};

// Fiber stacks (with a guard page below each) are kept for the next launch.
inline std::vector<std::pair<char *, size_t>> &stack_pool() { static std::vector<std::pair<char *, size_t>> v; return v; }
inline char *take_stack(size_t size) {
    {
        std::lock_guard<std::mutex> g(global_mutex());
        auto &pool = stack_pool();
        for (size_t i = pool.size(); i-- > 0;)
            if (pool[i].second == size) { char *s = pool[i].first; pool.erase(pool.begin() + i); return s; }
    }
    void *p = mmap(nullptr, size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { report("out of memory for fiber stacks"); abort(); }
    mprotect(p, 4096, PROT_NONE);   // guard page: a stack overflow faults
    return static_cast<char *>(p) + 4096;
}
inline Worker::~Worker() {
    std::lock_guard<std::mutex> g(global_mutex());
    for (char *s : stacks) if (s) stack_pool().emplace_back(s, stack_size);
    if (regions.empty()) free(smem);
    for (auto &r : regions) munmap(r.first, r.second);
}

// Called by the fiber: switch to the scheduler and, when resumed, come back.
inline void to_scheduler(Worker &w, Thread &t, bool dying) {
#if CUDA_EMU_TSAN
    __tsan_switch_to_fiber(w.sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &t.fake_stack, w.sched_bottom, w.sched_size);
#endif
    cuda_emu_switch(&t.sp, w.sched_sp);
#if CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(t.fake_stack, &w.sched_bottom, &w.sched_size);
#endif
    (void)dying;
}

inline void fiber_main(void *arg) {
    Worker &w = *static_cast<Worker *>(arg);
    Thread &t = *w.cur.load(std::memory_order_relaxed);
    CUDA_EMU_IGNORE_BEGIN();
#if CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
    void (*body)(void *) = w.body; void *ctx = w.ctx;
    CUDA_EMU_IGNORE_END();
#if CUDA_EMU_TSAN
    __tsan_acquire(ctx);   // what the host wrote before the launch happens before every thread (byte 0 of ctx)
#endif
    body(ctx);
    // the emulator's reads below come before the release, so that everything this thread did happens before the
    // host's next steps; the fiber ends with no ignore left open (TSan fibers are reused)
    CUDA_EMU_IGNORE_BEGIN();
    t.state.store(DONE, std::memory_order_relaxed);
    void *sched_sp = w.sched_sp, **save = &t.sp;
#if CUDA_EMU_TSAN
    void *sched_fiber = w.sched_tsan;
#endif
#if CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, w.sched_bottom, w.sched_size);
#endif
    CUDA_EMU_IGNORE_END();
#if CUDA_EMU_TSAN
    // and every thread happens before what the host does after the launch (byte 1: a separate object, so that a
    // thread starting after another one ended is not ordered after it)
    __tsan_release(static_cast<char *>(ctx) + 1);
    __tsan_switch_to_fiber(sched_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    cuda_emu_switch(save, sched_sp);
    __builtin_trap();
}

inline Thread &self() { return *tl_worker()->cur.load(std::memory_order_relaxed); }

inline void syncthreads(const char *file, int line) {
    Worker &w = *tl_worker(); Thread &t = self();
    CUDA_EMU_IGNORE_BEGIN();
    t.file.store(file, std::memory_order_relaxed); t.line.store(line, std::memory_order_relaxed);
    t.gen = w.block_gen.load(std::memory_order_relaxed);
    unsigned gen = t.gen; (void)gen;
#if CUDA_EMU_TSAN
    __tsan_release(&w.tsan_block_sync[gen & 1]);
#endif
    t.state.store(AT_BLOCK_BARRIER, std::memory_order_relaxed);
    to_scheduler(w, t, false);
#if CUDA_EMU_TSAN
    __tsan_acquire(&w.tsan_block_sync[gen & 1]);
#endif
    CUDA_EMU_IGNORE_END();
}

inline unsigned linear_tid(const Worker &w, const Thread &t) {
    return t.tid.x + w.block.x * (t.tid.y + w.block.y * t.tid.z);
}

inline void warp_barrier(unsigned mask, const char *file, int line) {
    Worker &w = *tl_worker(); Thread &t = self();
    CUDA_EMU_IGNORE_BEGIN();
    unsigned warp = linear_tid(w, t) / 32;
    t.file.store(file, std::memory_order_relaxed); t.line.store(line, std::memory_order_relaxed);
    t.mask.store(mask, std::memory_order_relaxed);
    t.gen = w.warp_gen[warp];
    unsigned gen = t.gen; (void)gen;
#if CUDA_EMU_TSAN
    __tsan_release(&w.tsan_warp_sync[warp % 32][gen & 1]);
#endif
    t.state.store(AT_WARP_BARRIER, std::memory_order_relaxed);
    to_scheduler(w, t, false);
#if CUDA_EMU_TSAN
    __tsan_acquire(&w.tsan_warp_sync[warp % 32][gen & 1]);
#endif
    CUDA_EMU_IGNORE_END();
}

// Runs every thread of the current block to completion; false when the block hung or diverged.
inline bool run_block(Worker &w) {
    const unsigned n = w.nthreads;
    int order = order_mode();
    std::vector<unsigned> seq(n);
    for (unsigned i = 0; i < n; i++) seq[i] = i;
    // thread i runs on stack / TSan fiber (i + rot) % n: a TSan fiber's program order links only the threads that
    // share it, and which threads of consecutive blocks those are changes from block to block
    const unsigned rot = (unsigned)((w.blocks_run++ * 37) % n);
    for (unsigned i = 0; i < n; i++) {
        Thread &t = w.th[i];
        unsigned li = i;
        t.tid = uint3{li % w.block.x, (li / w.block.x) % w.block.y, li / (w.block.x * w.block.y)};
        t.state.store(READY, std::memory_order_relaxed);
        t.fake_stack = nullptr;
        t.fiber = (i + rot) % n;
#if CUDA_EMU_ASAN
        __asan_unpoison_memory_region(w.stacks[t.fiber], w.stack_size);
#endif
        t.sp = make_stack_frame(w.stacks[t.fiber], w.stack_size, &fiber_main, &w);
    }
    for (unsigned k = 0; k < (n + 31) / 32; k++) w.warp_gen[k] = 0;
    w.block_gen.store(0, std::memory_order_relaxed);
    bool ok = true;
    for (;;) {
        if (order == 1) std::reverse(seq.begin(), seq.end());
        else if (order == 2) std::shuffle(seq.begin(), seq.end(), w.rng);
        bool ran = false;
        for (unsigned i : seq) {
            Thread &t = w.th[i];
            if (t.state.load(std::memory_order_relaxed) != READY) continue;
            ran = true;
            w.cur.store(&t, std::memory_order_relaxed);
#if CUDA_EMU_TSAN
            __tsan_switch_to_fiber(w.tsan_fibers[t.fiber], __tsan_switch_to_fiber_no_sync);
#endif
#if CUDA_EMU_ASAN
            __sanitizer_start_switch_fiber(&w.sched_fake, w.stacks[t.fiber], w.stack_size);
#endif
            cuda_emu_switch(&w.sched_sp, t.sp);
#if CUDA_EMU_ASAN
            __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
        }
        (void)ran;
        // every thread now waits at a barrier or is done: release complete warp collectives first
        bool released = false;
        for (unsigned base = 0; base < n; base += 32) {
            unsigned lanes = std::min(32u, n - base), waiting = 0, want = 0;
            for (unsigned l = 0; l < lanes; l++)
                if (w.th[base + l].state.load(std::memory_order_relaxed) == AT_WARP_BARRIER) {
                    waiting |= 1u << l; want |= w.th[base + l].mask.load(std::memory_order_relaxed);
                }
            if (!waiting) continue;
            want &= lanes == 32 ? ~0u : ((1u << lanes) - 1);
            if ((waiting & want) == want) {
                for (unsigned l = 0; l < lanes; l++)
                    if (waiting >> l & 1) w.th[base + l].state.store(READY, std::memory_order_relaxed);
                w.warp_gen[base / 32]++;
                released = true;
            }
        }
        if (released) continue;
        unsigned live = 0, at_block = 0, at_warp = 0; const char *file = nullptr; int line = 0; bool same = true;
        for (unsigned i = 0; i < n; i++) {
            int s = w.th[i].state.load(std::memory_order_relaxed);
            if (s == DONE) continue;
            live++;
            if (s == AT_WARP_BARRIER) { at_warp++; continue; }
            at_block++;
            const char *f = w.th[i].file.load(std::memory_order_relaxed); int l = w.th[i].line.load(std::memory_order_relaxed);
            if (!file) { file = f; line = l; } else if (l != line || strcmp(f, file)) same = false;
        }
        if (live == 0) break;
        if (at_warp) {
            report("block (%u,%u,%u): a warp collective that some lanes of its mask never reach (they exited or wait "
                   "at __syncthreads): the GPU would hang or give undefined results", w.bid.x, w.bid.y, w.bid.z);
            ok = false; break;
        }
        if (!same) {
            report("block (%u,%u,%u): threads wait at different __syncthreads calls (%s:%d and others): undefined on "
                   "the GPU", w.bid.x, w.bid.y, w.bid.z, file, line);
            ok = false; break;
        }
        if (live != n) warning_count()++;   // some threads exited before a barrier the others reach
        for (unsigned i = 0; i < n; i++)
            if (w.th[i].state.load(std::memory_order_relaxed) == AT_BLOCK_BARRIER)
                w.th[i].state.store(READY, std::memory_order_relaxed);
        w.block_gen.fetch_add(1, std::memory_order_relaxed);
    }
    return ok;
}

// ----------------------------------------------------------------------------------------------- shared memory
inline void *shared_storage(const void *key, size_t bytes, size_t align) {
    Worker &w = *tl_worker();
    for (int i = 0; i < Worker::MAX_SHARED_VARS; i++) {
        const void *k = w.var_key[i].load(std::memory_order_relaxed);
        if (k == key) return w.smem + w.var_off[i].load(std::memory_order_relaxed);
        if (k == nullptr) {
            size_t off = (w.static_used.load(std::memory_order_relaxed) + align - 1) / align * align;
            if (off + bytes > STATIC_SMEM_MAX) {
                report("static __shared__ memory over %zu bytes in one block", STATIC_SMEM_MAX);
                abort();
            }
            w.static_used.store(off + bytes, std::memory_order_relaxed);
            w.var_off[i].store(off, std::memory_order_relaxed);
            w.var_key[i].store(key, std::memory_order_relaxed);
            CUDA_EMU_IGNORE_BEGIN();
            memset(w.smem + off, 0xFF, bytes);   // uninitialised shared memory reads as NaN / -1
            CUDA_EMU_IGNORE_END();
            return w.smem + off;
        }
    }
    report("more than %d __shared__ variables", Worker::MAX_SHARED_VARS); abort();
}
template <class A, class Tag = void> A &shared_var() {   // one per Tag (a local type per declaration) and A
    static const char key = 0;
    return *static_cast<A *>(shared_storage(&key, sizeof(A), alignof(A) < 16 ? 16 : alignof(A)));
}
inline void *dynamic_shared() { Worker &w = *tl_worker(); return w.smem + STATIC_SMEM_MAX; }

// ------------------------------------------------------------------------------------------------------ launch
inline size_t func_dynamic_limit(const void *f) {
    std::lock_guard<std::mutex> g(global_mutex());
    for (auto &p : func_smem()) if (p.first == f) return p.second;
    return SMEM_DEFAULT;
}

inline cudaError_t run_grid(const void *fn, dim3 grid, dim3 block, size_t smem, void (*body)(void *), void *ctx) {
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
        (unsigned long long)block.x * block.y * block.z > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return set_error(cudaErrorInvalidConfiguration);
    if (smem > func_dynamic_limit(fn)) return set_error(cudaErrorInvalidValue);
    const unsigned nthreads = block.x * block.y * block.z;
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    int nworkers = (int)env_long("CUDA_EMU_WORKERS", (long)std::max(1u, std::thread::hardware_concurrency()));
#if CUDA_EMU_TSAN
    __tsan_release(ctx);
#endif
    nworkers = (int)std::max(1ull, std::min<unsigned long long>(nworkers, nblocks));
    const int order = order_mode();
    const long seed = env_long("CUDA_EMU_SEED", 1);
    std::vector<unsigned long long> perm;
    if (order != 0) {
        perm.resize(nblocks);
        for (unsigned long long i = 0; i < nblocks; i++) perm[i] = i;
        if (order == 1) std::reverse(perm.begin(), perm.end());
        else { std::mt19937_64 r(seed); std::shuffle(perm.begin(), perm.end(), r); }
    }
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    const size_t stack_size = (size_t)env_long("CUDA_EMU_STACK", 256 * 1024);
    auto work = [&](int wi) {
      CUDA_EMU_IGNORE_BEGIN();
      {
        Worker w;
        tl_worker() = &w;
        w.grid = grid; w.block = block; w.body = body; w.ctx = ctx; w.nthreads = nthreads;
        w.rng.seed((unsigned)(seed * 7919 + wi));
        w.th = std::vector<Thread>(nthreads);
        w.stack_size = stack_size;
        w.stacks.assign(nthreads, nullptr);
        for (unsigned i = 0; i < nthreads; i++) w.stacks[i] = take_stack(stack_size);
        w.smem_cap = STATIC_SMEM_MAX + smem;
#if !CUDA_EMU_TSAN
        w.smem = static_cast<unsigned char *>(malloc(w.smem_cap));
#endif
        w.dyn_bytes = smem;
        w.warp_gen.assign((nthreads + 31) / 32, 0);
#if CUDA_EMU_TSAN
        w.sched_tsan = __tsan_get_current_fiber();
        for (unsigned i = 0; i < nthreads; i++) w.tsan_fibers.push_back(__tsan_create_fiber(0));
#endif
        for (;;) {
            unsigned long long k = next.fetch_add(1);
            if (k >= nblocks || failed.load()) break;
            if (!perm.empty()) k = perm[k];
            w.bid = uint3{unsigned(k % grid.x), unsigned((k / grid.x) % grid.y), unsigned(k / ((unsigned long long)grid.x * grid.y))};
#if CUDA_EMU_TSAN
            const size_t slice = (w.smem_cap + 4095) & ~size_t(4095);
            if (w.regions.empty() || w.region_used + slice > w.regions.back().second) {
                size_t bytes = std::max<size_t>(slice, size_t(256) << 20);
                void *r = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
                if (r == MAP_FAILED) { report("out of address space for shared memory"); abort(); }
                w.regions.emplace_back(r, bytes); w.region_used = 0;
            }
            w.smem = static_cast<unsigned char *>(w.regions.back().first) + w.region_used;
            w.region_used += slice;
#endif
            memset(w.smem + STATIC_SMEM_MAX, 0xFF, smem);   // dynamic shared memory: NaN / -1 until written
            w.static_used.store(0, std::memory_order_relaxed);
            for (auto &k2 : w.var_key) k2.store(nullptr, std::memory_order_relaxed);
            if (!run_block(w)) { failed = true; break; }
            size_t total = w.static_used.load(std::memory_order_relaxed) + smem;
            if (total > func_dynamic_limit(fn) && total > SMEM_DEFAULT) {
                report("static (%zu) + dynamic (%zu) shared memory exceeds the block's limit", total - smem, smem);
                failed = true; break;
            }
        }
#if CUDA_EMU_TSAN
        __tsan_acquire(static_cast<char *>(ctx) + 1);
        for (void *f : w.tsan_fibers) __tsan_destroy_fiber(f);
#endif
        tl_worker() = nullptr;
      }
      CUDA_EMU_IGNORE_END();
    };
    (void)order;
    if (nworkers == 1) work(0);
    else {
        std::vector<std::thread> ts;
        for (int i = 0; i < nworkers; i++) ts.emplace_back(work, i);
        for (auto &t : ts) t.join();
    }
#if CUDA_EMU_TSAN
    __tsan_acquire(static_cast<char *>(ctx) + 1);
#endif
    if (failed) { error_count()++; return set_error(cudaErrorLaunchFailure); }
    return cudaSuccess;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten (emulate.py) into
// `::cuda_emu::Launch(grid, block, smem, stream)(kernel)(args...)`.
template <class... P> struct Bound {
    void (*kernel)(P...); dim3 grid, block; size_t smem;
    template <class... A> void operator()(A &&...a) const {
        struct Ctx { char tsan_launch, tsan_done; void (*k)(P...); std::tuple<std::decay_t<P>...> args; };
        Ctx c{0, 0, kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
        run_grid(reinterpret_cast<const void *>(kernel), grid, block, smem,
                 [](void *p) {
                     Ctx &c = *static_cast<Ctx *>(p);
                     auto copy = c.args;   // each CUDA thread has its own copy of the parameters
                     std::apply(c.k, copy);
                 }, &c);
    }
};
struct Launch {
    dim3 grid, block; size_t smem;
    Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
    template <class... P> Bound<P...> operator()(void (*k)(P...)) const { return Bound<P...>{k, grid, block, smem}; }
};
}  // namespace cuda_emu

// --------------------------------------------------------------------------------------------- device builtins
#define threadIdx (::cuda_emu::self().tid)
#define blockIdx (::cuda_emu::tl_worker()->bid)
#define blockDim (::cuda_emu::tl_worker()->block)
#define gridDim (::cuda_emu::tl_worker()->grid)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::warp_barrier(::cuda_emu::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)

namespace cuda_emu {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
template <class T, class Src> T shfl(unsigned mask, T v, Src src, int width) {
    static_assert(sizeof(T) <= 16, "");
    Worker &w = *tl_worker(); Thread &t = self();
    unsigned lt = linear_tid(w, t), lane = lt % 32, base = lt - lane;
    CUDA_EMU_IGNORE_BEGIN();
    memcpy(t.slot, &v, sizeof(T));
    CUDA_EMU_IGNORE_END();
    warp_barrier(mask, __FILE__, __LINE__);
    unsigned seg = lane / width * width;
    int s = src((int)(lane - seg));
    T r = v;
    CUDA_EMU_IGNORE_BEGIN();
    if (s >= 0 && s < width && base + seg + s < w.nthreads) {
        if (!(mask >> (seg + s) & 1)) { report("__shfl_sync reads lane %u outside the mask", seg + s); }
        memcpy(&r, w.th[base + seg + s].slot, sizeof(T));
    }
    CUDA_EMU_IGNORE_END();
    warp_barrier(mask, __FILE__, __LINE__);
    return r;
}
inline unsigned vote(unsigned mask, bool p) {
    Worker &w = *tl_worker(); Thread &t = self();
    unsigned lt = linear_tid(w, t), base = lt - lt % 32;
    CUDA_EMU_IGNORE_BEGIN();
    t.slot[0] = p;
    CUDA_EMU_IGNORE_END();
    warp_barrier(mask, __FILE__, __LINE__);
    unsigned bits = 0;
    CUDA_EMU_IGNORE_BEGIN();
    for (unsigned l = 0; l < 32 && base + l < w.nthreads; l++)
        if ((mask >> l & 1) && w.th[base + l].slot[0]) bits |= 1u << l;
    CUDA_EMU_IGNORE_END();
    warp_barrier(mask, __FILE__, __LINE__);
    return bits;
}
template <class T> inline T atomic_rmw(T *p, T v, int op) {   // 0 add, 1 max, 2 min, 3 exch
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    U *q = reinterpret_cast<U *>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED), nw;
    for (;;) {
        T o; memcpy(&o, &old, sizeof(T));
        T n = op == 0 ? T(o + v) : op == 1 ? (o < v ? v : o) : op == 2 ? (v < o ? v : o) : v;
        memcpy(&nw, &n, sizeof(T));
        if (__atomic_compare_exchange_n(q, &old, nw, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
    }
}
}  // namespace cuda_emu

template <class T> inline T __shfl_sync(unsigned m, T v, int src, int width = 32) {
    return ::cuda_emu::shfl(m, v, [=](int) { return src % width; }, width);
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) {
    return ::cuda_emu::shfl(m, v, [=](int l) { return l + (int)d < width ? l + (int)d : l; }, width);
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) {
    return ::cuda_emu::shfl(m, v, [=](int l) { return l - (int)d >= 0 ? l - (int)d : l; }, width);
}
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int x, int width = 32) {
    return ::cuda_emu::shfl(m, v, [=](int l) { return (l ^ x) < width ? (l ^ x) : l; }, width);
}
inline unsigned __ballot_sync(unsigned m, int p) { return ::cuda_emu::vote(m, p != 0); }
inline int __any_sync(unsigned m, int p) { return ::cuda_emu::vote(m, p != 0) != 0; }
inline int __all_sync(unsigned m, int p) { return (::cuda_emu::vote(m, p != 0) & m) == (m & ::cuda_emu::vote(m, true)); }
template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline T atomicAdd(T *p, T v) { return ::cuda_emu::atomic_rmw(p, v, 0); }
template <class T> inline T atomicMax(T *p, T v) { return ::cuda_emu::atomic_rmw(p, v, 1); }
template <class T> inline T atomicMin(T *p, T v) { return ::cuda_emu::atomic_rmw(p, v, 2); }
template <class T> inline T atomicExch(T *p, T v) { return ::cuda_emu::atomic_rmw(p, v, 3); }
template <class T> inline T atomicCAS(T *p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); return cmp;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return expf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline double rsqrt(double a) { return 1.0 / sqrt(a); }
template <class A, class B> inline auto min(A a, B b) -> std::common_type_t<A, B> { return b < a ? b : a; }
template <class A, class B> inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }

// -------------------------------------------------------------------------------------------- host runtime calls
inline cudaError_t cudaGetLastError() { cudaError_t e = ::cuda_emu::last_error(); ::cuda_emu::last_error() = cudaSuccess; return e; }
inline cudaError_t cudaPeekAtLastError() { return ::cuda_emu::last_error(); }
inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure (cuda_emu: see its report on stderr)";
    }
    return "unknown error";
}
inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : ::cuda_emu::set_error(cudaErrorInvalidDevice); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// device memory starts as NaN (all bits set), as shared memory does: a kernel reading what nobody wrote shows
inline cudaError_t cudaMalloc(void **p, size_t n) {
    *p = malloc(n ? n : 1);
    if (*p) memset(*p, 0xff, n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T> inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc(reinterpret_cast<void **>(p), n); }
inline cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
// launches are synchronous here, so the stream-ordered allocator is the plain one
inline cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFreeAsync(void *p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) { memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) { memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemset(void *d, int v, size_t n) { memset(d, v, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t = nullptr) { memset(d, v, n); return cudaSuccess; }
template <class T> inline cudaError_t cudaMemcpyToSymbol(T &sym, const void *s, size_t n, size_t off = 0,
                                                         cudaMemcpyKind = cudaMemcpyHostToDevice) {
    memcpy(reinterpret_cast<char *>(&sym) + off, s, n); return cudaSuccess;
}
template <class F> inline cudaError_t cudaFuncSetAttribute(F *f, cudaFuncAttribute a, int v) {
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || (size_t)v > ::cuda_emu::SMEM_OPTIN)
        return ::cuda_emu::set_error(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> g(::cuda_emu::global_mutex());
    ::cuda_emu::func_smem().emplace_back(reinterpret_cast<const void *>(f), (size_t)v);
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p); strcpy(p->name, "cuda_emu (sm_90 limits)");
    p->major = 9; p->minor = 0; p->multiProcessorCount = 132; p->maxThreadsPerBlock = 1024; p->warpSize = 32;
    p->sharedMemPerBlock = ::cuda_emu::SMEM_DEFAULT; p->sharedMemPerBlockOptin = ::cuda_emu::SMEM_OPTIN;
    p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
    return cudaSuccess;
}
// emulator statistics for test harnesses
extern "C" __attribute__((weak, visibility("default"))) long cuda_emu_errors() { return ::cuda_emu::error_count().load(); }
extern "C" __attribute__((weak, visibility("default"))) long cuda_emu_exited_before_barrier() { return ::cuda_emu::warning_count().load(); }
