// The TF op's compiled CPU kernel: FusedEmbeddingMean, mean over the sequence axis,
// table (V, D) + ids (B, L) -> (B, D).
//
// A Python-function op pays TF's round trip into Python on every call (0.2-0.5 ms,
// benchmarks/NOTES.md); this kernel runs inside TF's executor like its own ops, on
// TF's buffers, into an output TF allocated. It does no arithmetic itself: Python
// registers the cpu backend's launcher (a Numba C callback over the same kernels the
// core op runs, backends/cpu_cfunc.py) when it loads this library, and the kernel
// calls it. An output of 64 MiB or more is first checked against the host's memory
// (cgroup limits included) by a Python callback registered the same way, so the bound
// is defined once (memory.py) for the core op and this kernel; that call takes the
// GIL, which TF's executor does not hold (its py_function ops need it too), and costs
// well under the time such an output takes to write. Built by
// fused_embedding/tf_compiled.py on first use against the installed TF's headers.
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
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
std::string g_bad_id_message;  // with {id}, {row}, {col} and {vocab} to fill in

void Replace(std::string& text, const std::string& field, const std::string& value) {
  for (size_t at = text.find(field); at != std::string::npos; at = text.find(field, at + value.size())) {
    text.replace(at, field.size(), value);
  }
}

std::string BadIdMessage(int64_t id, int64_t row, int64_t col, int64_t vocab) {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(g_message_mutex);
    text = g_bad_id_message;
  }
  Replace(text, "{id}", std::to_string(id));
  Replace(text, "{row}", std::to_string(row));
  Replace(text, "{col}", std::to_string(col));
  Replace(text, "{vocab}", std::to_string(vocab));
  return text;
}

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

class FusedEmbeddingMeanOp : public OpKernel {
 public:
  explicit FusedEmbeddingMeanOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("mask_zero", &mask_zero_));
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
    // Before allocating: past a container's memory limit the allocation succeeds and the
    // OOM killer ends the process while the kernel writes it; past the host's, TF fails
    // with a message that doesn't say which op or why.
    int64_t out_bytes = 0;
    if (__builtin_mul_overflow(batch, dim, &out_bytes) ||
        __builtin_mul_overflow(out_bytes, int64_t{tensorflow::DataTypeSize(table.dtype())}, &out_bytes)) {
      out_bytes = INT64_MAX;
    }
    const OutputCheck check = g_output_check.load();
    if (check != nullptr && out_bytes >= g_check_min_bytes.load()) {
      char message[kMessageCapacity] = {0};
      OP_REQUIRES(context, check(batch, dim, table.dtype(), message, kMessageCapacity) == 0,
                  absl::ResourceExhaustedError(message));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, dim}), &out));
    if (out->NumElements() == 0) return;

    if (g_poison_outputs.load()) Poison(out);

    const Launcher launch = g_launcher.load();
    const int format = table.dtype() < kDataTypes ? g_formats[table.dtype()].load() : -1;
    OP_REQUIRES(context, launch != nullptr && format >= 0,
                absl::FailedPreconditionError(
                    "FusedEmbeddingMean: fused_embedding has not registered its kernels in "
                    "this process (build the op through fused_embedding.tf.embedding_mean)"));
    const int64_t id_bytes = tensorflow::DataTypeSize(ids.dtype());
    const int64_t first_bad = launch(table.data(), vocab, dim, format, ids.data(), id_bytes, batch,
                                     length, mask_zero_, g_team_size.load(), g_serial_only.load(),
                                     out->data());
    if (first_bad < batch * length) {
      const int64_t id = id_bytes == 4 ? int64_t{ids.flat<int32_t>()(first_bad)}
                                       : int64_t{ids.flat<int64_t>()(first_bad)};
      context->SetStatus(absl::InvalidArgumentError(
          BadIdMessage(id, first_bad / length, first_bad % length, vocab)));
    }
  }

 private:
  bool mask_zero_ = false;
};

}  // namespace

REGISTER_OP("FusedEmbeddingMean")
    .Input("table: T")
    .Input("ids: Tid")
    .Output("out: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("Tid: {int32, int64}")
    .Attr("mask_zero: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle table, ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &table));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &ids));
      c->set_output(0, c->Matrix(c->Dim(ids, 0), c->Dim(table, 1)));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("FusedEmbeddingMean").Device(tensorflow::DEVICE_CPU),
                        FusedEmbeddingMeanOp);

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
