// Reductions over f32 buffers: weighted sums of N parts (optionally minus an
// own part: the all-reduce delta) and the finiteness check.

typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// out = sum_k weights[k] * parts[k] (- own, when own is not null).
// parts is a device array of nparts device pointers.
extern "C" __global__ void weighted_sum_f32(float* __restrict__ out, const u64* __restrict__ parts,
                                            const float* __restrict__ weights, unsigned int nparts,
                                            const float* __restrict__ own, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float s = 0.0f;
        for (unsigned int k = 0; k < nparts; ++k) {
            s += weights[k] * ((const float*)parts[k])[i];
        }
        if (own) s -= own[i];
        out[i] = s;
    }
}

// *flag = 1 if any element is NaN or +-inf (flag must be zeroed before).
extern "C" __global__ void all_finite_f32(const float* __restrict__ buf, unsigned int* flag, u64 n) {
    int bad = 0;
    GRID_STRIDE_LOOP(i, n) { bad |= (__float_as_uint(buf[i]) & 0x7fffffffu) >= 0x7f800000u; }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1u;
}
