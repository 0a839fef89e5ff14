// Elementwise f32 ops: accumulate (plain and with a fused finiteness check) and scale.
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

// acc += alpha * grad, and in the same pass *flags |= 1 if any grad element is
// NaN/+-inf, |= 2 if any updated acc element is (flags zeroed before). Twin of
// cpu::accumulate_checked.
extern "C" __global__ void accumulate_checked_f32(float* __restrict__ acc, const float* __restrict__ grad, float alpha,
                                                  unsigned int* flags, u64 n) {
    int bad_grad = 0, bad_acc = 0;
    GRID_STRIDE_LOOP(i, n) {
        float g = grad[i];
        float r = acc[i] + alpha * g;
        acc[i] = r;
        bad_grad |= (__float_as_uint(g) & 0x7fffffffu) >= 0x7f800000u;
        bad_acc |= (__float_as_uint(r) & 0x7fffffffu) >= 0x7f800000u;
    }
    int any_grad = __syncthreads_or(bad_grad);
    int any_acc = __syncthreads_or(bad_acc);
    if (threadIdx.x == 0 && (any_grad || any_acc)) atomicOr(flags, (any_grad ? 1u : 0u) | (any_acc ? 2u : 0u));
}
