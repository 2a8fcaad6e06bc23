"""Served SavedModels of a text-classifier-like Keras model, four forms timed in one run.

    python benchmarks/bench_saved_models.py [--rounds 30] [--vocab 1000000] [--no-mask] [--workdir DIR]

The model: ``Embedding(V, D, mask_zero=True) -> GlobalAveragePooling1D -> Dense(4)`` (with
``--no-mask``: ``mask_zero=False``, the ids' zeros then an ordinary row), the same weights in
every form, each exported in its own fresh process:

- ``keras export``: stock Keras' ``model.export`` (no fused_embedding in that process);
- ``converted``: that SavedModel rewritten by ``python -m fused_embedding convert`` (its
  output printed);
- ``fused export``: ``fused_embedding.keras.fuse(model).export(dir)``, the default form
  (the compiled ``FusedEmbeddingMean`` op in the graph);
- ``fused export, native_ops()``: the same fused model exported inside
  ``fused_embedding.tf.native_ops()``, the portable twin that loads with TF alone.

All four are reloaded in this process (after ``fused_embedding.tf.load_ops()``) and their
``serve`` signatures timed at B=1024, L=64, D=128, float32: one call of each per round, in a
fresh random order each round, each round on the next of several id sets (10% padding, one
real id per bag) so no call reuses the previous one's cached rows. Prints medians (p20/p80)
and the two ratios the package promises (converted / keras export, fused export / its
native twin, each >= 3x), with the machine, date and load, as a markdown block for RESULTS.md.

Bytes per call (the pooling's, fused_embedding.bytes_model): ids B*L*4 + rows B*L*D*4 + out B*D*4.
Memory: four copies of the 512 MB table (one per SavedModel, loaded), plus the converter's
own loads while it checks (transient).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fused_embedding.cli import cpu_model  # the machine's name, as the bench prints it
from interleaved import add_shape_arguments, print_medians, time_interleaved  # benchmarks/interleaved.py

import numpy as np

EXPORT = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np, keras

vocab, dim, mask_zero, form, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
ids = keras.Input(shape=(None,), dtype="int32", name="ids")
x = keras.layers.Embedding(vocab, dim, mask_zero=mask_zero, name="embedding")(ids)
x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
model = keras.Model(ids, keras.layers.Dense(4, name="logits")(x))
rng = np.random.default_rng(0)
model.get_layer("embedding").set_weights([rng.standard_normal((vocab, dim), dtype=np.float32)])
model.get_layer("logits").set_weights([rng.standard_normal((dim, 4), dtype=np.float32),
                                       np.zeros(4, np.float32)])
if form == "keras":
    model.export(out, verbose=False)
    assert "fused_embedding" not in sys.modules
else:
    import fused_embedding.keras, fused_embedding.tf
    fused = fused_embedding.keras.fuse(model)
    if form == "fused":
        fused.export(out, verbose=False)
    else:
        with fused_embedding.tf.native_ops():
            fused.export(out, verbose=False)
"""

# (name, form exported by EXPORT or None for the converter's output, folder)
FORMS = [("keras export", "keras", "original"), ("converted", None, "converted"),
         ("fused export", "fused", "fused"), ("fused export, native_ops()", "native", "fused_native")]
# (faster, slower): each ratio the package promises, >= 3x
RATIOS = [("converted", "keras export"), ("fused export", "fused export, native_ops()")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--no-mask", action="store_true", help="Embedding(mask_zero=False)")
    parser.add_argument("--workdir", help="where the SavedModels go (default: a temporary folder, removed); "
                        "exports already there are reused (keep one folder per --no-mask setting), "
                        "the converter always reruns")
    args = parser.parse_args(argv)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_saved_models-"))
    folders = {name: work / folder for name, _, folder in FORMS}
    seconds = {}
    try:
        for name, form, _ in FORMS:
            started = time.perf_counter()
            if form is None:  # the converter, on the stock export
                if folders[name].exists():
                    shutil.rmtree(folders[name])
                result = subprocess.run([sys.executable, "-m", "fused_embedding", "convert",
                                         str(folders["keras export"]), str(folders[name]), "--seed", "0"],
                                        env=env, capture_output=True, text=True)
                print(result.stdout, end="")
                if result.returncode != 0:
                    print(result.stderr[-3000:], file=sys.stderr)
                    return result.returncode
            elif not folders[name].exists():
                subprocess.run([sys.executable, "-c", textwrap.dedent(EXPORT), str(args.vocab), str(args.dim),
                                "0" if args.no_mask else "1", form, str(folders[name])], check=True, env=env)
            seconds[name] = time.perf_counter() - started

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        import fused_embedding.tf as fused_tf
        fused_tf.load_ops()
        paths = {name: tf.saved_model.load(str(folder)).signatures["serve"] for name, folder in folders.items()}
        rng = np.random.default_rng(1)
        id_sets = []
        for _ in range(args.id_sets):
            ids = rng.integers(1, args.vocab, (args.batch, args.length))
            ids[:, 1:][rng.random((args.batch, args.length - 1)) < 0.1] = 0  # padding; position 0 real
            id_sets.append(tf.constant(ids.astype(np.int32)))
        # First calls (graph set-up) untimed; every form must give the stock model's outputs,
        # or its time means nothing.
        expected = paths["keras export"](ids=id_sets[0])["output_0"].numpy()
        for name, fn in paths.items():
            got = fn(ids=id_sets[0])["output_0"].numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)
        runners = {name: lambda ids, fn=fn: fn(ids=ids)["output_0"].numpy() for name, fn in paths.items()}
        times = time_interleaved(runners, id_sets, args.rounds, rng)
        load = os.getloadavg()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    bytes_per_call = args.batch * args.length * 4 + args.batch * args.length * args.dim * 4 + args.batch * args.dim * 4
    print(f"\n### SavedModels: text classifier serve, B={args.batch} L={args.length} D={args.dim} "
          f"V={args.vocab:,} float32, mask_zero={not args.no_mask}\n")
    made = ", ".join(f"{name} {seconds[name]:.0f} s" for name in seconds)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, "
          f"load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.rounds} interleaved rounds, "
          f"{args.id_sets} rotating id sets; written in fresh processes ({made})\n")
    medians = print_medians(times, bytes_per_call, "SavedModel", "serve")
    for faster, slower in RATIOS:
        ratio = medians[slower] / medians[faster]
        print(f"{faster} / {slower} speedup (medians): {ratio:.2f}x (goal >= 3x)  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
