// The one pybind11 file of mdlm_kernels._C. PRIVATE: this module is the implementation detail of
// mdlm_kernels (its ops in mdlm_kernels/ops/*.py are the API); its functions take raw addresses and may
// change between versions. Framework-free: Python passes, for every buffer, its address AND its size in
// bytes (a `Buf` = (address, nbytes) tuple), plus sizes, dtype codes and the CUDA stream (int).
//
// Buffer bounds: before any kernel runs, every access a call makes is checked here against the sizes it
// received: a buffer the call reads or writes must be non-null, aligned to its element size and hold at
// least the bytes the call accesses (e.g. rows * cols * itemsize); an optional buffer is (0, 0). So a
// short buffer is an error, never an out-of-bounds read or write. (The binding cannot know whether an
// address really owns the bytes it is said to hold: the Python callers pass each tensor's own
// numel() * element_size().)
//
// Errors:
//   std::invalid_argument -> ValueError   (bad sizes / dtype codes / buffers, validated here)
//   std::runtime_error    -> RuntimeError (CUDA errors; mdlm_kernels re-raises as KernelError)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mdlm/masking.h"
#include "mdlm/ops.h"
#include "mdlm/philox.h"
#include "mdlm/sampling.h"

namespace py = pybind11;

#ifndef MDLM_CUDA_ARCHS
#define MDLM_CUDA_ARCHS ""
#endif

namespace {

constexpr int64_t kMaxDim = int64_t(0xFFFFFFFF);  // row/col indices are uint32 counter words

void check_sizes(const char* op, int64_t rows, int64_t cols, int64_t elem_size) {
  if (rows < 0 || cols < 0) {
    throw std::invalid_argument(std::string(op) + ": rows and cols must be >= 0, got rows=" +
                                std::to_string(rows) + ", cols=" + std::to_string(cols));
  }
  if (rows > kMaxDim || cols > kMaxDim) {
    throw std::invalid_argument(std::string(op) + ": rows and cols must be < 2^32 (they are uint32 " +
                                "Philox counter words), got rows=" + std::to_string(rows) +
                                ", cols=" + std::to_string(cols));
  }
  if (cols != 0 && rows > std::numeric_limits<int64_t>::max() / elem_size / cols) {
    throw std::invalid_argument(std::string(op) + ": rows*cols*itemsize overflows int64 (rows=" +
                                std::to_string(rows) + ", cols=" + std::to_string(cols) + ")");
  }
}

int64_t uniform_elem_size(const char* op, int dtype) {
  if (dtype == mdlm::kFloat64) return 8;
  if (dtype == mdlm::kFloat32) return 4;
  throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) + " (" +
                              mdlm::dtype_name(dtype) + "); supported: 0 (float32), 3 (float64)");
}

// A buffer argument: (address, size in bytes). (0, 0) = none.
using Buf = std::pair<std::uintptr_t, int64_t>;
const Buf kNoBuf{0, 0};

std::string op_arg(const char* op, const char* name) { return std::string(op) + ": " + name; }

// rows * cols * elem_size, or an error naming `what` when it overflows int64.
int64_t checked_bytes(const char* op, const char* what, int64_t rows, int64_t cols, int64_t elem_size) {
  if (rows < 0 || cols < 0) {
    throw std::invalid_argument(op_arg(op, what) + ": sizes must be >= 0, got " + std::to_string(rows) + " x " +
                                std::to_string(cols));
  }
  if (cols != 0 && rows > std::numeric_limits<int64_t>::max() / elem_size / cols) {
    throw std::invalid_argument(op_arg(op, what) + ": " + std::to_string(rows) + " x " + std::to_string(cols) +
                                " x " + std::to_string(elem_size) + " bytes overflows int64");
  }
  return rows * cols * elem_size;
}

// The address of buffer `name` after checking that it can hold the `need` bytes the call accesses (elements
// of `align` bytes). need == 0: the buffer is not accessed (any address, even 0). Never dereferences it.
void* buffer(const char* op, const char* name, const Buf& b, int64_t need, int64_t align) {
  const std::uintptr_t p = b.first;
  const int64_t nbytes = b.second;
  if (nbytes < 0) {
    throw std::invalid_argument(op_arg(op, name) + ": buffer size must be >= 0 bytes, got " + std::to_string(nbytes));
  }
  if (p > std::numeric_limits<std::uintptr_t>::max() - static_cast<std::uintptr_t>(nbytes)) {
    throw std::invalid_argument(op_arg(op, name) + ": address + size overflows");
  }
  if (need <= 0) return reinterpret_cast<void*>(p);
  if (p == 0) throw std::invalid_argument(op_arg(op, name) + ": null data pointer");
  if (p % static_cast<std::uintptr_t>(align) != 0) {
    throw std::invalid_argument(op_arg(op, name) + ": address " + std::to_string(p) + " is not aligned to its " +
                                std::to_string(align) + "-byte elements");
  }
  if (nbytes < need) {
    throw std::invalid_argument(op_arg(op, name) + ": the buffer holds " + std::to_string(nbytes) +
                                " bytes but the call accesses " + std::to_string(need) + " bytes");
  }
  return reinterpret_cast<void*>(p);
}

