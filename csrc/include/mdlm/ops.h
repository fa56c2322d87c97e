// Host launcher declarations shared by bindings.cpp, the CPU twins (csrc/cpu) and the CUDA
// launchers (csrc/cuda). CUDA launchers take the stream as an opaque pointer and return the
// cudaError_t as an int (0 = success), so bindings.cpp needs neither CUDA headers nor exceptions
// from device code.
#pragma once

#include <cstdint>

#include "mdlm/common.h"
#include "mdlm/masking.h"
#include "mdlm/sampling.h"

namespace mdlm {

// ---- CPU (always built) ----------------------------------------------------------------------
// out: rows x cols row-major, dtype kFloat64 (uniform53) or kFloat32 (uniform24). offset_ptr: one int64
// added to `offset` mod 2^64 when the kernel runs (philox.h, DEVICE-SIDE OFFSET), or nullptr.
void philox_uniform_cpu(void* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset,
                        int out_dtype, const int64_t* offset_ptr);
void philox4x32_cpu(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);
// Forward masking (mdlm/masking.h): x0, xt rows x cols row-major, dtype kInt64 or kInt32;
// t_in (rows,) float32 or nullptr (draw t in the kernel); t_out, sigma, weight, move_chance (rows,)
// float32; row_counts (rows,) int32 (masked positions per row).
void forward_mask_cpu(const void* x0, void* xt, int x_dtype, const float* t_in, float* t_out, float* sigma,
                      float* weight, float* move_chance, int32_t* row_counts, int64_t rows, int64_t cols,
                      uint64_t seed, uint64_t offset, int64_t mask_index, const MaskParams& params);
// Fused categorical sampling step (mdlm/sampling.h): logits rows x vocab row-major, dtype kFloat32 or
// kBFloat16 (raw bf16 bits); t, s (rows,) float32 (may be nullptr when params.greedy); row_ids (rows,)
// int64 Philox row words or nullptr (row i); tokens (rows,) int64 out; conf (rows, 3) float32 out;
// params.offset_ptr: the device-side offset (one int64 next to the logits) or nullptr.
// loads: (rows,) int64 out or nullptr: the number of logits each row's sampling read (tests).
void sample_step_cpu(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params, int64_t* loads = nullptr);
// Test hook: the keep threshold kappa of each row (top-k / top-p passes; 0 = keep all); keys (rows,).
void sample_threshold_cpu(const void* logits, int dtype, int64_t rows, const SampleParams& params, uint32_t* keys);
// Test hook: the chunk choice of the inverse CDF (mdlm/sampling.h pick_chunk); returns the chunk, *tau out.
int64_t sample_pick_chunk_cpu(const double* G, const double* S, const float* M, int64_t ng, int64_t nc, float m,
                              double inv_t, double target, double* tau);
// Test hook: header transcendentals on host (fn 0 = log64, 1 = exp64, 2 = expf32, 3 = exp_weight, 4 = weight32).
void sample_math_cpu(int fn, const double* in, double* out, int64_t n);

#if MDLM_WITH_CUDA
// ---- CUDA (built when nvcc is found) ---------------------------------------------------------
int philox_uniform_cuda(void* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset,
                        int out_dtype, const int64_t* offset_ptr, void* stream);
int forward_mask_cuda(const void* x0, void* xt, int x_dtype, const float* t_in, float* t_out, float* sigma,
                      float* weight, float* move_chance, int32_t* row_counts, int64_t rows, int64_t cols,
                      uint64_t seed, uint64_t offset, int64_t mask_index, const MaskParams& params, void* stream);
int sample_step_cuda(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params, void* stream);
// Runtime helpers (csrc/cuda/runtime.cu): never throw.
int cuda_device_count(int* count);           // returns the cudaError_t of cudaGetDeviceCount
const char* cuda_error_string(int code);     // cudaGetErrorString
int cuda_versions(int* driver, int* runtime);  // cudaDriverGetVersion (0: no driver), cudaRuntimeGetVersion
// cudaFuncGetAttributes of a probe kernel built with the extension's -gencode flags, on `device`: 0 when the
// runtime can load the extension's kernels there, else the cudaError_t (no image for the device's arch, PTX
// newer than the driver, ...). The current device is restored.
int cuda_image_check(int device);
#endif

}  // namespace mdlm
