// fastsoup._cuda: the one torch-aware file. Checks tensors, converts them to raw
// pointers, strides and dtype codes, and calls the plain C launchers of fastsoup_cuda.h on
// the current stream. Layout planning (row layouts, chunking) stays in Python.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <string>
#include <vector>

#include "fastsoup_cuda.h"

// Launcher of csrc/cuda/weighted_sum.cu (plain C, see the comment there).
extern "C" {
int64_t fastsoup_weighted_sum_block_elems(void);
cudaError_t fastsoup_weighted_sum(const int64_t* ptrs, const int64_t* numel,
                                  const int32_t* block_tensor, const int64_t* block_start,
                                  const float* weights, const int32_t* in_codes, int K,
                                  int64_t n_blocks, int out_dtype, cudaStream_t stream);
}

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return FASTSOUP_F32;
        case at::kHalf: return FASTSOUP_F16;
        case at::kBFloat16: return FASTSOUP_BF16;
        default:
            TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
    return -1;
}

fastsoup_row_strides row_strides(const std::vector<int64_t>& s, const char* name) {
    TORCH_CHECK(s.size() == 4, name, ": expected 4 strides (batch, s1, s2, s3), got ", s.size());
    return fastsoup_row_strides{s[0], s[1], s[2], s[3]};
}

void check_cuda(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "fastsoup ", what, " launch failed: ", cudaGetErrorString(err));
}

// Returns the fp32 [B, n_chunks] partial sums (already scaled by 1/D).
at::Tensor per_sample_mse_forward(const at::Tensor& pred, const at::Tensor& target,
                                  const std::vector<int64_t>& sizes,
                                  const std::vector<std::vector<int64_t>>& strides,
                                  bool dense, int64_t chunk, int64_t n_chunks) {
    check_cuda(pred, "pred");
    check_cuda(target, "target");
    TORCH_CHECK(sizes.size() == 3 && strides.size() >= 2, "bad row layout");
    const c10::cuda::CUDAGuard guard(pred.device());
    const int64_t batch = pred.size(0);
    const int64_t numel = sizes[0] * sizes[1] * sizes[2];
    auto partial = at::empty({batch, n_chunks}, pred.options().dtype(at::kFloat));
    check_launch(
        fastsoup_mse_forward(pred.data_ptr(), dtype_code(pred, "pred"), row_strides(strides[0], "pred"),
                             target.data_ptr(), dtype_code(target, "target"),
                             row_strides(strides[1], "target"), partial.data_ptr<float>(), batch,
                             numel, sizes[1], sizes[2], dense ? 1 : 0, chunk, n_chunks,
                             1.0f / static_cast<float>(numel), c10::cuda::getCurrentCUDAStream().stream()),
        "per_sample_mse forward");
    return partial;
}

void per_sample_mse_backward(const at::Tensor& coef, const at::Tensor& pred,
                             const at::Tensor& target, const c10::optional<at::Tensor>& grad_pred,
                             const c10::optional<at::Tensor>& grad_target,
                             const std::vector<int64_t>& sizes,
                             const std::vector<std::vector<int64_t>>& strides, bool dense,
                             int64_t chunk, int64_t n_chunks) {
    check_cuda(pred, "pred");
    check_cuda(target, "target");
    check_cuda(coef, "coef");
    TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.is_contiguous(), "coef must be contiguous float32");
    TORCH_CHECK(sizes.size() == 3 && strides.size() == 4, "bad row layout");
    const c10::cuda::CUDAGuard guard(pred.device());
    const int64_t numel = sizes[0] * sizes[1] * sizes[2];
    void* gp = nullptr;
    void* gt = nullptr;
    if (grad_pred.has_value()) {
        TORCH_CHECK(grad_pred->scalar_type() == pred.scalar_type(), "grad_pred dtype must match pred");
        gp = grad_pred->data_ptr();
    }
    if (grad_target.has_value()) {
        TORCH_CHECK(grad_target->scalar_type() == target.scalar_type(), "grad_target dtype must match target");
        gt = grad_target->data_ptr();
    }
    check_launch(
        fastsoup_mse_backward(pred.data_ptr(), dtype_code(pred, "pred"), row_strides(strides[0], "pred"),
                              target.data_ptr(), dtype_code(target, "target"),
                              row_strides(strides[1], "target"), coef.data_ptr<float>(), gp,
                              row_strides(strides[2], "grad_pred"), gt,
                              row_strides(strides[3], "grad_target"), pred.size(0), numel,
                              sizes[1], sizes[2], dense ? 1 : 0, chunk, n_chunks,
                              c10::cuda::getCurrentCUDAStream().stream()),
        "per_sample_mse backward");
}

