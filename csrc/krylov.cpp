// Orthonormalisation and Rayleigh-Ritz steps of the block Krylov eigensolver (linft/eig.py).
//
// Written against ATen only, so one composite implementation serves every device: the sizes
// involved are [n, b] blocks and [b, b] projected matrices, whose cost is in BLAS/LAPACK calls;
// doing the branching here saves the Python overhead between those calls.
#include <algorithm>
#include <torch/library.h>

#include <limits>

#include "linft.h"

namespace linft {
namespace {

at::Tensor project_out(const at::Tensor& W, const at::Tensor& V) {
  if (V.size(1) == 0) return W;
  return W - V.mm(V.t().mm(W));
}

double unit_roundoff(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::epsilon()
                          : static_cast<double>(std::numeric_limits<float>::epsilon());
}

// CholeskyQR with the Gram matrix formed and factored in fp64. Returns an undefined tensor when
// W is too ill-conditioned for it (the caller then uses Householder QR).
at::Tensor cholesky_qr(const at::Tensor& W, double min_diag, double max_cond) {
  const at::Tensor wd = W.to(at::kDouble);
  const at::Tensor gram = wd.t().mm(wd);
  auto [L, info] = at::linalg_cholesky_ex(gram);
  if (info.item<int64_t>() != 0) return at::Tensor();
  const at::Tensor d = L.diagonal();
  const double dmin = d.min().item<double>();
  const double dmax = d.max().item<double>();
  if (!(dmin > min_diag) || dmax > max_cond * dmin) return at::Tensor();
  // Q = W L^{-T}: a triangular solve on the right, X L^T = W.
  const at::Tensor q = at::linalg_solve_triangular(L.t(), wd, /*upper=*/true, /*left=*/false);
  return q.to(W.scalar_type());
}

at::Tensor householder_drop(const at::Tensor& W, const at::Tensor& V, double min_diag) {
  auto [Q, R] = at::linalg_qr(W, "reduced");
  const at::Tensor keep = R.diagonal().abs().gt(min_diag).nonzero().view(-1);
  at::Tensor q = Q.index_select(1, keep);
  // Dividing by small R_ii amplifies what was left of span(V): keep the columns that are
  // mostly new after projecting once more, and re-orthonormalize them; twice, since the
  // re-orthonormalization divides again.
  for (int pass = 0; pass < 2; ++pass) {
    q = project_out(q, V);
    const at::Tensor fresh = at::linalg_vector_norm(q, 2, {0}).gt(0.5).nonzero().view(-1);
    q = q.index_select(1, fresh);
    if (q.size(1) == 0) return q;
    q = std::get<0>(at::linalg_qr(q, "reduced"));
  }
  // The complement of span(V) holds no more than n - c directions.
  return q.narrow(1, 0, std::min(q.size(1), W.size(0) - V.size(1)));
}

}  // namespace

at::Tensor orthonormalize(const at::Tensor& W, const at::Tensor& V, double drop_tol) {
  TORCH_CHECK(W.dim() == 2 && V.dim() == 2 && W.size(0) == V.size(0),
              "linft::orthonormalize: W [n, b] and V [n, c] expected, got ", W.sizes(), " and ",
              V.sizes());
  TORCH_CHECK(W.scalar_type() == V.scalar_type(), "linft::orthonormalize: dtype mismatch");
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "linft::orthonormalize: float32 or float64 only, got ", W.scalar_type());
  const int64_t n = W.size(0);
  if (W.size(1) == 0 || V.size(1) >= n) return W.new_empty({n, 0});
  const double scale = at::linalg_vector_norm(W, 2, {0}).max().item<double>();
  if (!(scale > 0.0)) return W.new_empty({n, 0});
  // Two block Gram-Schmidt passes ("twice is enough", Giraud et al. 2005).
  at::Tensor w = project_out(project_out(W, V), V);
  const double min_diag = drop_tol * scale;
  // CholeskyQR2 (Yamamoto et al. 2015) is a few GEMMs; with the Gram matrix and the solve in
  // fp64 its first pass loses orthogonality ~ 1e-16 * cond^2, which the second pass removes.
  at::Tensor q = cholesky_qr(w, min_diag, /*max_cond=*/1e6);
  if (q.defined()) {
    q = project_out(q, V);
    at::Tensor q2 = cholesky_qr(q, 0.5, 2.0);
    if (q2.defined()) return q2;
  }
  return householder_drop(w, V, min_diag);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rayleigh_ritz(
    const at::Tensor& V, const at::Tensor& AV, int64_t k, bool largest) {
  TORCH_CHECK(V.dim() == 2 && V.sizes() == AV.sizes(),
              "linft::rayleigh_ritz: V and AV must both be [n, c], got ", V.sizes(), " and ",
              AV.sizes());
  TORCH_CHECK(V.scalar_type() == AV.scalar_type(), "linft::rayleigh_ritz: dtype mismatch");
  TORCH_CHECK(k > 0, "linft::rayleigh_ritz: k must be positive, got ", k);
  const int64_t c = V.size(1);
  TORCH_CHECK(c > 0, "linft::rayleigh_ritz: empty basis");
  const int64_t kk = std::min(k, c);
  // The projected problem is small: solve it in fp64 whatever the working precision.
  at::Tensor H = V.to(at::kDouble).t().mm(AV.to(at::kDouble));
  H = (H + H.t()) * 0.5;
  auto [theta, S] = at::linalg_eigh(H);  // ascending
  const at::Tensor norm_est = theta.abs().max();
  at::Tensor idx = largest ? at::arange(c - 1, c - 1 - kk, -1, theta.options().dtype(at::kLong))
                           : at::arange(0, kk, theta.options().dtype(at::kLong));
  const at::Tensor sel = S.index_select(1, idx).to(V.scalar_type());
  return {theta.index_select(0, idx), V.mm(sel), AV.mm(sel), norm_est};
}

}  // namespace linft

TORCH_LIBRARY_IMPL(linft, CompositeExplicitAutograd, m) {
  m.impl("orthonormalize", &linft::orthonormalize);
  m.impl("rayleigh_ritz", &linft::rayleigh_ritz);
}