// An optional buffer: (0, 0) = none (returns nullptr), else as buffer() with `need` bytes.
void* optional_buffer(const char* op, const char* name, const Buf& b, int64_t need, int64_t align) {
  if (b.first == 0) {
    if (b.second != 0) {
      throw std::invalid_argument(op_arg(op, name) + ": a null address must come with size 0 (no buffer), got " +
                                  std::to_string(b.second) + " bytes");
    }
    return nullptr;
  }
  return buffer(op, name, b, need, align);
}

// The device-side Philox offset (philox.h, DEVICE-SIDE OFFSET): (0, 0) = none, else one int64 (8 bytes,
// 8-byte aligned) in the memory of the op's data; only the kernel dereferences it.
const int64_t* offset_buffer(const char* op, const Buf& b) {
  if (b.first != 0 && b.first % alignof(int64_t) != 0) {
    throw std::invalid_argument(std::string(op) + ": offset_buf must be the 8-byte aligned address of an int64, got " +
                                std::to_string(b.first));
  }
  return static_cast<const int64_t*>(optional_buffer(op, "offset_buf", b, 8, 8));
}

#if MDLM_WITH_CUDA
[[noreturn]] void throw_cuda(const char* op, int code) {
  throw std::runtime_error(std::string("mdlm_kernels CUDA error in ") + op + ": " + mdlm::cuda_error_string(code) +
                           " (code " + std::to_string(code) + ")");
}

void check_cuda(const char* op, int code) {
  if (code != 0) throw_cuda(op, code);
}

// Refuse to launch when the runtime sees no device (no driver, no GPU): a clear error instead of
// whatever the launch would do.
void require_device(const char* op) {
  int count = 0;
  int err = mdlm::cuda_device_count(&count);
  if (count <= 0) {
    throw std::runtime_error(std::string("mdlm_kernels CUDA error in ") + op +
                             ": no CUDA device available (cudaGetDeviceCount: " + mdlm::cuda_error_string(err) +
                             ", code " + std::to_string(err) + ")");
  }
}
#else
[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(std::string("mdlm_kernels: ") + op +
                           " is unavailable: the extension was built without CUDA (nvcc was not found at "
                           "build time or MDLM_SKIP_CUDA=1); rebuild with nvcc on PATH or CUDA_HOME set");
}
#endif

std::array<uint32_t, 4> philox4x32(const std::vector<uint64_t>& ctr, const std::vector<uint64_t>& key) {
  if (ctr.size() != 4 || key.size() != 2) {
    throw std::invalid_argument("philox4x32: need 4 counter words and 2 key words, got " +
                                std::to_string(ctr.size()) + " and " + std::to_string(key.size()));
  }
  uint32_t c[4], k[2], out[4];
  for (int i = 0; i < 4; ++i) {
    if (ctr[i] > 0xFFFFFFFFull) throw std::invalid_argument("philox4x32: counter words must be in [0, 2^32)");
    c[i] = static_cast<uint32_t>(ctr[i]);
  }
  for (int i = 0; i < 2; ++i) {
    if (key[i] > 0xFFFFFFFFull) throw std::invalid_argument("philox4x32: key words must be in [0, 2^32)");
    k[i] = static_cast<uint32_t>(key[i]);
  }
  mdlm::philox4x32_cpu(c, k, out);
  return {out[0], out[1], out[2], out[3]};
}

void philox_uniform_cpu(const Buf& out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, int dtype,
                        const Buf& offset_buf) {
  const char* op = "philox_uniform_cpu";
  const int64_t es = uniform_elem_size(op, dtype);
  check_sizes(op, rows, cols, es);
  void* p = buffer(op, "out", out, checked_bytes(op, "out", rows, cols, es), es);
  const int64_t* off = offset_buffer(op, offset_buf);
  if (rows * cols == 0) return;
  py::gil_scoped_release release;
  mdlm::philox_uniform_cpu(p, rows, cols, seed, offset, dtype, off);
}

