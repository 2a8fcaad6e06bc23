"""fused_embedding.tf.embedding_mean against the float64 reference and Keras' own layers."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import fused_embedding.api as api  # noqa: E402
import fused_embedding.tf as fused_tf  # noqa: E402
import fused_embedding.tf_compiled as tf_compiled  # noqa: E402
from fused_embedding.backends import cpu as cpu_backend  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.semantics import BFLOAT16, Axis, output_shape  # noqa: E402
from fused_embedding.validation import POISON, assert_close, assert_close_to_framework, poisoned, random_inputs  # noqa: E402,E501

# Deliberately odd sizes: nothing a power of two.
VOCAB, DIM, BATCH, LENGTH = 123, 37, 9, 13

TF_DTYPES = {np.dtype(np.float32): tf.float32, np.dtype(np.float16): tf.float16, BFLOAT16: tf.bfloat16}


@pytest.fixture(autouse=True)
def poisoned_cpu_outputs(monkeypatch):
    """Every CPU-backend launch writes into a POISON-filled buffer, so an element it skips
    fails; the compiled TF kernel's outputs are filled with POISON too."""
    if tf_compiled.op_module() is not None:
        tf_compiled.poison_outputs(POISON)
    launch = cpu_backend.embedding_mean

    def launch_into_poison(table, ids, axis, mask_zero, out=None):
        if out is None:
            out = poisoned(output_shape(axis, ids.shape[0], ids.shape[1], table.shape[1]), table.dtype)
        else:  # the core's own (aligned) buffer: poison it in place
            out[...] = POISON
        return launch(table, ids, axis, mask_zero, out=out)

    monkeypatch.setattr(cpu_backend, "embedding_mean", launch_into_poison)
    yield
    if tf_compiled.op_module() is not None:
        tf_compiled.poison_outputs(None)


def keras_pooled(table, ids, data_format, mask_zero):
    """Keras' ``Embedding -> GlobalAveragePooling1D(data_format)`` on ``table``, as NumPy.

    For channels_first with mask_zero Keras' pooling fails (the (B, L) mask is
    broadcast against (B, L, D) on the wrong axis), so there the float64
    reference stands in; a NaN row (all padding) is Keras' 0 / 0.
    """
    if mask_zero and data_format == "channels_first":
        return embedding_mean_reference(table, ids, Axis.EMBEDDING, mask_zero=True)
    dtype = np.dtype(table.dtype).name
    embedding = keras.layers.Embedding(table.shape[0], table.shape[1], mask_zero=mask_zero, dtype=dtype)
    embedding.build((None, None))
    embedding.embeddings.assign(table)
    pooling = keras.layers.GlobalAveragePooling1D(data_format=data_format, dtype=dtype)
    return np.asarray(pooling(embedding(ids)))


# Eagerly; in a graph as this TF builds it (without a GPU: the compiled kernel for axis 1
# where it builds, numpy_function for axis 2); in a graph with the numpy_function body
# (where the compiled kernel can't be built); and in a graph built as a GPU-capable TF
# builds it for host tensors it can't place (py_function).
MODES = ["eager", "tf.function", "tf.function+numpy_function", "tf.function+py_function"]
_PATCHED_FOR_MODE = {"tf.function+numpy_function": "_uses_compiled_kernel",
                     "tf.function+py_function": "_runs_on_host"}


def run_op(mode, table, ids, input_signature=None, **kwargs):
    """The op on (table, ids) in ``mode``; a graph is traced for ``input_signature`` if given."""
    if mode == "eager":
        return fused_tf.embedding_mean(table, ids, **kwargs)
    graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i, **kwargs), input_signature=input_signature)
    if mode in _PATCHED_FOR_MODE:
        name = _PATCHED_FOR_MODE[mode]
        original = getattr(fused_tf, name)
        setattr(fused_tf, name, lambda *args: False)
        try:
            return graph_fn(table, ids)  # traced here, with the patch
        finally:
            setattr(fused_tf, name, original)
    return graph_fn(table, ids)


