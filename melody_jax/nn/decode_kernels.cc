// A decode step's work on CPU as XLA FFI custom calls, float32: y[M, N] = x[M, K] @ W[K, N] for a few
// rows (M <= 8), and one query per head against a KV cache read only up to its length.
//
// Why: a decode step multiplies 1-8 rows by every weight of the model, so it is bound by reading W.
// XLA:CPU's dot reads a [K, N] weight at a fraction of memory bandwidth when M is 2-8; this reads W
// once for all M rows, front to back: each part takes a run of W's rows (contiguous memory, which the
// hardware prefetchers stream) and adds them kRows at a time into a partial y of its own (small enough
// for L1/L2; register tiles over the kRows rows, so y is updated once per pass); partials are summed last,
// in a fixed order, so y does not depend on which thread ran which part.
// XLA attends over the whole preallocated cache, masked; the attention call reads only the filled part.
// Parts run on the calling thread and on helper threads of this library (as many as XLA's intra-op pool
// has threads, less one) that spin between calls: a decode step is ~200 calls of ~0.1 ms, and a pool
// thread woken per call arrives after the caller has done all the work itself. The caller claims parts
// too and only waits for parts a helper has already claimed.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;  // rows of W per pass over a column panel

#if defined(__AVX512F__)

// y[:, n:n+16V] += x[:, k:k+R] @ W[k:k+R, n:n+16V]: M x V accumulators in registers over the R rows,
// then one update of y; the last vector is masked by `tail`.
template <int M, int V, int R>
void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k, int64_t n, __mmask16 tail) {
  __m512 acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const float* row = w + (k + r) * N + n;
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_maskz_loadu_ps(v + 1 < V ? 0xFFFF : tail, row + 16 * v);
    for (int m = 0; m < M; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k + r]);
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) {
      float* out = y + m * N + n + 16 * v;
      const __mmask16 mask = v + 1 < V ? 0xFFFF : tail;
      _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), acc[m][v]));
    }
}

// Accumulator vectors per row: M x V stays within 24 of the 32 vector registers (W and x take 4 more).
template <int M>
constexpr int Vectors() { return std::min(8, 24 / M); }

// y[:, p0:p1] += x[:, k:k+R] @ W[k:k+R, p0:p1].
template <int M, int R>
void Rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k, int64_t p0, int64_t p1) {
  constexpr int V = Vectors<M>();
  int64_t n = p0;
  for (; n + 16 * V <= p1; n += 16 * V) Tile<M, V, R>(x, w, y, K, N, k, n, 0xFFFF);
  for (; n < p1; n += 16)
    Tile<M, 1, R>(x, w, y, K, N, k, n, p1 - n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (p1 - n)) - 1));
}

#else  // portable: the same loop order in plain code, left to the compiler's vectoriser

template <int M, int R>
void Rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k, int64_t p0, int64_t p1) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      const float xm = x[m * K + k + r];
      const float* row = w + (k + r) * N;
      float* out = y + m * N;
      for (int64_t n = p0; n < p1; ++n) out[n] += xm * row[n];
    }
}

#endif

// y = x[:, k0:k1] @ W[k0:k1, :], one column panel at a time so that y's panel stays in cache.
template <int M>
void Part(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  std::fill(y, y + M * N, 0.0f);
  const int64_t panel = std::max<int64_t>(1024, 8192 / M);
  for (int64_t p0 = 0; p0 < N; p0 += panel) {
    const int64_t p1 = std::min(N, p0 + panel);
    int64_t k = k0;
    for (; k + kRows <= k1; k += kRows) Rows<M, kRows>(x, w, y, K, N, k, p0, p1);
    for (; k < k1; ++k) Rows<M, 1>(x, w, y, K, N, k, p0, p1);
  }
}

using PartFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr PartFn kParts[] = {Part<1>, Part<2>, Part<3>, Part<4>, Part<5>, Part<6>, Part<7>, Part<8>};