void philox_uniform_cuda(const Buf& out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, int dtype,
                         std::uintptr_t stream, const Buf& offset_buf) {
  const char* op = "philox_uniform_cuda";
  const int64_t es = uniform_elem_size(op, dtype);
  check_sizes(op, rows, cols, es);
  void* p = buffer(op, "out", out, checked_bytes(op, "out", rows, cols, es), es);
  const int64_t* off = offset_buffer(op, offset_buf);
#if MDLM_WITH_CUDA
  if (rows * cols == 0) return;
  require_device(op);
  int err;
  {
    py::gil_scoped_release release;
    err = mdlm::philox_uniform_cuda(p, rows, cols, seed, offset, dtype, off, reinterpret_cast<void*>(stream));
  }
  check_cuda(op, err);
#else
  (void)p;
  (void)seed;
  (void)offset;
  (void)off;
  (void)stream;
  no_cuda(op);
#endif
}

// ---- forward masking ---------------------------------------------------------------------------
struct MaskCall {
  const void* x0;
  void* xt;
  const float* t_in;
  float *t_out, *sigma, *weight, *move_chance;
  int32_t* row_counts;
  mdlm::MaskParams params;
};

void check_finite(const char* op, const char* name, double v) {
  if (!std::isfinite(v)) throw std::invalid_argument(std::string(op) + ": " + name + " must be finite, got " +
                                                     std::to_string(v));
}

MaskCall check_forward_mask(const char* op, const Buf& x0, const Buf& xt, int dtype, const Buf& t_in,
                            const Buf& t_out, const Buf& sigma, const Buf& weight, const Buf& move_chance,
                            const Buf& row_counts, int64_t rows, int64_t cols, int64_t mask_index, int schedule,
                            double eps, double sigma_min, double sigma_max, double sampling_eps, bool antithetic) {
  int64_t elem_size;
  int64_t max_index;
  if (dtype == mdlm::kInt64) {
    elem_size = 8;
    max_index = std::numeric_limits<int64_t>::max();
  } else if (dtype == mdlm::kInt32) {
    elem_size = 4;
    max_index = std::numeric_limits<int32_t>::max();
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) + " (" +
                                mdlm::dtype_name(dtype) + "); supported: 4 (int64), 5 (int32)");
  }
  check_sizes(op, rows, cols, elem_size);
  if (cols > int64_t(std::numeric_limits<int32_t>::max())) {
    throw std::invalid_argument(std::string(op) + ": cols must be < 2^31 (row_counts is int32), got " +
                                std::to_string(cols));
  }
  if (mask_index < 0 || mask_index > max_index) {
    throw std::invalid_argument(std::string(op) + ": mask_index must be in [0, " + std::to_string(max_index) +
                                "] for " + mdlm::dtype_name(dtype) + ", got " + std::to_string(mask_index));
  }
  if (schedule < 0 || schedule >= mdlm::kNumSchedules) {
    throw std::invalid_argument(std::string(op) + ": unknown schedule code " + std::to_string(schedule));
  }
  if (!(sampling_eps >= 0.0 && sampling_eps < 1.0)) {
    throw std::invalid_argument(std::string(op) + ": sampling_eps must be in [0, 1), got " +
                                std::to_string(sampling_eps));
  }
  // the schedule's parameters (mdlm_kernels/ops/masking.py checks the same): no NaN or negative weight
  check_finite(op, "eps", eps);
  check_finite(op, "sigma_min", sigma_min);
  check_finite(op, "sigma_max", sigma_max);
  if (schedule == mdlm::kLinear && !(0.0 <= sigma_min && sigma_min < sigma_max)) {
    throw std::invalid_argument(std::string(op) + ": the linear schedule needs 0 <= sigma_min < sigma_max, got " +
                                std::to_string(sigma_min) + ", " + std::to_string(sigma_max));
  }
  if (schedule == mdlm::kGeometric && !(0.0 < sigma_min && sigma_min < sigma_max)) {
    throw std::invalid_argument(std::string(op) + ": the geometric schedule needs 0 < sigma_min < sigma_max, got " +
                                std::to_string(sigma_min) + ", " + std::to_string(sigma_max));
  }
  if (schedule != mdlm::kLinear && schedule != mdlm::kGeometric && !(eps >= 0.0 && eps < 1.0)) {
    throw std::invalid_argument(std::string(op) + ": eps must be in [0, 1) for the " + mdlm::schedule_name(schedule) +
                                " schedule, got " + std::to_string(eps));
  }
  const int64_t tokens = checked_bytes(op, "x0", rows, cols, elem_size);
  const int64_t row_f32 = checked_bytes(op, "t_out", rows, 1, 4);
  MaskCall c;
  c.x0 = buffer(op, "x0", x0, tokens, elem_size);
  c.xt = buffer(op, "xt", xt, tokens, elem_size);
  c.t_in = static_cast<const float*>(optional_buffer(op, "t_in", t_in, row_f32, 4));  // none: draw t in the kernel
  c.t_out = static_cast<float*>(buffer(op, "t_out", t_out, row_f32, 4));
  c.sigma = static_cast<float*>(buffer(op, "sigma", sigma, row_f32, 4));
  c.weight = static_cast<float*>(buffer(op, "weight", weight, row_f32, 4));
  c.move_chance = static_cast<float*>(buffer(op, "move_chance", move_chance, row_f32, 4));
  c.row_counts = static_cast<int32_t*>(buffer(op, "row_counts", row_counts, row_f32, 4));
  c.params = mdlm::MaskParams{schedule, eps, sigma_min, sigma_max, sampling_eps, antithetic ? 1 : 0};
  return c;
}