def runs_compiled_kernel(mode, axis=1) -> bool:
    """True where run_op(mode, ...) runs the compiled TF kernel rather than the core op."""
    return (mode == "tf.function" and axis == 1 and tf_compiled.op_module() is not None
            and not tf.config.list_logical_devices("GPU"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("mask_zero", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("axis", [1, 2])
def test_op_matches_reference(rng, axis, mask_zero, id_dtype, table_dtype, mode):
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, table_dtype, id_dtype,
                               padding_fraction=0.3 if mask_zero else 0.0)
    if mask_zero:
        ids[0] = 0  # an all-padding bag: zeros, not NaN
    table_tensor = tf.constant(table, dtype=TF_DTYPES[np.dtype(table_dtype)])
    out = run_op(mode, table_tensor, tf.constant(ids), axis=axis, mask_zero=mask_zero)
    assert out.dtype == TF_DTYPES[np.dtype(table_dtype)]
    assert tuple(out.shape) == output_shape(Axis(axis), BATCH, LENGTH, DIM)
    assert_close(np.asarray(out), embedding_mean_reference(table, ids, axis, mask_zero), table_dtype)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("mask_zero", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_op_matches_keras(rng, data_format, mask_zero, table_dtype):
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, table_dtype,
                               padding_fraction=0.3 if mask_zero else 0.0)
    axis = 1 if data_format == "channels_last" else 2
    out = run_op("tf.function", tf.constant(table), tf.constant(ids), axis=axis, mask_zero=mask_zero)
    # Judged against Keras' own error (it pools float16 in float16), not a fixed tolerance.
    assert_close_to_framework(np.asarray(out), keras_pooled(table, ids, data_format, mask_zero),
                              embedding_mean_reference(table, ids, axis, mask_zero), table_dtype)


def test_empty_bags_and_empty_batch(rng):
    table, ids = random_inputs(rng, VOCAB, DIM, 3, LENGTH)
    ids[1] = 0
    out = fused_tf.embedding_mean(table, ids, mask_zero=True)
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)  # Keras: NaN
    assert fused_tf.embedding_mean(table, np.zeros((0, LENGTH), np.int32)).shape == (0, DIM)
    assert fused_tf.embedding_mean(table, np.zeros((3, 0), np.int32), axis=2).shape == (3, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("id_shape", [(0, LENGTH), (3, 0)], ids=["no-bags", "empty-bags"])
def test_empty_inputs_in_every_form(rng, mode, id_shape):
    """No bags: a (0, D) result; bags of no ids: zeros (every element written, over the poison)."""
    table, _ = random_inputs(rng, VOCAB, DIM, 1, 1)
    out = run_op(mode, tf.constant(table), tf.constant(np.zeros(id_shape, np.int32)))
    assert tuple(out.shape) == (id_shape[0], DIM)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("axis,expected", [(1, [None, DIM]), (2, [None, LENGTH])])
def test_static_output_shape_in_graphs(axis, expected):
    """Layers after the op build: the output's static shape is what the inputs know."""
    signature = [tf.TensorSpec([VOCAB, DIM], tf.float32), tf.TensorSpec([None, LENGTH], tf.int32)]
    graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i, axis=axis), input_signature=signature)
    assert graph_fn.get_concrete_function().structured_outputs.shape.as_list() == expected
    unknown = [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.int32)]
    graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i, axis=axis), input_signature=unknown)
    assert graph_fn.get_concrete_function().structured_outputs.shape.as_list() == [None, None]


