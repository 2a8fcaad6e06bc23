// The TF op's compiled CPU kernels:
//   FusedEmbeddingMean, table (V, D) + ids (B, L): the mean over the sequence axis (axis=1,
//     -> (B, D)) or over each gathered row (axis=2, -> (B, L));
//   FusedEmbeddingMeanOfRows, the axis-2 form on a frozen table's row means (V) computed
//     when the graph was exported: (B, L) scalar reads, not B*L*D values;
//   FusedEmbeddingBag, CSR bags -> (B, D) for the sparse lookups (tf_bags.py).
//
// A Python-function op pays TF's round trip into Python on every call (0.2-0.5 ms,
// benchmarks/NOTES.md); these kernels run inside TF's executor like its own ops, on
// TF's buffers, into an output TF allocated. Axis 1 and the bags call the cpu backend's
// Numba launchers (C callbacks over the same kernels the core op runs,
// backends/cpu_cfunc.py, cpu_bags_cfunc.py), which Python registers when it loads this
// library (fused_embedding.tf.load_ops()). A process that loads the library without
// Python configuring it (TF Serving, tf.load_op_library alone) runs the plain C++ loops
// below instead, on TF's own CPU thread pool: same results within the dtypes'
// tolerances (float32 accumulation, zeros for empty bags, the same bad-id messages,
// compiled in from c_interface.py), slower than the Numba kernels. Axis 2 and the row
// means are those C++ loops everywhere (a scalar per (b, l): no Numba kernel needed).
// An output of 64 MiB or more is first checked against the host's memory (cgroup
// limits included) by a Python callback registered the same way, so the bound is
// defined once (memory.py) for the core op and this kernel; that call takes the GIL,
// which TF's executor does not hold (its py_function ops need it too), and costs well
// under the time such an output takes to write. Without Python, that check is left to
// TF's allocator. Built by fused_embedding/tf_compiled.py against the installed TF's
// headers, or linked into a server (README, "TF Serving").
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "fused_embedding_c_interface.h"

