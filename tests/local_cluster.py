"""An in-process TensorFlow cluster on localhost: 2 parameter servers and 1 worker
(``tf.distribute.Server`` on ports from ``portpicker``), this process the coordinator of
a ``ParameterServerStrategy``. Every address in the cluster spec is 127.0.0.1, so all the
traffic stays on the loopback interface; TF's gRPC servers still listen on every
interface (they bind ``*:port``, with no option to narrow it) while the process lives.

Connecting to a cluster changes the process's eager context for good, and TF's
in-process servers cannot be stopped: start it in a process of its own (the tests'
job scripts, the benchmark), which takes the servers with it when it exits.

The strategy's ``variable_partitioner`` is ``SwitchablePartitioner``: the tests make
one table with each of TF's partitioners (Fixed / MinSize / MaxSize) on the one
cluster, choosing the partitioner before each variable is made.
"""
from __future__ import annotations

import contextlib


class SwitchablePartitioner:
    """A ``variable_partitioner`` that delegates to ``self.current`` (a TF partitioner, or
    None: one shard). Set it with ``using(partitioner)`` around a variable's creation."""

    def __init__(self, current=None):
        self.current = current

    def __call__(self, shape, dtype, axis=0):
        if self.current is None:
            return [1] * len(shape)
        return self.current(shape, dtype, axis)

    @contextlib.contextmanager
    def using(self, partitioner):
        previous, self.current = self.current, partitioner
        try:
            yield
        finally:
            self.current = previous


def start(num_ps: int = 2, num_workers: int = 1, partitioner=None):
    """(strategy, coordinator, partitioner): the cluster started in this process on
    localhost ports, a ParameterServerStrategy over it whose variable_partitioner is
    ``partitioner`` (default: a SwitchablePartitioner making one shard), and its
    ClusterCoordinator. The cluster's addresses are 127.0.0.1 ports."""
    import portpicker
    import tensorflow as tf

    partitioner = SwitchablePartitioner() if partitioner is None else partitioner
    ports = {"worker": [portpicker.pick_unused_port() for _ in range(num_workers)],
             "ps": [portpicker.pick_unused_port() for _ in range(num_ps)]}
    spec = tf.train.ClusterSpec({job: [f"127.0.0.1:{port}" for port in job_ports]
                                 for job, job_ports in ports.items()})
    start.servers = [tf.distribute.Server(spec, job_name=job, task_index=i, protocol="grpc", start=True)
                     for job, job_ports in ports.items() for i in range(len(job_ports))]  # kept alive
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    return strategy, tf.distribute.coordinator.ClusterCoordinator(strategy), partitioner