void forward_mask_cpu(const Buf& x0, const Buf& xt, int dtype, const Buf& t_in, const Buf& t_out, const Buf& sigma,
                      const Buf& weight, const Buf& move_chance, const Buf& row_counts, int64_t rows, int64_t cols,
                      uint64_t seed, uint64_t offset, int64_t mask_index, int schedule, double eps, double sigma_min,
                      double sigma_max, double sampling_eps, bool antithetic) {
  const char* op = "forward_mask_cpu";
  const MaskCall c = check_forward_mask(op, x0, xt, dtype, t_in, t_out, sigma, weight, move_chance, row_counts, rows,
                                        cols, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps,
                                        antithetic);
  if (rows == 0) return;
  py::gil_scoped_release release;
  mdlm::forward_mask_cpu(c.x0, c.xt, dtype, c.t_in, c.t_out, c.sigma, c.weight, c.move_chance, c.row_counts, rows,
                         cols, seed, offset, mask_index, c.params);
}

void forward_mask_cuda(const Buf& x0, const Buf& xt, int dtype, const Buf& t_in, const Buf& t_out, const Buf& sigma,
                       const Buf& weight, const Buf& move_chance, const Buf& row_counts, int64_t rows, int64_t cols,
                       uint64_t seed, uint64_t offset, int64_t mask_index, int schedule, double eps, double sigma_min,
                       double sigma_max, double sampling_eps, bool antithetic, std::uintptr_t stream) {
  const char* op = "forward_mask_cuda";
  const MaskCall c = check_forward_mask(op, x0, xt, dtype, t_in, t_out, sigma, weight, move_chance, row_counts, rows,
                                        cols, mask_index, schedule, eps, sigma_min, sigma_max, sampling_eps,
                                        antithetic);
#if MDLM_WITH_CUDA
  if (rows == 0) return;
  require_device(op);
  int err;
  {
    py::gil_scoped_release release;
    err = mdlm::forward_mask_cuda(c.x0, c.xt, dtype, c.t_in, c.t_out, c.sigma, c.weight, c.move_chance, c.row_counts,
                                  rows, cols, seed, offset, mask_index, c.params, reinterpret_cast<void*>(stream));
  }
  check_cuda(op, err);
#else
  (void)c;
  (void)seed;
  (void)offset;
  (void)stream;
  no_cuda(op);
#endif
}

// ---- fused categorical sampling step -------------------------------------------------------------
struct SampleCall {
  const void* logits;
  const float *t, *s;
  const int64_t* row_ids;
  int64_t* tokens;
  float* conf;
  mdlm::SampleParams params;
};