namespace {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Launcher (backends/cpu_cfunc.py's launch_sequence_mean), OutputCheck (tf_compiled.py's
// memory check) and the extern "C" entry points below are declared in this header, which
// tf_compiled.py generates from c_interface.py: one declaration for C++, Numba and ctypes.
constexpr int kDataTypes = 32;  // above every DataType enum value a table can have
constexpr int64_t kMessageCapacity = 512;

std::atomic<Launcher> g_launcher{nullptr};
std::atomic<OutputCheck> g_output_check{nullptr};
std::atomic<int64_t> g_check_min_bytes{INT64_MAX};  // outputs this large or more are checked
std::atomic<int64_t> g_team_size{1};
std::atomic<int64_t> g_serial_only{0};
std::atomic<int> g_formats[kDataTypes];  // DataType -> the kernels' format code, -1 if none
std::atomic<bool> g_poison_outputs{false};  // tests: fill each output before the kernel writes it
std::atomic<float> g_poison_value{0.0f};
std::mutex g_message_mutex;
std::string g_bad_id_message = FUSED_EMBEDDING_OUT_OF_RANGE_MESSAGE;  // {id}, {row}, {col}, {vocab}
std::atomic<BagLauncher> g_bag_launcher{nullptr};
std::string g_bag_bad_id_message = FUSED_EMBEDDING_BAG_OUT_OF_RANGE_MESSAGE;  // {id}, {position}, {bag}, {vocab}
std::string g_order_message = FUSED_EMBEDDING_CANONICAL_ORDER_MESSAGE;  // sparse ids out of row order
std::string g_row_message = FUSED_EMBEDDING_ROW_OUTSIDE_MESSAGE;  // {row}, {position}, {batch}

void Replace(std::string& text, const std::string& field, const std::string& value) {
  for (size_t at = text.find(field); at != std::string::npos; at = text.find(field, at + value.size())) {
    text.replace(at, field.size(), value);
  }
}

// A configured message with its {field}s filled in.
std::string Message(const std::string& configured,
                    std::initializer_list<std::pair<const char*, int64_t>> fields) {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(g_message_mutex);
    text = configured;
  }
  for (const auto& field : fields) Replace(text, field.first, std::to_string(field.second));
  return text;
}

std::string BadIdMessage(int64_t id, int64_t row, int64_t col, int64_t vocab) {
  return Message(g_bad_id_message, {{"{id}", id}, {"{row}", row}, {"{col}", col}, {"{vocab}", vocab}});
}

// Outputs of check_min_bytes or more are asked about before they are allocated: past a
// container's memory limit the allocation succeeds and the OOM killer ends the process
// while the kernel writes it; past the host's, TF fails with a message that doesn't say
// which op or why.
absl::Status CheckOutputFits(int64_t rows, int64_t cols, DataType dtype) {
  int64_t out_bytes = 0;
  if (__builtin_mul_overflow(rows, cols, &out_bytes) ||
      __builtin_mul_overflow(out_bytes, int64_t{tensorflow::DataTypeSize(dtype)}, &out_bytes)) {
    out_bytes = INT64_MAX;
  }
  const OutputCheck check = g_output_check.load();
  if (check != nullptr && out_bytes >= g_check_min_bytes.load()) {
    char message[kMessageCapacity] = {0};
    if (check(rows, cols, dtype, message, kMessageCapacity) != 0) return absl::ResourceExhaustedError(message);
  }
  return absl::OkStatus();
}

int FormatOf(DataType dtype) { return dtype < kDataTypes ? g_formats[dtype].load() : -1; }

void Poison(Tensor* out) {
  const float value = g_poison_value.load();
  switch (out->dtype()) {
    case tensorflow::DT_FLOAT: out->flat<float>().setConstant(value); break;
    case tensorflow::DT_HALF: out->flat<Eigen::half>().setConstant(Eigen::half(value)); break;
    case tensorflow::DT_BFLOAT16:
      out->flat<tensorflow::bfloat16>().setConstant(tensorflow::bfloat16(value));
      break;
    default: break;
  }
}

// --- The plain C++ loops: axis 2, the row means, and axis 1 / the bags where no launcher
// was registered. Float32 accumulation, the table's dtype out, as the Numba kernels.

template <typename T>
inline float ToFloat(T value) { return static_cast<float>(value); }
template <typename T>
inline T FromFloat(float value) { return static_cast<T>(value); }

// Calls work(begin, end) over [0, total) on TF's CPU thread pool, in shards of about
// cost_per_unit bytes read per unit (TF sizes the shards from it).
void ParallelFor(OpKernelContext* context, int64_t total, int64_t cost_per_unit,
                 const std::function<void(int64_t, int64_t)>& work) {
  const auto* workers = context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, total, std::max<int64_t>(cost_per_unit, 1), work);
}

// Shards run at once: the first bad position in row-major order is the smallest seen.
void KeepFirst(std::atomic<int64_t>* first, int64_t position) {
  int64_t seen = first->load();
  while (position < seen && !first->compare_exchange_weak(seen, position)) {
  }
}

// ids [B][L] -> out [B][D]: each bag's mean (mask_zero: over its non-zero ids; none: 0).
// Returns the first flat position of an id outside [0, V), or B * L.
template <typename T, typename Id>
int64_t SequenceMean(OpKernelContext* context, const T* table, int64_t vocab, int64_t dim, const Id* ids,
                     int64_t batch, int64_t length, bool mask_zero, T* out) {
  std::atomic<int64_t> first_bad{batch * length};
  ParallelFor(context, batch, length * dim * int64_t{sizeof(T)}, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      int64_t count = 0;
      for (int64_t l = 0; l < length; ++l) {
        const int64_t id = ids[b * length + l];
        if (id < 0 || id >= vocab) {
          KeepFirst(&first_bad, b * length + l);
          continue;
        }
        if (mask_zero && id == FUSED_EMBEDDING_PADDING_ID) continue;
        const T* row = table + id * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += ToFloat(row[d]);
        ++count;
      }
      const float divisor = static_cast<float>(count);
      for (int64_t d = 0; d < dim; ++d) out[b * dim + d] = FromFloat<T>(count > 0 ? acc[d] / divisor : 0.0f);
    }
  });
  return first_bad.load();
}

