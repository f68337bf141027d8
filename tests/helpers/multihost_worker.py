"""`python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT run.py-ARGS...`: one process
of a multi-process JAX run on this machine (`jax.distributed` on localhost, CPU devices),
then `bin/run.py ARGS` in it, as each host of a multi-host job would."""

import os
import runpy
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax  # noqa: E402

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                           num_processes=num_processes, process_id=process_id)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(ROOT, "bin", "run.py")] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
