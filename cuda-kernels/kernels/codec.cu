// Wire codecs: fp16, bf16 and blockwise 8-bit. Bit-exact twins of the CPU codecs in
// src/cpu/f16.rs, src/cpu/bf16.rs and src/cpu/q8.rs (fp16 via PTX cvt, so no cuda_fp16.h).

typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

#define F16_MAX 65504.0f
#define Q8_MIN_ABSMAX 7.523164e-37f  // 2^-120, as q8::MIN_ABSMAX

__device__ __forceinline__ bool is_finite_bits(float x) {
    return (__float_as_uint(x) & 0x7fffffffu) < 0x7f800000u;
}

__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Finite values saturate to +-65504; NaN and +-inf pass through.
extern "C" __global__ void encode_f16(const float* __restrict__ src, unsigned short* __restrict__ dst, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float x = src[i];
        if (is_finite_bits(x)) x = fminf(fmaxf(x, -F16_MAX), F16_MAX);
        dst[i] = f32_to_f16_bits(x);
    }
}

extern "C" __global__ void decode_f16(const unsigned short* __restrict__ src, float* __restrict__ dst, u64 n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = f16_bits_to_f32(src[i]); }
}

// acc += w * decode(src)
extern "C" __global__ void decode_acc_f16(const unsigned short* __restrict__ src, float* __restrict__ acc, float w,
                                          u64 n) {
    GRID_STRIDE_LOOP(i, n) { acc[i] += w * f16_bits_to_f32(src[i]); }
}

// bf16 as raw 16-bit patterns (no cuda_bf16.h): bit-exact twin of
// cpu::bf16::encode_one. Round to nearest even; finite values that would round
// to inf saturate to +-0x7f7f (bf16 max); NaN stays NaN (quiet bit set, sign and
// upper payload kept); +-inf pass through.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    unsigned int bits = __float_as_uint(x);
    unsigned int abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x0040u);
    unsigned int rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    if (abs < 0x7f800000u && (rounded & 0x7fffu) == 0x7f80u) rounded -= 1u;
    return (unsigned short)rounded;
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }

extern "C" __global__ void encode_bf16(const float* __restrict__ src, unsigned short* __restrict__ dst, u64 n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = f32_to_bf16_bits(src[i]); }
}

extern "C" __global__ void decode_bf16(const unsigned short* __restrict__ src, float* __restrict__ dst, u64 n) {
    GRID_STRIDE_LOOP(i, n) { dst[i] = bf16_bits_to_f32(src[i]); }
}

// acc += w * decode(src)
extern "C" __global__ void decode_acc_bf16(const unsigned short* __restrict__ src, float* __restrict__ acc, float w,
                                           u64 n) {
    GRID_STRIDE_LOOP(i, n) { acc[i] += w * bf16_bits_to_f32(src[i]); }
}

// Max over the thread block (blockDim.x a multiple of 32, at most 1024).
__device__ unsigned int block_max_u32(unsigned int v, unsigned int* shared) {
    for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? shared[lane] : 0u;
        for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) shared[32] = v;
    }
    __syncthreads();
    v = shared[32];
    __syncthreads();
    return v;
}

// One thread block per quantization block (grid-stride over blocks).
extern "C" __global__ void encode_q8_f32(const float* __restrict__ src, signed char* __restrict__ codes,
                                         float* __restrict__ scales, u64 n, unsigned int block_size) {
    __shared__ unsigned int shared[33];
    u64 nblocks = (n + block_size - 1) / block_size;
    for (u64 b = blockIdx.x; b < nblocks; b += gridDim.x) {
        u64 start = b * block_size;
        u64 end = min(start + block_size, n);
        unsigned int m = 0;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) m = max(m, __float_as_uint(src[i]) & 0x7fffffffu);
        m = block_max_u32(m, shared);
        float absmax = __uint_as_float(m);
        if (m >= 0x7f800000u || absmax < Q8_MIN_ABSMAX) {
            for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) codes[i] = 0;
            if (threadIdx.x == 0) scales[b] = m >= 0x7f800000u ? __uint_as_float(0x7fc00000u) : 0.0f;
            continue;
        }
        float inv = 127.0f / absmax;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            float y = fminf(fmaxf(__fmul_rn(src[i], inv), -127.0f), 127.0f);
            codes[i] = (signed char)(int)__fadd_rn(y, copysignf(0.5f, y));
        }
        if (threadIdx.x == 0) scales[b] = absmax / 127.0f;
    }
}

// dst = decode(codes, scales), or dst += w * decode(...) when accumulate != 0.
extern "C" __global__ void decode_q8_f32(const signed char* __restrict__ codes, const float* __restrict__ scales,
                                         float* __restrict__ dst, float w, int accumulate, u64 n,
                                         unsigned int block_size) {
    u64 nblocks = (n + block_size - 1) / block_size;
    for (u64 b = blockIdx.x; b < nblocks; b += gridDim.x) {
        u64 start = b * block_size;
        u64 end = min(start + block_size, n);
        float s = scales[b];
        if (accumulate) {
            float ws = w * s;
            for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) dst[i] += (float)codes[i] * ws;
        } else {
            for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) dst[i] = (float)codes[i] * s;
        }
    }
}