// ids [B][L] -> out [B][L]: the mean of each id's row (mask_zero: 0 at padding).
template <typename T, typename Id>
int64_t RowMeansAtIds(OpKernelContext* context, const T* table, int64_t vocab, int64_t dim, const Id* ids,
                      int64_t total, bool mask_zero, T* out) {
  std::atomic<int64_t> first_bad{total};
  ParallelFor(context, total, dim * int64_t{sizeof(T)}, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = ids[p];
      if (id < 0 || id >= vocab) {
        KeepFirst(&first_bad, p);
        continue;
      }
      if (mask_zero && id == FUSED_EMBEDDING_PADDING_ID) {
        out[p] = FromFloat<T>(0.0f);
        continue;
      }
      const T* row = table + id * dim;
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum += ToFloat(row[d]);
      out[p] = FromFloat<T>(sum / static_cast<float>(dim));
    }
  });
  return first_bad.load();
}

// ids [B][L] -> out [B][L]: means [V] (float32, a frozen table's row means) at each id.
template <typename T, typename Id>
int64_t MeansAtIds(const float* means, int64_t vocab, const Id* ids, int64_t total, bool mask_zero, T* out) {
  for (int64_t p = 0; p < total; ++p) {  // B*L scalar reads: less than a thread hand-off
    const int64_t id = ids[p];
    if (id < 0 || id >= vocab) return p;
    out[p] = FromFloat<T>(mask_zero && id == FUSED_EMBEDDING_PADDING_ID ? 0.0f : means[id]);
  }
  return total;
}

// CSR bags (values [N], offsets [B + 1], weights [N] or null) -> out [B][D], pooled as
// tf.nn.embedding_lookup_sparse's combiners (a zero denominator gives zeros).
template <typename T, typename Id>
int64_t BagsPooled(OpKernelContext* context, const T* table, int64_t vocab, int64_t dim, const Id* values,
                   int64_t total, const int64_t* offsets, int64_t batch, const float* weights, int pooling,
                   T* out) {
  std::atomic<int64_t> first_bad{total};
  const int64_t ids_per_bag = batch > 0 ? total / batch + 1 : 1;
  ParallelFor(context, batch, ids_per_bag * dim * int64_t{sizeof(T)}, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      float term = 0.0f;
      for (int64_t p = offsets[b]; p < offsets[b + 1]; ++p) {
        const int64_t id = values[p];
        if (id < 0 || id >= vocab) {
          KeepFirst(&first_bad, p);
          continue;
        }
        const float w = weights != nullptr ? weights[p] : 1.0f;
        const T* row = table + id * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * ToFloat(row[d]);
        term += pooling == FUSED_EMBEDDING_POOLING_SQRTN ? w * w : w;
      }
      const float divisor = pooling == FUSED_EMBEDDING_POOLING_MEAN    ? term
                            : pooling == FUSED_EMBEDDING_POOLING_SQRTN ? std::sqrt(term)
                                                                       : 1.0f;
      for (int64_t d = 0; d < dim; ++d) out[b * dim + d] = FromFloat<T>(divisor != 0.0f ? acc[d] / divisor : 0.0f);
    }
  });
  return first_bad.load();
}

// Calls fn(T{}, Id{}) with the C++ types of a table dtype and an id dtype.
template <typename Fn>
void ForTypes(DataType table_dtype, DataType id_dtype, Fn fn) {
  auto with_id = [&](auto table_tag) {
    if (id_dtype == tensorflow::DT_INT64) {
      fn(table_tag, int64_t{});
    } else {
      fn(table_tag, int32_t{});
    }
  };
  switch (table_dtype) {
    case tensorflow::DT_HALF: with_id(Eigen::half{}); break;
    case tensorflow::DT_BFLOAT16: with_id(tensorflow::bfloat16{}); break;
    default: with_id(float{}); break;  // the op's T attribute allows these three only
  }
}

int64_t IdAt(const Tensor& ids, int64_t position) {
  return ids.dtype() == tensorflow::DT_INT32 ? int64_t{ids.flat<int32_t>()(position)}
                                             : int64_t{ids.flat<int64_t>()(position)};
}

