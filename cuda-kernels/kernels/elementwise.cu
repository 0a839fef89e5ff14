// Elementwise f32 ops: accumulate and scale.
// Compiled at run time by NVRTC (no headers needed). Grid-stride loops with a
// 64-bit element count; launch with any grid size.

typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// acc += alpha * grad
extern "C" __global__ void accumulate_f32(float* __restrict__ acc, const float* __restrict__ grad, float alpha, u64 n) {
    GRID_STRIDE_LOOP(i, n) { acc[i] += alpha * grad[i]; }
}

// buf *= s
extern "C" __global__ void scale_f32(float* __restrict__ buf, float s, u64 n) {
    GRID_STRIDE_LOOP(i, n) { buf[i] *= s; }
}
