// Parallel loops over a ChannelView.
#pragma once

#include <ATen/Parallel.h>

#include <utility>
#include <vector>

#include "../common.h"

namespace fusedres::cpu {

// One value of the normalize pass (batch_norm_apply.cpp). The backward recomputes the ReLU
// mask with this same function, so it sees the output the forward wrote.
template <typename acc_t, bool kResidual, bool kRelu>
inline acc_t normalize_value(acc_t x, acc_t r, acc_t m, acc_t s, acc_t b, acc_t rm, acc_t rs,
                             acc_t rb) {
  acc_t value = (x - m) * s + b;
  if constexpr (kResidual) value += (r - rm) * rs + rb;
  // (value < 0) keeps NaN, as torch.relu does.
  if constexpr (kRelu) value = value < acc_t(0) ? acc_t(0) : value;
  return value;
}

// Visits the tensor in contiguous runs, in parallel:
//   channels_last:  row(offset), a row of C values whose j-th value has channel j;
//   channels-first: plane(offset, n, c), n values of channel c.
// Keeping the channel handling out of the innermost loop lets the compiler vectorise it.
template <typename Row, typename Plane>
void for_each_run(const ChannelView& v, const Row& row, const Plane& plane) {
  constexpr int64_t kGrain = 32768;  // elements per task
  if (v.inner == 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.channels, 1));
    at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r * v.channels);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / v.inner);
    at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line)
        plane(line * v.inner, v.inner, line % v.channels);
    });
  }
}

// Sums of K terms over i in [begin, end): terms(i, t) writes element i's K terms to t. Kept in
// kLanes independent partial sums, so the loop vectorises (one running sum would be a serial
// chain of dependent additions).
template <int K, typename acc_t, typename Terms>
inline void lane_sums(int64_t begin, int64_t end, const Terms& terms, acc_t (&out)[K]) {
  constexpr int kLanes = 8;
  acc_t lanes[K][kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc_t t[K];
      terms(i + l, t);
      for (int k = 0; k < K; ++k) lanes[k][l] += t[k];
    }
  }
  for (; i < end; ++i) {
    acc_t t[K];
    terms(i, t);
    for (int k = 0; k < K; ++k) lanes[k][0] += t[k];
  }
  for (int k = 0; k < K; ++k) {
    out[k] = acc_t(0);
    for (int l = 0; l < kLanes; ++l) out[k] += lanes[k][l];
  }
}

// Per-channel sums of two quantities over the tensor, in parallel:
//   channels_last:  row(offset, acc0, acc1) adds a row's terms to acc0[c], acc1[c];
//   channels-first: plane(offset, n, c, acc0, acc1) adds n values' terms to the scalars.
// Rows are split into fixed blocks (not per thread), so results do not depend on the
// thread count. Returns {sum0[C], sum1[C]}.
template <typename acc_t, typename Row, typename Plane>
std::pair<std::vector<acc_t>, std::vector<acc_t>> per_channel_sums(const ChannelView& v,
                                                                   const Row& row,
                                                                   const Plane& plane) {
  const int64_t C = v.channels;
  std::vector<acc_t> sum0(C, acc_t(0)), sum1(C, acc_t(0));
  if (v.inner == 1) {
    constexpr int64_t kRowsPerBlock = 256;
    const int64_t blocks = (v.outer + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<acc_t> partial(blocks * 2 * C, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* acc0 = partial.data() + b * 2 * C;
        acc_t* acc1 = acc0 + C;
        const int64_t row_end = std::min(v.outer, (b + 1) * kRowsPerBlock);
        for (int64_t r = b * kRowsPerBlock; r < row_end; ++r) row(r * C, acc0, acc1);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sum0[c] += partial[b * 2 * C + c];
        sum1[c] += partial[b * 2 * C + C + c];
      }
    }
  } else {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t o = 0; o < v.outer; ++o) {  // one plane at a time keeps the sums short
          acc_t acc0 = 0, acc1 = 0;
          plane((o * C + c) * v.inner, v.inner, c, acc0, acc1);
          sum0[c] += acc0;
          sum1[c] += acc1;
        }
      }
    });
  }
  return {std::move(sum0), std::move(sum1)};
}

}  // namespace fusedres::cpu
