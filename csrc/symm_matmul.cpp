// CPU implementation of linft::symm_matmul (schema in linft.cpp).
#include <torch/library.h>

#include <algorithm>

#include "linft.h"

namespace linft {

at::Tensor symm_matmul_cpu(const at::Tensor& A, const at::Tensor& X, int64_t tile) {
  check_matmul_inputs(A, X, tile);
  TORCH_CHECK(A.device().is_cpu(), "linft::symm_matmul (CPU): A must be a CPU tensor");
  const at::Tensor a = A.contiguous();
  const at::Tensor x = X.contiguous();
  at::Tensor y = at::zeros_like(x);
  const int64_t n = a.size(0);
  if (n == 0 || x.size(1) == 0) return y;
  // Tile-by-tile so each A_IJ is still in cache when it is applied a second time (transposed);
  // a whole row stripe of A would not be for large n.
  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t ni = std::min(tile, n - i0);
    at::Tensor yi = y.narrow(0, i0, ni);
    const at::Tensor xi = x.narrow(0, i0, ni);
    const at::Tensor stripe = a.narrow(0, i0, ni);
    yi.addmm_(stripe.narrow(1, i0, ni), xi);
    for (int64_t j0 = i0 + ni; j0 < n; j0 += tile) {
      const int64_t nj = std::min(tile, n - j0);
      const at::Tensor aij = stripe.narrow(1, j0, nj);
      yi.addmm_(aij, x.narrow(0, j0, nj));
      y.narrow(0, j0, nj).addmm_(aij.t(), xi);
    }
  }
  return y;
}

}  // namespace linft

TORCH_LIBRARY_IMPL(linft, CPU, m) { m.impl("symm_matmul", &linft::symm_matmul_cpu); }
