// Fused local optimizer updates on flat f32 buffers (twins of src/cpu/optim.rs).

typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

extern "C" __global__ void sgd_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                                   float lr, float mu, float damp, float wd, int nesterov, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float pi = p[i];
        float gi = g[i] + wd * pi;
        float b = mu * buf[i] + damp * gi;
        buf[i] = b;
        float d = nesterov ? gi + mu * b : b;
        p[i] = pi - lr * d;
    }
}

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, float decay, float b1, float b2, float step_size,
                                     float inv_sqrt_bc2, float eps, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float gi = g[i];
        float nm = b1 * m[i] + (1.0f - b1) * gi;
        float nv = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = nm;
        v[i] = nv;
        p[i] = p[i] * decay - step_size * nm / (sqrtf(nv) * inv_sqrt_bc2 + eps);
    }
}

__device__ __forceinline__ float lamb_direction(float p, float m, float v, float inv_bc1, float inv_sqrt_bc2,
                                                float eps, float wd) {
    return m * inv_bc1 / (sqrtf(v) * inv_sqrt_bc2 + eps) + wd * p;
}

__device__ double block_sum_f64(double v, double* shared) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? shared[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) shared[32] = v;
    }
    __syncthreads();
    v = shared[32];
    __syncthreads();
    return v;
}

// Pass 1: moments, plus per-tensor sums of p^2 and u^2 into norms[2t], norms[2t+1]
// (zeroed before). chunks holds (tensor, start, len) triples; one block per chunk.
extern "C" __global__ void lamb_moments_f32(const float* __restrict__ p, const float* __restrict__ g,
                                            float* __restrict__ m, float* __restrict__ v,
                                            const u64* __restrict__ chunks, unsigned int nchunks, float b1,
                                            float b2, float inv_bc1, float inv_sqrt_bc2, float eps, float wd,
                                            double* __restrict__ norms) {
    __shared__ double shared[33];
    for (unsigned int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        u64 t = chunks[3 * c], start = chunks[3 * c + 1], end = start + chunks[3 * c + 2];
        double pp = 0.0, uu = 0.0;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            float gi = g[i], pi = p[i];
            float nm = b1 * m[i] + (1.0f - b1) * gi;
            float nv = b2 * v[i] + (1.0f - b2) * gi * gi;
            m[i] = nm;
            v[i] = nv;
            float u = lamb_direction(pi, nm, nv, inv_bc1, inv_sqrt_bc2, eps, wd);
            pp += (double)(pi * pi);
            uu += (double)(u * u);
        }
        pp = block_sum_f64(pp, shared);
        uu = block_sum_f64(uu, shared);
        if (threadIdx.x == 0) {
            atomicAdd(&norms[2 * t], pp);
            atomicAdd(&norms[2 * t + 1], uu);
        }
    }
}

// Pass 2: p -= lr * trust(t) * u, trust = min(sqrt(pp / uu), max_trust) or 1.
extern "C" __global__ void lamb_apply_f32(float* __restrict__ p, const float* __restrict__ m,
                                          const float* __restrict__ v, const u64* __restrict__ chunks,
                                          unsigned int nchunks, const double* __restrict__ norms, float lr,
                                          float max_trust, float inv_bc1, float inv_sqrt_bc2, float eps, float wd) {
    for (unsigned int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        u64 t = chunks[3 * c], start = chunks[3 * c + 1], end = start + chunks[3 * c + 2];
        double pp = norms[2 * t], uu = norms[2 * t + 1];
        float trust = (pp > 0.0 && uu > 0.0) ? fminf((float)sqrt(pp / uu), max_trust) : 1.0f;
        float lt = lr * trust;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            p[i] -= lt * lamb_direction(p[i], m[i], v[i], inv_bc1, inv_sqrt_bc2, eps, wd);
        }
    }
}
