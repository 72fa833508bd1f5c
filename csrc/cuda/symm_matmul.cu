// CUDA implementation of linft::symm_matmul (schema in ../linft.cpp).
//
// Y = A X for symmetric A [n, n], X [n, m], reading only the tiles A_IJ with I <= J. One thread
// block owns one such 64 x 64 tile: it stages the tile in shared memory once and applies it to
// both sides, Y_I += A_IJ X_J and (I < J) Y_J += A_IJ^T X_I, for all m columns in chunks of 32.
// For m near 100 the product is bound by reading A, so halving the bytes of A read halves the
// time; partial results are combined with atomicAdd into a zero-initialised Y (fp32 or fp64
// accumulation, the dtype of A).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../linft.h"

namespace linft {
namespace {

constexpr int kTile = 64;  // rows and columns of one tile of A
constexpr int kThreads = 256;
constexpr int kRowsPerThread = kTile / (kThreads / 16);  // 4: thread (ty, tx) owns rows ty*4..+4

// Columns of X per pass over the staged tile: 32 in fp32, 16 in fp64, so that the tile and the
// two slices of X fit the 48 KiB of static shared memory (32 KiB and 48 KiB).
template <typename scalar_t>
constexpr int chunk_cols() {
  return sizeof(scalar_t) == 8 ? 16 : 32;
}

template <typename scalar_t, int kChunk>
__global__ void symm_matmul_kernel(
    const scalar_t* __restrict__ A,  // [n, n] row-major, only tiles I <= J are read
    const scalar_t* __restrict__ X,  // [n, m] row-major
    scalar_t* __restrict__ Y,        // [n, m] row-major, zero on entry, accumulated atomically
    int64_t n,                       // order of A
    int64_t m) {                     // columns of X and Y
  const int64_t tj = blockIdx.x;  // tile column J
  const int64_t ti = blockIdx.y;  // tile row I
  if (ti > tj) return;            // strictly lower tiles: covered by their transposes
  const bool diagonal = ti == tj;
  const int64_t i0 = ti * kTile;
  const int64_t j0 = tj * kTile;

  constexpr int kColsPerThread = kChunk / 16;  // thread (ty, tx) owns columns tx, tx + 16, ...
  // Within a warp only two rows (ty) are read at a time: unpadded, at most 2-way bank conflicts.
  __shared__ scalar_t a_s[kTile][kTile];
  __shared__ scalar_t xi_s[kTile][kChunk];
  __shared__ scalar_t xj_s[kTile][kChunk];

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;

  // Stage A_IJ once (coalesced along rows); zero outside the matrix.
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile;
    const int c = e % kTile;
    const int64_t gr = i0 + r;
    const int64_t gc = j0 + c;
    a_s[r][c] = (gr < n && gc < n) ? A[gr * n + gc] : scalar_t(0);
  }

  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    __syncthreads();  // a_s ready (first pass); previous chunk's reads of x*_s done
    for (int e = tid; e < kTile * kChunk; e += kThreads) {
      const int r = e / kChunk;
      const int c = e % kChunk;
      const int64_t gc = c0 + c;
      const bool col_ok = gc < m;
      xj_s[r][c] = (col_ok && j0 + r < n) ? X[(j0 + r) * m + gc] : scalar_t(0);
      xi_s[r][c] = (col_ok && i0 + r < n) ? X[(i0 + r) * m + gc] : scalar_t(0);
    }
    __syncthreads();

    scalar_t acc_i[kRowsPerThread][kColsPerThread] = {};  // rows of Y_I
    scalar_t acc_j[kRowsPerThread][kColsPerThread] = {};  // rows of Y_J
    for (int p = 0; p < kTile; ++p) {
      scalar_t xj[kColsPerThread];
      scalar_t xi[kColsPerThread];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        xj[c] = xj_s[p][tx + 16 * c];
        xi[c] = xi_s[p][tx + 16 * c];
      }
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int row = ty * kRowsPerThread + r;
        const scalar_t a_rp = a_s[row][p];  // A_IJ[row, p]
        const scalar_t a_pr = a_s[p][row];  // A_IJ^T[row, p]
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          acc_i[r][c] += a_rp * xj[c];
          acc_j[r][c] += a_pr * xi[c];
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = ty * kRowsPerThread + r;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int64_t gc = c0 + tx + 16 * c;
        if (gc >= m) continue;
        if (i0 + row < n) atomicAdd(&Y[(i0 + row) * m + gc], acc_i[r][c]);
        if (!diagonal && j0 + row < n) atomicAdd(&Y[(j0 + row) * m + gc], acc_j[r][c]);
      }
    }
  }
}

at::Tensor symm_matmul_cuda(const at::Tensor& A, const at::Tensor& X, int64_t tile) {
  check_matmul_inputs(A, X, tile);
  TORCH_CHECK(A.is_cuda(), "linft::symm_matmul (CUDA): A must be a CUDA tensor");
  // The tile size of this kernel is fixed at compile time; `tile` only matters on the CPU.
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const at::Tensor x = X.contiguous();
  at::Tensor y = at::zeros_like(x);
  const int64_t n = a.size(0);
  const int64_t m = x.size(1);
  if (n == 0 || m == 0) return y;
  const int64_t tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "linft::symm_matmul (CUDA): n too large for the grid, n = ", n);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linft_symm_matmul", [&] {
    symm_matmul_kernel<scalar_t, chunk_cols<scalar_t>()><<<grid, kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace
}  // namespace linft

TORCH_LIBRARY_IMPL(linft, CUDA, m) { m.impl("symm_matmul", &linft::symm_matmul_cuda); }
