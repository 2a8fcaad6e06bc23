"""Reading a table that TF holds, for the ops that read it in place.

TF puts a resource variable in copy-on-read mode once a sparse op has touched it
(``tf.gather`` / ``tf.nn.embedding_lookup``, a scatter update such as a sparse optimizer
step, ``model.fit`` of a Keras Embedding): from then on every dense read copies all of it,
so a fused call on a trained 512 MB table would copy 512 MB first (measured: 6.7 ms ->
54.5 ms a call after one ``tf.gather``). ``read_value_no_copy`` turns that mode off (TF's
``DisableCopyOnRead``, which copies only while another tensor still shares the buffer) and
reads the variable as it is; gradients reach the variable as through any read.
"""
from __future__ import annotations

import tensorflow as tf


def read_without_copy(table):
    """``table`` as a tensor on its own buffer: a resource variable through
    ``read_value_no_copy``, anything else through ``tf.convert_to_tensor``."""
    read = getattr(table, "read_value_no_copy", None)
    return read() if read is not None else tf.convert_to_tensor(table)
