// One denoising step after the transformer: true-CFG combination with norm rescale, then the
// flow-matching Euler update. The same source is the GPU kernel (compiled at run time by NVRTC,
// src/runtime/nvrtc.rs) and the CPU pipeline's step (compiled on the host by build.rs).
//
// Numerics are those of the reference in float32 (diffusers' QwenImageEditPipeline + its
// FlowMatchEulerDiscreteScheduler), operation by operation: no fused multiply-add (host: built with
// -ffp-contract=off; NVRTC: --fmad=false), sequential sums over the channels, IEEE sqrt and division.
// So the CPU and the GPU compute bit-identical latents from the same velocities.
#ifndef QE_DENOISE_STEP_H
#define QE_DENOISE_STEP_H

#ifdef __CUDACC_RTC__
#define QE_FN __device__ __forceinline__
#define QE_BITS(f) __float_as_uint(f)
#define QE_FLOAT(u) __uint_as_float(u)
#else
#include <math.h>
#include <string.h>
#define QE_FN static inline
static inline unsigned int qe_bits_host(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float qe_float_host(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
#define QE_BITS(f) qe_bits_host(f)
#define QE_FLOAT(u) qe_float_host(u)
#endif

// Element types of the velocity and hidden-state buffers (the engine's IO dtypes).
#define QE_F32 0
#define QE_F16 1
#define QE_BF16 2

QE_FN float qe_f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exp = ((unsigned int)h >> 10) & 0x1fu;
    unsigned int man = (unsigned int)h & 0x3ffu;
    if (exp == 0x1fu) return QE_FLOAT(sign | 0x7f800000u | (man << 13));
    if (exp == 0u) {
        // Zero or subnormal: man * 2^-24 is exact in float32.
        float v = (float)man * 5.9604644775390625e-8f;
        return QE_FLOAT(QE_BITS(v) | sign);
    }
    return QE_FLOAT(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest, ties to even; NaN stays NaN (quiet), overflow goes to infinity.
QE_FN unsigned short qe_f32_to_f16(float f) {
    unsigned int x = QE_BITS(f);
    unsigned int sign = (x & 0x80000000u) >> 16;
    unsigned int exp = x & 0x7f800000u;
    unsigned int man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        unsigned int nan_bit = man == 0u ? 0u : 0x0200u;
        return (unsigned short)(sign | 0x7c00u | nan_bit | (man >> 13));
    }
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (unsigned short)(sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (unsigned short)sign;
        unsigned int m = man | 0x00800000u;
        unsigned int half_man = m >> (14 - half_exp);
        unsigned int round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return (unsigned short)(sign | half_man);
    }
    unsigned int out = sign | ((unsigned int)half_exp << 10) | (man >> 13);
    unsigned int round_bit = 0x1000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) out += 1u;
    return (unsigned short)out;
}

QE_FN float qe_bf16_to_f32(unsigned short h) { return QE_FLOAT((unsigned int)h << 16); }

QE_FN unsigned short qe_f32_to_bf16(float f) {
    unsigned int x = QE_BITS(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);
    unsigned int round_bit = 0x8000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}

QE_FN float qe_load(const void* p, int dtype, long long i) {
    if (dtype == QE_F16) return qe_f16_to_f32(((const unsigned short*)p)[i]);
    if (dtype == QE_BF16) return qe_bf16_to_f32(((const unsigned short*)p)[i]);
    return ((const float*)p)[i];
}

QE_FN void qe_store(void* p, int dtype, long long i, float v) {
    if (dtype == QE_F16) ((unsigned short*)p)[i] = qe_f32_to_f16(v);
    else if (dtype == QE_BF16) ((unsigned short*)p)[i] = qe_f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

// The step for token `tok` of job `j`.
//   velocity [rows, img_seq, channels] (v_dtype): the transformer's output; rows = batch, or
//            2 * batch with true CFG (the cond rows, then the negative rows).
//   x        [batch, seq, channels] float32: the latents, updated in place.
//   hidden   [rows, img_seq, channels] (h_dtype): the transformer's next `hidden_states`; the first
//            `seq` tokens of each row are rewritten from x (both rows of a job with CFG), the
//            condition-image tokens after them are left alone.
//   scales   [batch]: true CFG scales, or null without CFG.
//   dt       sigma_next - sigma, rounded to float32 once (as the scheduler does).
QE_FN void qe_cfg_euler_token(const void* velocity, int v_dtype, float* x, void* hidden, int h_dtype,
                              const float* scales, int batch, int seq, int img_seq, int channels, float dt,
                              long long j, long long tok) {
    long long cond = (j * img_seq + tok) * channels;
    long long neg = ((j + batch) * img_seq + tok) * channels;
    long long xi = (j * seq + tok) * channels;
    float ratio = 1.0f;
    float scale = 0.0f;
    if (scales) {
        // comb = neg + scale * (cond - neg); v = comb * (|cond| / |comb|) (torch.norm over channels).
        scale = scales[j];
        float cond_sq = 0.0f, comb_sq = 0.0f;
        for (int c = 0; c < channels; ++c) {
            float cv = qe_load(velocity, v_dtype, cond + c);
            float nv = qe_load(velocity, v_dtype, neg + c);
            float comb = nv + scale * (cv - nv);
            cond_sq += cv * cv;
            comb_sq += comb * comb;
        }
        ratio = sqrtf(cond_sq) / sqrtf(comb_sq);
    }
    for (int c = 0; c < channels; ++c) {
        float v = qe_load(velocity, v_dtype, cond + c);
        if (scales) {
            float nv = qe_load(velocity, v_dtype, neg + c);
            v = (nv + scale * (v - nv)) * ratio;
        }
        float next = x[xi + c] + dt * v;
        x[xi + c] = next;
        if (hidden) {
            qe_store(hidden, h_dtype, cond + c, next);
            if (scales) qe_store(hidden, h_dtype, neg + c, next);
        }
    }
}

#ifdef __CUDACC_RTC__
// One thread per (job, token) of the generated image.
extern "C" __global__ void qe_cfg_euler(const void* velocity, int v_dtype, float* x, void* hidden, int h_dtype,
                                        const float* scales, int batch, int seq, int img_seq, int channels,
                                        float dt) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)batch * seq) return;
    qe_cfg_euler_token(velocity, v_dtype, x, hidden, h_dtype, scales, batch, seq, img_seq, channels, dt,
                       i / seq, i % seq);
}
#endif

#endif
