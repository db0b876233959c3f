// The two CUDA constructs that are not C++, written as macros so the same source compiles with nvcc and with the
// CPU emulator (cuda_plugin/emulator/: g++ with cuda_emu.h, which defines CUDA_EMU):
//   VC_LAUNCH(kernel, grid, block, smem, stream)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   VC_SHARED(T, name, [N])                                  __shared__ T name[N];   (static shared memory)
//   VC_DYNAMIC_SHARED(T, name)                               extern __shared__ T name[];   (the launch's smem)
// A kernel whose template arguments hold a comma needs parentheses around it: VC_LAUNCH((k<A, B>), ...).
#pragma once

#if defined(__CUDACC__)
#define VC_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define VC_SHARED(T, name, dims) __shared__ T name dims
#define VC_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#elif defined(CUDA_EMU)
#define VC_LAUNCH(kernel, grid, block, smem, stream) ::cuda_emu::Launch(grid, block, smem, stream)(kernel)
// one block-wide variable per declaration: the local tag type makes it distinct per kernel and instantiation
#define VC_SHARED(T, name, dims)                                                                                  \
    struct vc_shared_tag_##name {};                                                                               \
    auto &name = ::cuda_emu::shared_var<T dims, vc_shared_tag_##name>()
#define VC_DYNAMIC_SHARED(T, name) T *name = static_cast<T *>(::cuda_emu::dynamic_shared())
#else
#error "vc_launch.cuh: compile with nvcc, or with the CPU emulator (cuda_plugin/emulator)"
#endif
