"""The first call of a model in a fresh process: unfused Keras vs fused, after `fused-embedding build`.

    python benchmarks/first_call.py --cache-dir DIR   # DIR: what `fused-embedding build --cache-dir DIR` wrote

Each figure from its own fresh process: Embedding -> GlobalAveragePooling1D (V=100,000,
D=64, B=256, L=32), and the same model through `fuse(model)`. Two kinds of process:
"eager" calls the model eagerly, then a fresh tf.function of it (which then finds the
kernels loaded); "graph" calls only a fresh tf.function of it (a replica serving a
traced function: its first request loads everything). Besides the first calls, each
process times what comes before them, so that work moved off the first call shows where
it went: importing TensorFlow and Keras, importing fused_embedding.keras (the unfused
process imports it too, for the same footing), building the model, fusing it.
Prints every run, then the median and range of each figure, and the load average
(the machine's other jobs move every figure).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, tensorflow as tf, keras
t1 = time.perf_counter()
from fused_embedding.keras import fuse
t2 = time.perf_counter()
inputs = keras.Input((32,), dtype="int32")
model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(100_000, 64)(inputs)))
t3 = time.perf_counter()
if sys.argv[1] == "fused":
    model = fuse(model)
t4 = time.perf_counter()
figures = dict(import_tf_keras_ms=(t1 - t0) * 1e3, import_fused_embedding_ms=(t2 - t1) * 1e3,
               build_model_ms=(t3 - t2) * 1e3, fuse_ms=(t4 - t3) * 1e3)
ids = tf.constant(np.random.default_rng(0).integers(0, 100_000, (256, 32)), tf.int32)
if sys.argv[2] == "eager":
    t0 = time.perf_counter(); model(ids); figures["eager_ms"] = (time.perf_counter() - t0) * 1e3
graph = tf.function(model)
t0 = time.perf_counter(); graph(ids); figures["tf_function_ms"] = (time.perf_counter() - t0) * 1e3
print(json.dumps(figures))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(args.cache_dir, "numba"),
               FUSED_EMBEDDING_CACHE_DIR=os.path.join(args.cache_dir, "tf-op"))
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = {}
    for run in range(args.runs):  # interleaved, so that a change in load touches every kind alike
        for mode in ("eager", "graph"):
            for kind in ("unfused", "fused"):
                done = subprocess.run([sys.executable, "-c", CHILD, kind, mode], env=env,
                                      capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                compiled = "is compiling" in done.stderr or "building" in done.stderr
                print(run, mode, kind, json.dumps({k: round(v, 1) for k, v in figures.items()}),
                      "(compiled on first use)" if compiled else "")
                for name, value in figures.items():
                    results.setdefault((mode, kind, name), []).append(value)
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"\nmedian [min-max] ms of {args.runs} fresh processes each")
    for (mode, kind, name), values in results.items():
        print(f"  {mode:5} {kind:7} {name:26} {statistics.median(values):8.1f} "
              f"[{min(values):.1f}-{max(values):.1f}]")
    for mode, name in (("eager", "eager_ms"), ("eager", "tf_function_ms"), ("graph", "tf_function_ms")):
        fused = statistics.median(results[(mode, "fused", name)])
        unfused = statistics.median(results[(mode, "unfused", name)])
        print(f"  {mode} process, {name}: fused / unfused = {fused / unfused:.1f}x (medians)")


if __name__ == "__main__":
    main()
