"""The README's Python blocks run as written, and what they promise holds."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 1


# The README's update counts, cut tenfold here: the test is that the code runs as written
# and each stage trains, not that 300 updates make a good teacher.
SHORTER = {"steps_per_epoch=300": "steps_per_epoch=30",
           "updates_per_stage=100": "updates_per_stage=10"}


@pytest.mark.slow
def test_readme_python_blocks_run_and_the_second_stage_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "\n".join(_python_blocks())
    for long, short in SHORTER.items():
        assert code.count(long) == 1, f"the README no longer says {long}: update SHORTER"
        code = code.replace(long, short)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  our own README
    students = namespace["students"]
    assert [s.num_steps for s in students] == [8, 4]
    # The second stage moved the weights away from its teacher (the first student):
    # a stage that started with a learning rate already decayed to 0 would not.
    first, second = (s.network.get_weights() for s in students)
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(first, second))
    assert change > 1e-4
    assert namespace["fast"].shape == (16, 16, 16, 1)
    assert os.path.exists(tmp_path / "student_4steps.keras")


def test_compiled_keras_file_loads_in_a_fresh_process(tmp_path):
    """A compiled model's `.keras` file names our learning-rate schedule; a fresh process
    loads it after `import keras_progdist`, in safe mode, without custom_objects."""
    path = str(tmp_path / "compiled.keras")
    make = (
        "import keras_progdist\n"
        "from keras_progdist import DiffusionModel, UNet\n"
        "from keras_progdist.optimizers import make_optimizer\n"
        "m = DiffusionModel(UNet((8, 8, 1), channels=8, channel_mult=(1,),\n"
        "    num_res_blocks=1, attention_resolutions=(), num_groups=4), ema_decay=None,\n"
        "    num_steps=2)\n"
        "m.compile(optimizer=make_optimizer(1e-3, decay_to_zero_steps=10))\n"
        "m.optimizer.build(m.trainable_variables)\n"
        f"m.save({path!r})\n")
    load = (
        "import keras, keras_progdist\n"
        f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
        "print(type(m.optimizer.learning_rate).__name__ if False else\n"
        "      type(m.optimizer._learning_rate).__name__, m.num_steps)\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    for code in (make, load):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["LinearToZero", "2"]
