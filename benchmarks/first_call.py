"""The first call of a model in a fresh process: unfused Keras vs fused, after `fused-embedding build`.

    python benchmarks/first_call.py --cache-dir DIR   # DIR: what `fused-embedding build --cache-dir DIR` wrote

Each figure from its own fresh process, TensorFlow imported and the model built before the
clock starts: Embedding -> GlobalAveragePooling1D (V=100,000, D=64, B=256, L=32), its
first call eagerly and then in a fresh tf.function, and the same for `fuse(model)`.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np, tensorflow as tf, keras
from fused_embedding.keras import fuse
inputs = keras.Input((32,), dtype="int32")
model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(100_000, 64)(inputs)))
if sys.argv[1] == "fused":
    model = fuse(model)
ids = tf.constant(np.random.default_rng(0).integers(0, 100_000, (256, 32)), tf.int32)
t0 = time.perf_counter(); model(ids); eager = time.perf_counter() - t0
graph = tf.function(model)
t0 = time.perf_counter(); graph(ids); traced = time.perf_counter() - t0
print(json.dumps(dict(eager_ms=eager * 1e3, tf_function_ms=traced * 1e3)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(args.cache_dir, "numba"),
               FUSED_EMBEDDING_CACHE_DIR=os.path.join(args.cache_dir, "tf-op"))
    for kind in ("unfused", "fused"):
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True,
                                  text=True, check=True)
            print(kind, done.stdout.strip().splitlines()[-1],
                  "(compiled on first use)" if "is compiling" in done.stderr or "building" in done.stderr else "")


if __name__ == "__main__":
    main()