class FusedEmbeddingMeanOp : public OpKernel {
 public:
  explicit FusedEmbeddingMeanOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("mask_zero", &mask_zero_));
    OP_REQUIRES_OK(context, context->GetAttr("axis", &axis_));
    OP_REQUIRES(context, axis_ == 1 || axis_ == 2,
                absl::InvalidArgumentError("FusedEmbeddingMean's axis must be 1 or 2, got " +
                                           std::to_string(axis_)));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& table = context->input(0);
    const Tensor& ids = context->input(1);
    OP_REQUIRES(context, table.dims() == 2,
                absl::InvalidArgumentError("table must be 2-D (V, D), got shape " +
                                           table.shape().DebugString()));
    OP_REQUIRES(context, ids.dims() == 2,
                absl::InvalidArgumentError("ids must be 2-D (B, L), got shape " +
                                           ids.shape().DebugString()));
    const int64_t vocab = table.dim_size(0), dim = table.dim_size(1);
    const int64_t batch = ids.dim_size(0), length = ids.dim_size(1);
    // Before the empty-output return below, which a (V, 0) table would take unchecked.
    OP_REQUIRES(context, dim >= 1,
                absl::InvalidArgumentError("table must have at least one column (D >= 1), got shape " +
                                           table.shape().DebugString()));
    const int64_t cols = axis_ == 1 ? dim : length;  // out [B][D] or [B][L]
    OP_REQUIRES_OK(context, CheckOutputFits(batch, cols, table.dtype()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, cols}), &out));
    if (out->NumElements() == 0) return;

    if (g_poison_outputs.load()) Poison(out);

    const Launcher launch = g_launcher.load();
    const int format = FormatOf(table.dtype());
    const int64_t id_bytes = tensorflow::DataTypeSize(ids.dtype());
    int64_t first_bad = batch * length;
    if (axis_ == 1 && launch != nullptr && format >= 0) {
      first_bad = launch(table.data(), vocab, dim, format, ids.data(), id_bytes, batch, length, mask_zero_,
                         g_team_size.load(), g_serial_only.load(), out->data());
    } else {
      ForTypes(table.dtype(), ids.dtype(), [&](auto table_tag, auto id_tag) {
        using T = decltype(table_tag);
        using Id = decltype(id_tag);
        const T* rows = static_cast<const T*>(table.data());
        const Id* at = static_cast<const Id*>(ids.data());
        T* result = static_cast<T*>(out->data());
        first_bad = axis_ == 1 ? SequenceMean(context, rows, vocab, dim, at, batch, length, mask_zero_, result)
                               : RowMeansAtIds(context, rows, vocab, dim, at, batch * length, mask_zero_, result);
      });
    }
    if (first_bad < batch * length) {
      context->SetStatus(absl::InvalidArgumentError(
          BadIdMessage(IdAt(ids, first_bad), first_bad / length, first_bad % length, vocab)));
    }
  }

 private:
  bool mask_zero_ = false;
  int axis_ = 1;
};

// FusedEmbeddingMeanOfRows: axis 2 on a frozen table, from its row means [V] float32
// (computed when the graph was exported, stored in it as a constant) -> out [B][L] of T.
class FusedEmbeddingMeanOfRowsOp : public OpKernel {
 public:
  explicit FusedEmbeddingMeanOfRowsOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("mask_zero", &mask_zero_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& means = context->input(0);
    const Tensor& ids = context->input(1);
    OP_REQUIRES(context, means.dims() == 1,
                absl::InvalidArgumentError("row_means must be 1-D (V,), got shape " + means.shape().DebugString()));
    OP_REQUIRES(context, ids.dims() == 2,
                absl::InvalidArgumentError("ids must be 2-D (B, L), got shape " + ids.shape().DebugString()));
    const int64_t vocab = means.dim_size(0), batch = ids.dim_size(0), length = ids.dim_size(1);
    const DataType dtype = context->expected_output_dtype(0);
    OP_REQUIRES_OK(context, CheckOutputFits(batch, length, dtype));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, length}), &out));
    if (out->NumElements() == 0) return;
    if (g_poison_outputs.load()) Poison(out);
    int64_t first_bad = batch * length;
    ForTypes(dtype, ids.dtype(), [&](auto table_tag, auto id_tag) {
      using T = decltype(table_tag);
      using Id = decltype(id_tag);
      first_bad = MeansAtIds(means.flat<float>().data(), vocab, static_cast<const Id*>(ids.data()),
                             batch * length, mask_zero_, static_cast<T*>(out->data()));
    });
    if (first_bad < batch * length) {
      context->SetStatus(absl::InvalidArgumentError(
          BadIdMessage(IdAt(ids, first_bad), first_bad / length, first_bad % length, vocab)));
    }
  }

 private:
  bool mask_zero_ = false;
};

