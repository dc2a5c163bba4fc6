// The CUDA built-ins the kernels use, for compiling them with g++ and running
// them on the CPU (tests/backends/test_cuda_kernels.py, marker cuda_host).
//
// Execution model: the blocks of a grid run one after another; the threads of
// a block are coroutines (ucontext) on one CPU thread. Each runs until it
// reaches __syncthreads() or returns; once every thread of the block is
// waiting at the barrier, all continue. So a block behaves as CUDA specifies
// at every barrier, `__shared__` (a function-local static) is the one block's
// shared memory, and a barrier that some thread of the block never reaches is
// reported as an error instead of hanging. Threads run in index order, or in
// reverse order when asked, so a missing barrier shows as a changed result.
// Only what the kernels use is mapped; a kernel that uses something else
// fails to compile here, which is the signal to extend this header.
#pragma once
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline double __longlong_as_double(long long i) {
    double d;
    memcpy(&d, &i, sizeof d);
    return d;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
// CUDA's floating-point min/max are fmin/fmax: a NaN operand yields the other operand.
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }

namespace bogc_host {

enum { RUNNING = 0, AT_BARRIER = 1, DONE = 2 };
constexpr size_t kStack = 1 << 16;

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    int state = DONE;
};

static ucontext_t g_scheduler;
static std::vector<Fiber> g_fibers;
static int g_current = 0;
static const std::function<void()>* g_body = nullptr;

static void run_thread(int t) {
    (*g_body)();
    g_fibers[t].state = DONE;  // uc_link returns to the scheduler
}

// Runs one block; 0 on success, 1 when a barrier is not reached by every thread.
static int run_block(unsigned int threads, bool reverse) {
    if (g_fibers.size() < threads) g_fibers.resize(threads);
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = g_fibers[t];
        if (f.stack.empty()) f.stack.resize(kStack);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &g_scheduler;
        makecontext(&f.ctx, reinterpret_cast<void (*)()>(run_thread), 1, (int)t);
        f.state = RUNNING;
    }
    for (;;) {
        for (unsigned int k = 0; k < threads; ++k) {
            int t = reverse ? (int)(threads - 1 - k) : (int)k;
            if (g_fibers[t].state != RUNNING) continue;
            g_current = t;
            threadIdx.x = (unsigned int)t;
            swapcontext(&g_scheduler, &g_fibers[t].ctx);
        }
        unsigned int waiting = 0;
        for (unsigned int t = 0; t < threads; ++t) waiting += g_fibers[t].state == AT_BARRIER;
        if (waiting == 0) return 0;
        if (waiting != threads) return 1;  // some thread returned without reaching the barrier
        for (unsigned int t = 0; t < threads; ++t) g_fibers[t].state = RUNNING;
    }
}

// Runs a 1-D grid of `grid` blocks of `block` threads, each calling `body`.
static int launch(unsigned int grid, unsigned int block, bool reverse,
                  const std::function<void()>& body) {
    g_body = &body;
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        if (run_block(block, reverse)) return 1;
    }
    return 0;
}

}  // namespace bogc_host

inline void __syncthreads() {
    bogc_host::Fiber& f = bogc_host::g_fibers[bogc_host::g_current];
    f.state = bogc_host::AT_BARRIER;
    swapcontext(&f.ctx, &bogc_host::g_scheduler);
}