class PoolWithOp(keras.layers.Layer):
    """A layer calling the op with no compute_output_shape: Keras traces call() for the shape."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def call(self, ids):
        return fused_tf.embedding_mean(self.table, ids)


def test_op_in_keras_functional_and_sequential_models(rng):
    """The static shape the op sets is what Keras infers, so the Dense after it builds."""
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    pool = PoolWithOp(table)
    dense = keras.layers.Dense(2)
    inputs = keras.Input((LENGTH,), dtype="int32")
    functional = keras.Model(inputs, dense(pool(inputs)))
    sequential = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), pool, dense])
    pooled = embedding_mean_reference(table, ids)
    expected = pooled @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy()
    for model in (functional, sequential):
        assert model.output_shape == (None, 2)
        assert_close(model.predict(ids, verbose=0), expected, np.float32)


@pytest.mark.parametrize("table_dtype,id_dtype,error,words", [
    (tf.float32, tf.float32, TypeError, "ids must be int32 or int64, got float32"),
    (tf.float64, tf.int32, TypeError, "table must be float32, float16 or bfloat16, got float64"),
])
def test_dtype_errors_when_the_graph_is_built(table_dtype, id_dtype, error, words):
    signature = [tf.TensorSpec([None, DIM], table_dtype), tf.TensorSpec([None, None], id_dtype)]
    graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i), input_signature=signature)
    with pytest.raises(error, match=words):
        graph_fn.get_concrete_function()  # tracing only: no data has run


def test_rank_and_axis_errors_when_the_graph_is_built():
    with pytest.raises(ValueError, match="ids must be 2-D"):
        tf.function(lambda t, i: fused_tf.embedding_mean(t, i)).get_concrete_function(
            tf.TensorSpec([VOCAB, DIM], tf.float32), tf.TensorSpec([None], tf.int32))
    with pytest.raises(ValueError, match="axis must be 1"):
        fused_tf.embedding_mean(np.zeros((2, 2), np.float32), np.zeros((1, 1), np.int32), axis=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [1, 2])
def test_a_table_without_columns_is_refused(mode, axis):
    """A (V, 0) table is an error in every form, though its output would be empty."""
    table, ids = tf.zeros((5, 0)), tf.constant([[99]], tf.int32)
    with pytest.raises(ValueError, match=r"at least one column \(D >= 1\), got shape \(5, 0\)"):
        run_op(mode, table, ids, axis=axis)
    if mode != "eager":  # D known only when the graph runs: refused then
        unknown = [tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.int32)]
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"at least one column \(D >= 1\)"):
            run_op(mode, table, ids, input_signature=unknown, axis=axis)


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_backend_is_a_value_error(mode):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        run_op(mode, tf.zeros((5, 3)), tf.zeros((2, 2), tf.int32), backend="fast")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", ["too_large", "negative"])
def test_bad_id_is_a_tf_error_naming_it(rng, bad, mode):
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    ids[4, 7] = VOCAB + 5 if bad == "too_large" else -3
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        run_op(mode, tf.constant(table), tf.constant(ids))
    assert f"id {ids[4, 7]} at ids[4, 7] is out of range for a table of {VOCAB} rows" in info.value.message


@pytest.mark.parametrize("mode", MODES)
def test_table_reaches_the_core_without_a_copy(monkeypatch, rng, mode):
    """The core sees the variable's own buffer: np.asarray, never tensor.numpy()."""
    if runs_compiled_kernel(mode):
        pytest.skip("the compiled kernel is handed the tensor's buffer by TF, with no Python in "
                    "between (its zero-copy figure: benchmarks/bench_tf_zero_copy.py)")
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    variable = tf.Variable(table)
    seen = []
    core = api._embedding_mean  # what the op calls

    def spy(table_array, ids_array, *args, **kwargs):
        seen.append(table_array.ctypes.data)
        return core(table_array, ids_array, *args, **kwargs)

    monkeypatch.setattr(api, "_embedding_mean", spy)
    run_op(mode, variable, tf.constant(ids))
    assert seen == [np.asarray(variable.value()).ctypes.data]


def expected_table_gradient(table, ids, upstream, axis, mask_zero):
    """float64 d(sum(out * upstream))/d(table): each gathered row gets its share of the mean."""
    counted = np.ones(ids.shape) if not mask_zero else (ids != 0).astype(np.float64)  # [B][L]
    grad = np.zeros(table.shape)
    if axis == 1:
        weights = counted / np.maximum(counted.sum(axis=1, keepdims=True), 1)         # [B][L]
        np.add.at(grad, ids, weights[..., None] * upstream[:, None, :])
    else:
        np.add.at(grad, ids, np.broadcast_to((counted * upstream / table.shape[1])[..., None],
                                             ids.shape + (table.shape[1],)))
    return grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("mask_zero", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("axis", [1, 2])
def test_table_gradient_is_correct(rng, axis, mask_zero, table_dtype, mode):
    """Under GradientTape the table gets the true gradient (IndexedSlices), never None."""
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, table_dtype,
                               padding_fraction=0.3 if mask_zero else 0.0)
    ids[1] = 0  # repeated ids, and under the mask an all-padding bag
    variable = tf.Variable(table)
    upstream = rng.standard_normal(output_shape(Axis(axis), BATCH, LENGTH, DIM)).astype(table_dtype)

    def loss_and_gradient():
        with tf.GradientTape() as tape:
            out = fused_tf.embedding_mean(variable, ids, axis=axis, mask_zero=mask_zero)
            loss = tf.reduce_sum(tf.cast(out, tf.float32) * tf.cast(upstream, tf.float32))
        return tape.gradient(loss, variable)

    grad = loss_and_gradient() if mode == "eager" else tf.function(loss_and_gradient)()
    assert isinstance(grad, tf.IndexedSlices)
    dense = np.asarray(tf.convert_to_tensor(grad))
    assert dense.dtype == table_dtype
    # TF sums the slices of a repeated id in the table's dtype (as for Keras' own
    # Embedding): in float16 that is Keras-sized error, hence Keras' tolerance.
    against = "reference" if table_dtype == np.float32 else "keras"
    assert_close(dense, expected_table_gradient(table, ids, upstream.astype(np.float64), axis, mask_zero),
                 table_dtype, against=against)