// FusedEmbeddingBag: CSR bags pooled by the cpu backend's bags launcher (table (V, D) ->
// (B, D)), fed as tf_bags hands bags over: ragged (values [N], row_splits [B + 1]) or
// sparse (values [N], the SparseTensor's indices [N][2] in row order, B). With prune_ids,
// ids < 0 are dropped, with prune_weights weights <= 0 (the safe lookup's rules), before
// the bags are made; positions in messages are then those of the kept ids, as the core
// op's are on the pruned arrays.
template <typename Id>
void PruneAndCount(OpKernelContext* context, bool sparse, bool prune_ids, bool prune_weights,
                   const Tensor& values, const Tensor& segments, int64_t batch, const float* weights,
                   std::vector<Id>* kept_values, std::vector<float>* kept_weights,
                   std::vector<int64_t>* offsets, bool* pruned) {
  const int64_t total = values.dim_size(0);
  const Id* ids = values.flat<Id>().data();
  std::vector<char> keep;
  *pruned = false;
  if (prune_ids || (prune_weights && weights != nullptr)) {
    keep.assign(total, 1);
    for (int64_t p = 0; p < total; ++p) {
      if ((prune_ids && ids[p] < 0) || (prune_weights && weights != nullptr && !(weights[p] > 0.0f))) {
        keep[p] = 0;
        *pruned = true;
      }
    }
  }
  if (*pruned) {
    for (int64_t p = 0; p < total; ++p) {
      if (!keep[p]) continue;
      kept_values->push_back(ids[p]);
      if (weights != nullptr) kept_weights->push_back(weights[p]);
    }
  }
  offsets->assign(batch + 1, 0);
  if (sparse) {  // each row's ids together, rows in order: count them, then a prefix sum
    const auto indices = segments.matrix<int64_t>();
    int64_t previous = 0, position = 0;
    for (int64_t p = 0; p < total; ++p) {
      if (*pruned && !keep[p]) continue;
      const int64_t row = indices(p, 0);
      if (row < 0 || row >= batch) {
        context->SetStatus(absl::InvalidArgumentError(
            Message(g_row_message, {{"{row}", row}, {"{position}", position}, {"{batch}", batch}})));
        return;
      }
      if (row < previous) {
        context->SetStatus(absl::InvalidArgumentError(Message(g_order_message, {})));
        return;
      }
      previous = row;
      ++(*offsets)[row + 1];
      ++position;
    }
    for (int64_t b = 0; b < batch; ++b) (*offsets)[b + 1] += (*offsets)[b];
    return;
  }
  const auto splits = segments.flat<int64_t>();  // a RaggedTensor's: 0, non-decreasing, N
  if (!*pruned) {
    for (int64_t b = 0; b <= batch; ++b) (*offsets)[b] = splits(b);
    return;
  }
  int64_t kept = 0, p = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (; p < splits(b + 1); ++p) kept += keep[p];
    (*offsets)[b + 1] = kept;
  }
}