// The scalar arguments and the logits of a sampling call (shared by sample_step_* and sample_threshold_cpu).
int64_t check_sample_scalars(const char* op, int dtype, int64_t rows, int64_t vocab, int64_t mask_index,
                             double temperature, int64_t top_k, double top_p) {
  int64_t elem_size;
  if (dtype == mdlm::kFloat32) {
    elem_size = 4;
  } else if (dtype == mdlm::kBFloat16) {
    elem_size = 2;
  } else {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) + " (" +
                                mdlm::dtype_name(dtype) + "); supported: 0 (float32), 1 (bfloat16)");
  }
  if (rows < 0) throw std::invalid_argument(std::string(op) + ": rows must be >= 0, got " + std::to_string(rows));
  if (vocab < 2 || vocab > mdlm::kMaxVocab) {
    throw std::invalid_argument(std::string(op) + ": vocab must be in [2, " + std::to_string(mdlm::kMaxVocab) +
                                "] (the kernel's chunk tables), got " + std::to_string(vocab));
  }
  if (rows > std::numeric_limits<int64_t>::max() / elem_size / vocab) {
    throw std::invalid_argument(std::string(op) + ": rows*vocab*itemsize overflows int64");
  }
  if (mask_index < 0 || mask_index >= vocab) {
    throw std::invalid_argument(std::string(op) + ": mask_index must be in [0, vocab=" + std::to_string(vocab) +
                                "), got " + std::to_string(mask_index));
  }
  if (!(temperature >= 1e-30 && temperature <= 1e30)) {
    throw std::invalid_argument(std::string(op) + ": temperature must be in [1e-30, 1e30], got " +
                                std::to_string(temperature));
  }
  if (top_k < 0) throw std::invalid_argument(std::string(op) + ": top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    throw std::invalid_argument(std::string(op) + ": top_p must be in (0, 1], got " + std::to_string(top_p));
  }
  return elem_size;
}

SampleCall check_sample_step(const char* op, const Buf& logits, int dtype, const Buf& t, const Buf& s,
                             const Buf& row_ids, const Buf& tokens, const Buf& conf, int64_t rows, int64_t vocab,
                             uint64_t seed, uint64_t offset, int64_t mask_index, double temperature, int64_t top_k,
                             double top_p, bool greedy, const Buf& offset_buf) {
  const int64_t es = check_sample_scalars(op, dtype, rows, vocab, mask_index, temperature, top_k, top_p);
  const int64_t row_f32 = checked_bytes(op, "t", rows, 1, 4);
  const int64_t row_i64 = checked_bytes(op, "tokens", rows, 1, 8);
  SampleCall c;
  c.logits = buffer(op, "logits", logits, checked_bytes(op, "logits", rows, vocab, es), es);
  if (greedy) {  // t and s are not read: they may be (0, 0)
    c.t = static_cast<const float*>(optional_buffer(op, "t", t, row_f32, 4));
    c.s = static_cast<const float*>(optional_buffer(op, "s", s, row_f32, 4));
  } else {
    c.t = static_cast<const float*>(buffer(op, "t", t, row_f32, 4));
    c.s = static_cast<const float*>(buffer(op, "s", s, row_f32, 4));
  }
  c.row_ids = static_cast<const int64_t*>(optional_buffer(op, "row_ids", row_ids, row_i64, 8));  // none: row i
  c.tokens = static_cast<int64_t*>(buffer(op, "tokens", tokens, row_i64, 8));
  c.conf = static_cast<float*>(buffer(op, "conf", conf, checked_bytes(op, "conf", rows, 3, 4), 4));
  c.params = mdlm::SampleParams{vocab, mask_index, 1.0 / temperature, top_k, top_p, greedy ? 1 : 0, seed, offset,
                                offset_buffer(op, offset_buf)};
  return c;
}

void sample_step_cpu(const Buf& logits, int dtype, const Buf& t, const Buf& s, const Buf& row_ids, const Buf& tokens,
                     const Buf& conf, int64_t rows, int64_t vocab, uint64_t seed, uint64_t offset, int64_t mask_index,
                     double temperature, int64_t top_k, double top_p, bool greedy, const Buf& offset_buf,
                     const Buf& loads, bool entropy) {
  const char* op = "sample_step_cpu";
  SampleCall c = check_sample_step(op, logits, dtype, t, s, row_ids, tokens, conf, rows, vocab, seed, offset,
                                   mask_index, temperature, top_k, top_p, greedy, offset_buf);
  c.params.entropy = entropy ? 1 : 0;
  // none: do not count
  int64_t* l = static_cast<int64_t*>(optional_buffer(op, "loads", loads, checked_bytes(op, "loads", rows, 1, 8), 8));
  if (rows == 0) return;
  py::gil_scoped_release release;
  mdlm::sample_step_cpu(c.logits, dtype, c.t, c.s, c.row_ids, c.tokens, c.conf, rows, c.params, l);
}

