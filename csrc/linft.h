// Shared declarations of the linft C++ ops (registered in linft.cpp under TORCH_LIBRARY(linft)).
#pragma once

#include <ATen/ATen.h>

namespace linft {

// Y = A @ X for symmetric A, reading only the tiles of A on or above the diagonal: each
// off-diagonal tile A_IJ (I < J) is applied to both sides, Y_I += A_IJ X_J and
// Y_J += A_IJ^T X_I, so A is streamed from memory once instead of twice per tile pair.
at::Tensor symm_matmul_cpu(const at::Tensor& A, const at::Tensor& X, int64_t tile);

// Orthonormal basis of the part of span(W) orthogonal to span(V) (V orthonormal, may have zero
// columns): two block Gram-Schmidt passes, then CholeskyQR2 with a fp64 Gram matrix, falling
// back to Householder QR that drops the directions at rounding level (rank-deficient W).
at::Tensor orthonormalize(const at::Tensor& W, const at::Tensor& V, double drop_tol);

// Rayleigh-Ritz on span(V) with AV = A V: eigenpairs of H = V^T A V (fp64, symmetrised).
// Returns (theta [k] fp64, U = V S [n, k], AU = AV S [n, k], max |theta| over all Ritz values).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rayleigh_ritz(
    const at::Tensor& V, const at::Tensor& AV, int64_t k, bool largest);

inline void check_matmul_inputs(const at::Tensor& A, const at::Tensor& X, int64_t tile) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == A.size(1),
              "linft::symm_matmul: A must be a square matrix [n, n], got ", A.sizes());
  TORCH_CHECK(X.dim() == 2 && X.size(0) == A.size(0),
              "linft::symm_matmul: X must be [n, m] with n = ", A.size(0), ", got ", X.sizes());
  TORCH_CHECK(A.scalar_type() == X.scalar_type(),
              "linft::symm_matmul: A and X must have the same dtype, got ", A.scalar_type(),
              " and ", X.scalar_type(), "; cast one of them");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "linft::symm_matmul: float32 or float64 only, got ", A.scalar_type());
  TORCH_CHECK(A.device() == X.device(), "linft::symm_matmul: A and X on different devices");
  TORCH_CHECK(tile > 0, "linft::symm_matmul: tile must be positive, got ", tile);
}

}  // namespace linft