// Parts shared by the calling thread and the helpers; a helper may look at them after the call returned,
// so the state lives as long as its last owner (`part` itself only runs before).
struct Work {
  std::function<void(int64_t)> part;
  int64_t parts;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      part(p);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads, started once and never stopped: after a call they spin for kSpin (longer than the
// gaps between a decode step's calls, shorter than a busy machine should lend to spinning), then sleep
// until the next call's `Run`. They are leaked on purpose (no destructor races with exit).
class Helpers {
 public:
  static constexpr auto kSpin = std::chrono::microseconds(100);

  explicit Helpers(int64_t n) {
    for (int64_t i = 0; i < n; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Run(std::shared_ptr<Work> work) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      work_ = std::move(work);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
  }

 private:
  void Loop() {
    for (uint64_t seen = 0;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<Work> work;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_relaxed) != seen; });
        seen = epoch_.load(std::memory_order_relaxed);
        work = work_;
      }
      work->Drain();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::shared_ptr<Work> work_;
};

// Runs part(0), ..., part(parts - 1) on the calling thread and the helpers (`threads` in all, XLA's
// intra-op count); returns when all have run.
void Parallel(int64_t threads, int64_t parts, std::function<void(int64_t)> part) {
  static Helpers* helpers = new Helpers(std::max<int64_t>(threads, 1) - 1);
  auto work = std::make_shared<Work>();
  work->part = std::move(part);
  work->parts = parts;
  if (parts > 1) helpers->Run(work);
  work->Drain();
  for (int spins = 0; work->done.load(std::memory_order_acquire) < parts; ++spins)
    if (spins > 64) std::this_thread::yield();
}

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("skinny_matmul: x [M, K] and w [K, N] expected");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (M < 1 || M > 8) return ffi::Error::InvalidArgument("skinny_matmul: 1 <= M <= 8 rows expected");
  // Two parts per thread (a thread that is preempted holds up less), none thinner than a few passes;
  // part 0 writes y, part p > 0 its own partial, summed in order at the end.
  const int64_t parts = std::clamp<int64_t>(std::min<int64_t>(2 * pool.num_threads(), K / (4 * kRows)), 1, 64);
  std::vector<float> partials((parts - 1) * M * N);
  float* out = y->typed_data();
  Parallel(pool.num_threads(), parts, [&](int64_t p) {
    const int64_t k0 = p * K / parts / kRows * kRows, k1 = p + 1 == parts ? K : (p + 1) * K / parts / kRows * kRows;
    kParts[M - 1](x.typed_data(), w.typed_data(), p == 0 ? out : partials.data() + (p - 1) * M * N, K, N, k0, k1);
  });
  for (int64_t p = 1; p < parts; ++p) {
    const float* partial = partials.data() + (p - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) out[i] += partial[i];
  }
  return ffi::Error::Success();
}

// out[D] = softmax(scale · K[:L] q) @ V[:L] for one head, K and V [S, D] row-major, only L rows read.
void AttendHead(const float* q, const float* k, const float* v, float* out, int64_t D, int64_t L, float scale,
                float* scores) {
  constexpr int kLanes = 16;  // independent partial sums, which the compiler keeps in one vector
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    const float* row = k + j * D;
    float lanes[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes)
      for (int i = 0; i < kLanes; ++i) lanes[i] += q[d + i] * row[d + i];
    for (; d < D; ++d) lanes[0] += q[d] * row[d];
    float dot = 0.0f;
    for (int i = 0; i < kLanes; ++i) dot += lanes[i];
    scores[j] = dot * scale;
    best = std::max(best, scores[j]);
  }
  std::fill(out, out + D, 0.0f);
  float total = 0.0f;
  for (int64_t j = 0; j < L; ++j) {
    const float p = std::exp(scores[j] - best);
    total += p;
    const float* row = v + j * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p * row[d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> length, ffi::ResultBuffer<ffi::F32> out,
                          float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[2] ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end()) ||
      length.element_count() != 1)
    return ffi::Error::InvalidArgument("cache_attention: q [B, H, D], k and v [B, H, S, D], a length expected");
  const int64_t heads = qd[0] * qd[1], S = kd[2], D = kd[3];
  const int64_t L = std::clamp<int64_t>(length.typed_data()[0], 1, S);
  const int64_t parts = std::min<int64_t>(heads, 2 * pool.num_threads());
  Parallel(pool.num_threads(), parts, [&](int64_t p) {
    std::vector<float> scores(L);
    for (int64_t i = p * heads / parts; i < (p + 1) * heads / parts; ++i)
      AttendHead(q.typed_data() + i * D, k.typed_data() + i * S * D, v.typed_data() + i * S * D,
                 out->typed_data() + i * D, D, L, scale, scores.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MelodySkinnyMatmul, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MelodyCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