void sample_step_cuda(const Buf& logits, int dtype, const Buf& t, const Buf& s, const Buf& row_ids, const Buf& tokens,
                      const Buf& conf, int64_t rows, int64_t vocab, uint64_t seed, uint64_t offset, int64_t mask_index,
                      double temperature, int64_t top_k, double top_p, bool greedy, std::uintptr_t stream,
                      const Buf& offset_buf, bool entropy) {
  const char* op = "sample_step_cuda";
  SampleCall c = check_sample_step(op, logits, dtype, t, s, row_ids, tokens, conf, rows, vocab, seed, offset,
                                   mask_index, temperature, top_k, top_p, greedy, offset_buf);
  c.params.entropy = entropy ? 1 : 0;
#if MDLM_WITH_CUDA
  if (rows == 0) return;
  require_device(op);
  int err;
  {
    py::gil_scoped_release release;
    err = mdlm::sample_step_cuda(c.logits, dtype, c.t, c.s, c.row_ids, c.tokens, c.conf, rows, c.params,
                                 reinterpret_cast<void*>(stream));
  }
  check_cuda(op, err);
#else
  (void)c;
  (void)stream;
  no_cuda(op);
#endif
}

// The keep threshold of each row (tests): keys (rows,) uint32 as int64 host buffer.
void sample_threshold_cpu(const Buf& logits, int dtype, const Buf& keys, int64_t rows, int64_t vocab,
                          int64_t mask_index, double temperature, int64_t top_k, double top_p) {
  const char* op = "sample_threshold_cpu";
  const int64_t es = check_sample_scalars(op, dtype, rows, vocab, mask_index, temperature, top_k, top_p);
  const void* x = buffer(op, "logits", logits, checked_bytes(op, "logits", rows, vocab, es), es);
  int64_t* out = static_cast<int64_t*>(buffer(op, "keys", keys, checked_bytes(op, "keys", rows, 1, 8), 8));
  const mdlm::SampleParams params{vocab, mask_index, 1.0 / temperature, top_k, top_p, 1, 0, 0, nullptr};
  std::vector<uint32_t> k(static_cast<size_t>(rows));
  {
    py::gil_scoped_release release;
    mdlm::sample_threshold_cpu(x, dtype, rows, params, k.data());
  }
  for (int64_t i = 0; i < rows; ++i) out[i] = static_cast<int64_t>(k[static_cast<size_t>(i)]);
}

// The chunk choice of the inverse CDF (tests): G (ng + 1), S (ng * 32) float64, M (nc) float32 host buffers.
py::tuple sample_pick_chunk(const Buf& G, const Buf& S, const Buf& M, int64_t ng, int64_t nc, float m, double inv_t,
                            double target) {
  const char* op = "sample_pick_chunk";
  if (ng < 1 || nc < 1 || nc > ng * mdlm::kWarpLanes || ng * mdlm::kWarpLanes - nc >= mdlm::kWarpLanes) {
    throw std::invalid_argument("sample_pick_chunk: need 1 <= nc, ng = ceil(nc / 32)");
  }
  const double* pg = static_cast<const double*>(buffer(op, "G", G, checked_bytes(op, "G", ng + 1, 1, 8), 8));
  const double* ps =
      static_cast<const double*>(buffer(op, "S", S, checked_bytes(op, "S", ng * mdlm::kWarpLanes, 1, 8), 8));
  const float* pm = static_cast<const float*>(buffer(op, "M", M, checked_bytes(op, "M", nc, 1, 4), 4));
  double tau = 0.0;
  const int64_t c = mdlm::sample_pick_chunk_cpu(pg, ps, pm, ng, nc, m, inv_t, target, &tau);
  return py::make_tuple(c, tau);
}

// Header transcendentals on the host (tests): fn 0 = log64, 1 = exp64, 2 = expf32, 3 = exp_weight, 4 = weight32.
void sample_math(int fn, const Buf& in, const Buf& out, int64_t n) {
  const char* op = "sample_math";
  if (n < 0) throw std::invalid_argument("sample_math: n must be >= 0");
  if (fn < 0 || fn > 4) {
    throw std::invalid_argument(
        "sample_math: fn must be 0 (log64), 1 (exp64), 2 (expf32), 3 (exp_weight) or 4 (weight32)");
  }
  const int64_t bytes = checked_bytes(op, "in", n, 1, 8);
  const double* pin = static_cast<const double*>(buffer(op, "in", in, bytes, 8));
  double* pout = static_cast<double*>(buffer(op, "out", out, bytes, 8));
  py::gil_scoped_release release;
  mdlm::sample_math_cpu(fn, pin, pout, n);
}

int cuda_device_count() {
#if MDLM_WITH_CUDA
  int count = 0;
  mdlm::cuda_device_count(&count);
  return count;
#else
  return 0;
#endif
}