def test_gpu_path_is_not_taken_for_host_tensors():
    assert not fused_tf._is_gpu_tensor(tf.constant([1.0]))


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"),
                    reason="needs TensorFlow with a GPU (and CuPy): the DLPack path cannot run here")
def test_gpu_tensors_go_through_dlpack(rng):
    pytest.importorskip("cupy")
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    with tf.device("GPU:0"):
        table_gpu = tf.constant(table)
    out = fused_tf.embedding_mean(table_gpu, tf.constant(ids))  # int32 ids: kept on the host by TF
    assert "GPU" in out.device
    assert_close(np.asarray(out.cpu()), embedding_mean_reference(table, ids), np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("update", ["assign", "assign_sub", "scatter_update"])
def test_updated_variable_is_seen_on_axis_2(rng, update, mode):
    """Axis 2 reuses cached row means of a TF table: an updated variable must not get stale ones."""
    from fused_embedding import row_mean_cache
    row_mean_cache.clear()
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    variable = tf.Variable(table)
    op = lambda i: run_op(mode, variable, i, axis=2)  # noqa: E731
    # The first call on a buffer pins it; the second builds the means from it and uses them.
    for _ in range(2):
        assert_close(np.asarray(op(ids)), embedding_mean_reference(table, ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 1, "the variable's row means were not cached"
    new_rows = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    if update == "assign":
        variable.assign(new_rows)
    elif update == "assign_sub":
        variable.assign_sub(table - new_rows)
    else:
        variable.scatter_update(tf.IndexedSlices(new_rows, tf.range(VOCAB)))
    for _ in range(2):  # the new buffer pinned, then its means built and used
        assert_close(np.asarray(op(ids)), embedding_mean_reference(new_rows, ids, 2), np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=lambda d: np.dtype(d).name)
def test_large_results_go_back_to_tf_without_a_copy(monkeypatch, rng, mode, table_dtype):
    """A result of ALIGNED_OUTPUT_MIN_BYTES or more starts on a 64-byte line and TF takes
    its buffer as it is: from a numpy_function body any dtype, through DLPack (eagerly,
    or from a py_function body) float32 and float16 (NumPy can't export bfloat16 there,
    so TF copies it). TF's kernels, which abort on unaligned data, then run on it."""
    if runs_compiled_kernel(mode):
        pytest.skip("TF allocates the compiled kernel's output itself")
    from fused_embedding.memory import ALIGNED_OUTPUT_MIN_BYTES
    results, bodies = [], []
    core, host_body, hand_over = api._embedding_mean, fused_tf._run_core_on_host_arrays, fused_tf._host_result

    def core_spy(*args, **kwargs):
        results.append(core(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(api, "_embedding_mean", core_spy)
    monkeypatch.setattr(fused_tf, "_run_core_on_host_arrays",
                        lambda *args: bodies.append("numpy_function") or host_body(*args))
    monkeypatch.setattr(fused_tf, "_host_result", lambda out: bodies.append("dlpack") or hand_over(out))
    dim = 64
    batch = ALIGNED_OUTPUT_MIN_BYTES // (dim * np.dtype(table_dtype).itemsize) + 3
    table, ids = random_inputs(rng, 500, dim, batch, 5, table_dtype)
    out = run_op(mode, tf.constant(table), tf.constant(ids))
    (result,), (body,) = results, bodies
    assert result.ctypes.data % fused_tf.TF_ALIGNMENT_BYTES == 0
    if mode == "eager":
        assert body == "dlpack"
    shares = np.shares_memory(np.asarray(out), result)
    assert shares == (body == "numpy_function" or np.dtype(table_dtype) != BFLOAT16)
    expected = embedding_mean_reference(table, ids, Axis.SEQUENCE, mask_zero=False)
    del result, results[:]
    total = tf.reduce_sum(tf.cast(out, tf.float32), axis=0)  # a TF kernel on the handed-over buffer
    assert_close(np.asarray(tf.cast(out, tf.float32)), expected, table_dtype)
    np.testing.assert_allclose(np.asarray(total), expected.sum(axis=0), rtol=1e-2, atol=1e-2 * batch)


@pytest.mark.parametrize("axis", [1, 2])
def test_graph_op_kinds(rng, axis):
    """Without a GPU: the compiled kernel for axis 1 (numpy_function where it can't be
    built), numpy_function for axis 2; a GPU-capable TF keeps py_function (DLPack)."""
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    graph = tf.function(lambda t, i: fused_tf.embedding_mean(t, i, axis=axis)).get_concrete_function(
        tf.constant(table), tf.constant(ids)).graph
    kinds = {op.type for op in graph.get_operations()} & {"PyFunc", "EagerPyFunc", "FusedEmbeddingMean"}
    if tf.config.list_logical_devices("GPU"):
        expected = "EagerPyFunc"
    elif axis == 1 and tf_compiled.op_module() is not None:
        expected = "FusedEmbeddingMean"
    else:
        expected = "PyFunc"
    assert kinds == {expected}


def test_only_aligned_results_are_handed_over():
    """TF aborts on a buffer off its alignment: such a result, however large, is returned
    as an array for TF to copy; an aligned one comes back as a tensor on the same buffer."""
    from fused_embedding.memory import ALIGNED_OUTPUT_MIN_BYTES, empty_aligned
    count = ALIGNED_OUTPUT_MIN_BYTES // 4 + 64
    aligned = empty_aligned((count,), np.float32)
    aligned[...] = 1.0
    off_by_16 = empty_aligned((count + 4,), np.float32)[4:]
    off_by_16[...] = 1.0
    handed = fused_tf._host_result(aligned)
    assert isinstance(handed, tf.Tensor) and np.shares_memory(np.asarray(handed), aligned)
    assert fused_tf._host_result(off_by_16) is off_by_16
    small = np.zeros(16, np.float32)
    assert fused_tf._host_result(small) is small
    assert float(tf.reduce_sum(handed)) == count  # a TF kernel reads the handed-over buffer


needs_compiled_kernel = pytest.mark.skipif(
    "tf_compiled.op_module() is None", reason="the compiled TF kernel can't be built here (see test_compiled_kernel_builds_where_a_compiler_is)")


def test_compiled_kernel_builds_where_a_compiler_is():
    """With a C++ compiler on PATH the compiled kernel must load: a silent fallback to the
    Python body would hide a broken build."""
    if tf_compiled._compiler() is None:
        pytest.skip("no C++ compiler on PATH: the op runs its numpy_function body here")
    assert tf_compiled.unavailable_reason() is None


@needs_compiled_kernel
def test_compiled_kernel_outputs_are_poisoned_in_these_tests(rng):
    """With a launcher that writes nothing, the op's result is the poison: so every test
    here that passes on the compiled path saw each element written by the kernel."""
    from numba import cfunc
    from fused_embedding.backends.cpu_cfunc import SIGNATURE

    @cfunc(SIGNATURE)
    def writes_nothing(table, vocab, dim, fmt, ids, id_bytes, batch, length, mask_zero,
                       team_size, serial_only, out):
        return batch * length

    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH)
    tf_compiled._configure(tf_compiled._library, launcher_address=writes_nothing.address)
    try:
        out = run_op("tf.function", tf.constant(table), tf.constant(ids))
    finally:
        tf_compiled._configure(tf_compiled._library)
    np.testing.assert_array_equal(np.asarray(out), np.float32(POISON))
    assert_close(np.asarray(run_op("tf.function", tf.constant(table), tf.constant(ids))),
                 embedding_mean_reference(table, ids), np.float32)