class FusedEmbeddingBagOp : public OpKernel {
 public:
  explicit FusedEmbeddingBagOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("pooling", &pooling_));
    OP_REQUIRES_OK(context, context->GetAttr("weighted", &weighted_));
    OP_REQUIRES_OK(context, context->GetAttr("sparse", &sparse_));
    OP_REQUIRES_OK(context, context->GetAttr("prune_ids", &prune_ids_));
    OP_REQUIRES_OK(context, context->GetAttr("prune_weights", &prune_weights_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& table = context->input(0);
    const Tensor& values = context->input(1);
    const Tensor& segments = context->input(2);
    const Tensor& batch_tensor = context->input(3);
    const Tensor& weights = context->input(4);
    OP_REQUIRES(context, table.dims() == 2 && table.dim_size(1) >= 1,
                absl::InvalidArgumentError("table must be 2-D (V, D) with D >= 1, got shape " +
                                           table.shape().DebugString()));
    OP_REQUIRES(context, values.dims() == 1,
                absl::InvalidArgumentError("values must be 1-D, got shape " + values.shape().DebugString()));
    const int64_t total = values.dim_size(0);
    OP_REQUIRES(context, !weighted_ || (weights.dims() == 1 && weights.dim_size(0) == total),
                absl::InvalidArgumentError("weights must have the shape of values " +
                                           values.shape().DebugString() + ", got " +
                                           weights.shape().DebugString()));
    int64_t batch = 0;
    if (sparse_) {
      OP_REQUIRES(context, segments.dims() == 2 && segments.dim_size(0) == total && segments.dim_size(1) == 2 &&
                               batch_tensor.NumElements() == 1,
                  absl::InvalidArgumentError("sparse bags take indices [N][2] and a row count"));
      batch = batch_tensor.flat<int64_t>()(0);
    } else {
      OP_REQUIRES(context, segments.dims() == 1 && segments.dim_size(0) >= 1,
                  absl::InvalidArgumentError("row_splits must be 1-D with B + 1 >= 1 entries"));
      batch = segments.dim_size(0) - 1;
      const auto splits = segments.flat<int64_t>();
      bool valid = splits(0) == 0 && splits(batch) == total;
      for (int64_t b = 0; valid && b < batch; ++b) valid = splits(b) <= splits(b + 1);
      OP_REQUIRES(context, valid,
                  absl::InvalidArgumentError("row_splits must start at 0, never decrease and end at len(values)"));
    }
    OP_REQUIRES(context, batch >= 0, absl::InvalidArgumentError("a negative row count"));
    const int64_t vocab = table.dim_size(0), dim = table.dim_size(1);
    const float* weight_data = weighted_ ? weights.flat<float>().data() : nullptr;

    std::vector<int64_t> offsets;
    std::vector<int32_t> kept32;
    std::vector<int64_t> kept64;
    std::vector<float> kept_weights;
    bool pruned = false;
    const bool wide = values.dtype() == tensorflow::DT_INT64;
    if (wide) {
      PruneAndCount<int64_t>(context, sparse_, prune_ids_, prune_weights_, values, segments, batch, weight_data,
                             &kept64, &kept_weights, &offsets, &pruned);
    } else {
      PruneAndCount<int32_t>(context, sparse_, prune_ids_, prune_weights_, values, segments, batch, weight_data,
                             &kept32, &kept_weights, &offsets, &pruned);
    }
    if (!context->status().ok()) return;
    const void* ids = pruned ? (wide ? static_cast<const void*>(kept64.data()) : kept32.data()) : values.data();
    const int64_t kept_total = pruned ? (wide ? int64_t(kept64.size()) : int64_t(kept32.size())) : total;
    static const float kNoWeight = 0.0f;  // any valid address, unread when unweighted
    const void* kernel_weights = weighted_ ? (pruned ? static_cast<const void*>(kept_weights.data())
                                                     : static_cast<const void*>(weight_data))
                                           : &kNoWeight;
    if (kernel_weights == nullptr) kernel_weights = &kNoWeight;  // an empty weights tensor

    OP_REQUIRES_OK(context, CheckOutputFits(batch, dim, table.dtype()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, dim}), &out));
    if (out->NumElements() == 0) return;
    if (g_poison_outputs.load()) Poison(out);

    const BagLauncher launch = g_bag_launcher.load();
    const int format = FormatOf(table.dtype());
    const int64_t id_bytes = wide ? 8 : 4;
    int64_t first_bad = kept_total;
    if (launch != nullptr && format >= 0) {
      first_bad = launch(table.data(), vocab, dim, format, ids, id_bytes, kept_total, offsets.data(), batch,
                         kernel_weights, weighted_, pooling_, g_team_size.load(), g_serial_only.load(),
                         out->data());
    } else {
      ForTypes(table.dtype(), values.dtype(), [&](auto table_tag, auto id_tag) {
        using T = decltype(table_tag);
        using Id = decltype(id_tag);
        first_bad = BagsPooled(context, static_cast<const T*>(table.data()), vocab, dim, static_cast<const Id*>(ids),
                               kept_total, offsets.data(), batch,
                               weighted_ ? static_cast<const float*>(kernel_weights) : nullptr, pooling_,
                               static_cast<T*>(out->data()));
      });
    }
    if (first_bad < kept_total) {
      const int64_t id = wide ? static_cast<const int64_t*>(ids)[first_bad]
                              : int64_t{static_cast<const int32_t*>(ids)[first_bad]};
      // The bag with ids that holds it (not an empty one ending at the same offset).
      int64_t bag = 0;
      while (bag + 1 < batch && offsets[bag + 1] <= first_bad) ++bag;
      context->SetStatus(absl::InvalidArgumentError(Message(
          g_bag_bad_id_message, {{"{id}", id}, {"{position}", first_bad}, {"{bag}", bag}, {"{vocab}", vocab}})));
    }
  }

 private:
  int pooling_ = 0;
  bool weighted_ = false, sparse_ = false, prune_ids_ = false, prune_weights_ = false;
};

}  // namespace