// (driver version, runtime version) as CUDA encodes them (1000 * major + 10 * minor); (0, 0) without CUDA.
std::pair<int, int> cuda_versions() {
#if MDLM_WITH_CUDA
  int driver = 0, runtime = 0;
  mdlm::cuda_versions(&driver, &runtime);
  return {driver, runtime};
#else
  return {0, 0};
#endif
}

// "" when the extension's kernels can be loaded on `device`, else the CUDA runtime's reason.
std::string cuda_image_error(int device) {
#if MDLM_WITH_CUDA
  int code = mdlm::cuda_image_check(device);
  if (code == 0) return "";
  return std::string(mdlm::cuda_error_string(code)) + " (code " + std::to_string(code) + ")";
#else
  (void)device;
  return "the extension was built without CUDA";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "mdlm-kernels compiled extension (framework-free C++/CUDA). PRIVATE: the implementation detail of "
      "mdlm_kernels; call the ops (mdlm_kernels.forward_mask, sample_step, philox_uniform, or torch.ops.mdlm.*), "
      "not this module: its functions take raw addresses and may change between versions. Every buffer argument "
      "is an (address, nbytes) tuple ((0, 0) = none); each access is checked against nbytes before a kernel runs "
      "(ValueError naming the buffer), but the module cannot know whether an address owns the bytes it is said to "
      "hold.";
  const auto none = py::make_tuple(0, 0);
  m.def("philox4x32", &philox4x32, py::arg("ctr"), py::arg("key"),
        "Philox4x32-10 of one block: 4 counter words, 2 key words -> 4 words (known-answer tests).");
  m.def("uniform53", [](uint32_t w0, uint32_t w1) { return mdlm::uniform53(w0, w1); }, py::arg("w0"), py::arg("w1"),
        "Header helper uniform53 (host instantiation), for tests.");
  m.def("uniform24", [](uint32_t w) { return static_cast<double>(mdlm::uniform24(w)); }, py::arg("w"),
        "Header helper uniform24 (host instantiation, returned widened to double), for tests.");
  m.def("philox_uniform_cpu", &philox_uniform_cpu, py::arg("out"), py::arg("rows"), py::arg("cols"),
        py::arg("seed"), py::arg("offset"), py::arg("dtype_code"), py::arg("offset_buf") = none,
        "Fill a (rows, cols) row-major host buffer `out` = (address, nbytes) with Philox uniforms in (0, 1). "
        "offset_buf: (0, 0), or (address, 8) of one int64 the kernel adds to offset (mod 2^64) when it runs.");
  m.def("philox_uniform_cuda", &philox_uniform_cuda, py::arg("out"), py::arg("rows"), py::arg("cols"),
        py::arg("seed"), py::arg("offset"), py::arg("dtype_code"), py::arg("stream"), py::arg("offset_buf") = none,
        "Same as philox_uniform_cpu on a device buffer, launched on `stream` (cudaStream_t as int); offset_buf "
        "((0, 0) or a device buffer) is read by the kernel.");
  m.def("forward_mask_cpu", &forward_mask_cpu, py::arg("x0"), py::arg("xt"), py::arg("dtype_code"),
        py::arg("t_in"), py::arg("t_out"), py::arg("sigma"), py::arg("weight"), py::arg("move_chance"),
        py::arg("row_counts"), py::arg("rows"), py::arg("cols"), py::arg("seed"), py::arg("offset"),
        py::arg("mask_index"), py::arg("schedule"), py::arg("eps"), py::arg("sigma_min"), py::arg("sigma_max"),
        py::arg("sampling_eps"), py::arg("antithetic"),
        "Forward masking (mdlm/masking.h) on host buffers, each (address, nbytes): x0, xt (rows, cols) of "
        "dtype_code; t_in (rows,) float32 or (0, 0) to draw t per row in the kernel; t_out, sigma, weight, "
        "move_chance (rows,) float32; row_counts (rows,) int32.");
  m.def("forward_mask_cuda", &forward_mask_cuda, py::arg("x0"), py::arg("xt"), py::arg("dtype_code"),
        py::arg("t_in"), py::arg("t_out"), py::arg("sigma"), py::arg("weight"), py::arg("move_chance"),
        py::arg("row_counts"), py::arg("rows"), py::arg("cols"), py::arg("seed"), py::arg("offset"),
        py::arg("mask_index"), py::arg("schedule"), py::arg("eps"), py::arg("sigma_min"), py::arg("sigma_max"),
        py::arg("sampling_eps"), py::arg("antithetic"), py::arg("stream"),
        "Same as forward_mask_cpu on device buffers, launched on `stream` (cudaStream_t as int).");
  m.def("sample_step_cpu", &sample_step_cpu, py::arg("logits"), py::arg("dtype_code"), py::arg("t"), py::arg("s"),
        py::arg("row_ids"), py::arg("tokens"), py::arg("conf"), py::arg("rows"), py::arg("vocab"), py::arg("seed"),
        py::arg("offset"), py::arg("mask_index"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("greedy"), py::arg("offset_buf") = none, py::arg("loads") = none, py::arg("entropy") = true,
        "Fused categorical sampling step (mdlm/sampling.h) on host buffers, each (address, nbytes): logits "
        "(rows, vocab) of dtype_code; t, s (rows,) float32 ((0, 0) allowed when greedy); row_ids (rows,) int64 "
        "or (0, 0) for row i; tokens (rows,) int64 out; conf (rows, 3) float32 out; offset_buf: (0, 0), or one "
        "int64 the kernel adds to offset (mod 2^64) when it runs; loads: (0, 0), or (rows,) int64 receiving how "
        "many logits each row's sampling read (tests); entropy false: conf[:, 2] is NaN (not computed).");
  m.def("sample_step_cuda", &sample_step_cuda, py::arg("logits"), py::arg("dtype_code"), py::arg("t"), py::arg("s"),
        py::arg("row_ids"), py::arg("tokens"), py::arg("conf"), py::arg("rows"), py::arg("vocab"), py::arg("seed"),
        py::arg("offset"), py::arg("mask_index"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("greedy"), py::arg("stream"), py::arg("offset_buf") = none, py::arg("entropy") = true,
        "Same as sample_step_cpu on device buffers, launched on `stream` (cudaStream_t as int); offset_buf "
        "((0, 0) or a device buffer) is read by the kernel.");
  m.def("sample_threshold_cpu", &sample_threshold_cpu, py::arg("logits"), py::arg("dtype_code"), py::arg("keys"),
        py::arg("rows"), py::arg("vocab"), py::arg("mask_index"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"),
        "Keep threshold (uint32 key of mdlm/sampling.h, 0 = keep all) of each row into keys, an (rows,) int64 "
        "host buffer (address, nbytes) (tests).");
  m.def("sample_pick_chunk", &sample_pick_chunk, py::arg("G"), py::arg("S"), py::arg("M"), py::arg("ng"),
        py::arg("nc"), py::arg("row_max"), py::arg("inv_t"), py::arg("target"),
        "The inverse CDF's chunk choice of mdlm/sampling.h (pick_chunk) on host buffers (address, nbytes): G "
        "(ng + 1) and S (ng * 32) float64, M (nc) float32 (tests): (chunk, tau).");
  m.def("sample_math", &sample_math, py::arg("fn"), py::arg("in"), py::arg("out"), py::arg("n"),
        "Header transcendentals of mdlm/sampling.h on float64 host buffers (address, nbytes) of n elements "
        "(tests): 0 log64, 1 exp64, 2 expf32, 3 exp_weight, 4 weight32 (the per-element weight: weight32(d, 0, 1)).");
  m.attr("SCHEDULE_CODES") = py::dict(py::arg("loglinear") = int(mdlm::kLogLinear), py::arg("linear") = int(mdlm::kLinear),
                                      py::arg("geometric") = int(mdlm::kGeometric), py::arg("cosine") = int(mdlm::kCosine),
                                      py::arg("cosinesqr") = int(mdlm::kCosineSqr));
  m.def("cuda_compiled", []() { return MDLM_WITH_CUDA != 0; }, "True when the CUDA sources were compiled in.");
  m.def("cuda_archs", []() { return std::string(MDLM_CUDA_ARCHS); }, "CUDA archs compiled for ('' if none).");
  m.def("cuda_device_count", &cuda_device_count, "cudaGetDeviceCount, or 0 (never raises) without driver/GPU.");
  m.def("cuda_versions", &cuda_versions, "(cudaDriverGetVersion, cudaRuntimeGetVersion); 0 = none. Never raises.");
  m.def("cuda_image_error", &cuda_image_error, py::arg("device"),
        "'' if the runtime can load the extension's kernels on this device, else why not. Never raises.");
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(mdlm::kFloat32), py::arg("bfloat16") = int(mdlm::kBFloat16),
                                   py::arg("float16") = int(mdlm::kFloat16), py::arg("float64") = int(mdlm::kFloat64),
                                   py::arg("int64") = int(mdlm::kInt64), py::arg("int32") = int(mdlm::kInt32));
}
