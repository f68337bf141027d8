"""`python two_cpu_devices.py SCRIPT ARGS...`: splits the CPU into two logical
TensorFlow devices, then runs `SCRIPT ARGS` (as `__main__`).

With `bin/run.py --strategy=mirrored` this is one process with two replicas: the same
replica ids, per-replica batches and seeds as two one-device workers of a
MultiWorkerMirroredStrategy, so the two must train the same numbers (the reference of
`tests/test_multiworker_tf.py`). The split must happen before TensorFlow initialises
its devices, hence a process of its own.
"""

import os
import runpy
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