// Multi-tensor weighted sum (csrc/cuda/weighted_sum.cu). The tables are built in
// fastsoup/kernels/layout.py: ptrs int64 [P, K+1], numel int64 [P], block_tensor int32
// [n_blocks], block_start int64 [n_blocks], weights fp32 [K], in_codes int32 [K] (each
// input's dtype code, validated by the caller), all on the outputs' device.
void weighted_sum(const at::Tensor& ptrs, const at::Tensor& numel, const at::Tensor& block_tensor,
                  const at::Tensor& block_start, const at::Tensor& weights,
                  const at::Tensor& in_codes, int64_t K, int64_t out_dtype) {
    check_cuda(ptrs, "ptrs");
    TORCH_CHECK(ptrs.scalar_type() == at::kLong && ptrs.is_contiguous() && ptrs.dim() == 2 &&
                    ptrs.size(1) == K + 1, "ptrs must be contiguous int64 [P, K + 1]");
    TORCH_CHECK(numel.scalar_type() == at::kLong && numel.is_contiguous() &&
                    numel.numel() == ptrs.size(0), "numel must be contiguous int64 [P]");
    TORCH_CHECK(block_tensor.scalar_type() == at::kInt && block_tensor.is_contiguous(),
                "block_tensor must be contiguous int32");
    TORCH_CHECK(block_start.scalar_type() == at::kLong && block_start.is_contiguous() &&
                    block_start.numel() == block_tensor.numel(),
                "block_start must be contiguous int64 with one entry per block");
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.numel() == K,
                "weights must be contiguous float32 [K]");
    TORCH_CHECK(in_codes.scalar_type() == at::kInt && in_codes.is_contiguous() && in_codes.numel() == K,
                "in_codes must be contiguous int32 [K]");
    for (const at::Tensor* t : {&numel, &block_tensor, &block_start, &weights, &in_codes})
        TORCH_CHECK(t->device() == ptrs.device(), "weighted_sum tables must share one device");
    TORCH_CHECK(fastsoup_weighted_sum_block_elems() == FASTSOUP_WEIGHTED_SUM_CUDA_BLOCK,
                "weighted_sum block size mismatch between the binding and the kernel");
    const c10::cuda::CUDAGuard guard(ptrs.device());
    check_launch(fastsoup_weighted_sum(ptrs.data_ptr<int64_t>(), numel.data_ptr<int64_t>(),
                                       block_tensor.data_ptr<int32_t>(), block_start.data_ptr<int64_t>(),
                                       weights.data_ptr<float>(), in_codes.data_ptr<int32_t>(),
                                       static_cast<int>(K), block_tensor.numel(),
                                       static_cast<int>(out_dtype),
                                       c10::cuda::getCurrentCUDAStream().stream()),
                 "weighted_sum");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastsoup CUDA kernels";
    m.def("abi", &fastsoup_abi_values,
          "The constants of csrc/include/fastsoup_abi.h this extension was built with");
    m.def("per_sample_mse_forward", &per_sample_mse_forward,
          "Per-sample MSE partial sums [B, n_chunks] (fp32, scaled by 1/D)");
    m.def("per_sample_mse_backward", &per_sample_mse_backward,
          "Write grad_pred and/or grad_target of the per-sample MSE");
    m.def("weighted_sum", &weighted_sum,
          "Multi-tensor weighted sum outs[p] = sum_k w_k inputs[k][p] from device tables, one launch");
}
