// Parallel loops over a ChannelView that hand each element its channel index.
#pragma once

#include <ATen/Parallel.h>

#include "../common.h"

namespace fusedres::cpu {

// fn(index, c) for every element; the inner loops run over contiguous memory so the compiler
// can vectorise them once fn is inlined.
template <typename Fn>
void for_each_element(const ChannelView& v, const Fn& fn) {
  constexpr int64_t kGrain = 32768;  // elements per task
  if (v.inner == 1) {  // channels_last: rows of C channels
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(v.channels, 1));
    at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * v.channels;
        for (int64_t c = 0; c < v.channels; ++c) fn(base + c, c);
      }
    });
  } else {  // channels-first: runs of `inner` values of one channel
    const int64_t grain = std::max<int64_t>(1, kGrain / v.inner);
    at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line) {
        const int64_t c = line % v.channels;
        const int64_t base = line * v.inner;
        for (int64_t i = 0; i < v.inner; ++i) fn(base + i, c);
      }
    });
  }
}

// Per-channel sums of K quantities: fn(index, c, acc) adds element `index`'s terms to acc[0..K).
// The split into blocks is fixed (not per thread), so results do not depend on the thread count.
template <typename acc_t, int K, typename Fn>
std::vector<acc_t> per_channel_sums(const ChannelView& v, const Fn& fn) {
  const int64_t C = v.channels;
  std::vector<acc_t> total(K * C, acc_t(0));
  if (v.inner == 1) {
    constexpr int64_t kRowsPerBlock = 256;
    const int64_t blocks = (v.outer + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<acc_t> partial(blocks * K * C, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* acc = partial.data() + b * K * C;
        const int64_t row_end = std::min(v.outer, (b + 1) * kRowsPerBlock);
        for (int64_t row = b * kRowsPerBlock; row < row_end; ++row) {
          for (int64_t c = 0; c < C; ++c) fn(row * C + c, c, acc + c * K);
        }
      }
    });
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t j = 0; j < K * C; ++j) total[j] += partial[b * K * C + j];
  } else {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t o = 0; o < v.outer; ++o) {
          acc_t line[K] = {};  // one run at a time keeps the sums short
          const int64_t base = (o * C + c) * v.inner;
          for (int64_t i = 0; i < v.inner; ++i) fn(base + i, c, line);
          for (int k = 0; k < K; ++k) total[c * K + k] += line[k];
        }
      }
    });
  }
  return total;
}

}  // namespace fusedres::cpu
