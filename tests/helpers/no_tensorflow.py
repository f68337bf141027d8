"""Import this first to run as on a host without TensorFlow (the JAX GPU machine):
`import tensorflow` / `tensorflow_datasets` raise ImportError, and `find_spec` says
they are not installed. Used by tests that prove a code path needs no TensorFlow."""

import importlib.util
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets")
for _name in BLOCKED:
    sys.modules[_name] = None  # `import` of a None entry raises ImportError

_find_spec = importlib.util.find_spec


def _find_spec_without_tensorflow(name, package=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)


importlib.util.find_spec = _find_spec_without_tensorflow


def loaded_tensorflow_modules():
    """Names of TensorFlow modules that really got imported (should be none)."""
    return sorted(m for m, mod in sys.modules.items()
                  if m.split(".")[0] in BLOCKED and mod is not None)
