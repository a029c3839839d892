// Host entry points of cpp/denoise_step.h: the CPU pipeline's denoising step (the same code the GPU
// kernel runs) and the element conversions, for src/runtime/step.rs.
#include "denoise_step.h"

extern "C" void qe_cfg_euler_host(const void* velocity, int v_dtype, float* x, void* hidden, int h_dtype,
                                  const float* scales, int batch, int seq, int img_seq, int channels, float dt) {
    for (long long j = 0; j < batch; ++j) {
        for (long long tok = 0; tok < seq; ++tok) {
            qe_cfg_euler_token(velocity, v_dtype, x, hidden, h_dtype, scales, batch, seq, img_seq, channels, dt, j, tok);
        }
    }
}

extern "C" unsigned short qe_f32_to_f16_host(float f) { return qe_f32_to_f16(f); }
extern "C" float qe_f16_to_f32_host(unsigned short h) { return qe_f16_to_f32(h); }
extern "C" unsigned short qe_f32_to_bf16_host(float f) { return qe_f32_to_bf16(f); }
extern "C" float qe_bf16_to_f32_host(unsigned short h) { return qe_bf16_to_f32(h); }