REGISTER_OP("FusedEmbeddingBag")
    .Input("table: T")
    .Input("values: Tid")
    .Input("segments: int64")
    .Input("batch: int64")
    .Input("weights: float")
    .Output("out: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tid: {int32, int64}")
    .Attr("pooling: int")
    .Attr("weighted: bool = false")
    .Attr("sparse: bool = false")
    .Attr("prune_ids: bool = false")
    .Attr("prune_weights: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle table;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &table));
      c->set_output(0, c->Matrix(c->UnknownDim(), c->Dim(table, 1)));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("FusedEmbeddingBag").Device(tensorflow::DEVICE_CPU), FusedEmbeddingBagOp);

REGISTER_OP("FusedEmbeddingMean")
    .Input("table: T")
    .Input("ids: Tid")
    .Output("out: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tid: {int32, int64}")
    .Attr("mask_zero: bool = false")
    .Attr("axis: int = 1")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle table, ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &table));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &ids));
      int axis = 1;
      TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
      c->set_output(0, c->Matrix(c->Dim(ids, 0), axis == 1 ? c->Dim(table, 1) : c->Dim(ids, 1)));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("FusedEmbeddingMean").Device(tensorflow::DEVICE_CPU),
                        FusedEmbeddingMeanOp);

REGISTER_OP("FusedEmbeddingMeanOfRows")
    .Input("row_means: float")
    .Input("ids: Tid")
    .Output("out: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tid: {int32, int64}")
    .Attr("mask_zero: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle means, ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &means));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &ids));
      c->set_output(0, c->input(1));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("FusedEmbeddingMeanOfRows").Device(tensorflow::DEVICE_CPU),
                        FusedEmbeddingMeanOfRowsOp);

extern "C" {

// Called once by tf_compiled.py after loading this library, before any op is built.
// formats: count pairs (DataType enum, the kernels' format code). output_check is
// asked about every output of check_min_bytes bytes or more.
int fused_embedding_configure(Launcher launcher, int64_t team_size, const char* bad_id_message,
                              int count, const int* dtypes, const int* formats,
                              OutputCheck output_check, int64_t check_min_bytes) {
  for (int i = 0; i < kDataTypes; ++i) g_formats[i].store(-1);
  for (int i = 0; i < count; ++i) {
    if (dtypes[i] < 0 || dtypes[i] >= kDataTypes) return -1;
    g_formats[dtypes[i]].store(formats[i]);
  }
  {
    std::lock_guard<std::mutex> lock(g_message_mutex);
    g_bad_id_message = bad_id_message;
  }
  g_team_size.store(team_size);
  g_check_min_bytes.store(check_min_bytes);
  g_output_check.store(output_check);
  g_launcher.store(launcher);
  return 0;
}

// Called once by tf_compiled.py after fused_embedding_configure: the bags op's launcher and
// its messages (c_interface.CONFIGURE_BAGS says which fields each has).
int fused_embedding_configure_bags(BagLauncher launcher, const char* bad_id_message, const char* order_message,
                                   const char* row_message) {
  {
    std::lock_guard<std::mutex> lock(g_message_mutex);
    g_bag_bad_id_message = bad_id_message;
    g_order_message = order_message;
    g_row_message = row_message;
  }
  g_bag_launcher.store(launcher);
  return 0;
}

// A process forked from one that ran GNU OpenMP can't start a thread team
// (backends/cpu.py): the launcher then runs the kernels on the calling thread.
void fused_embedding_set_serial_only(int64_t serial_only) { g_serial_only.store(serial_only); }

// For tests: when enabled, every output is filled with value before the kernel runs,
// so an element the kernel fails to write shows.
void fused_embedding_poison_outputs(int enabled, float value) {
  g_poison_value.store(value);
  g_poison_outputs.store(enabled != 0);
}

}  // extern "C"
