"""The restricted unpickler of TorchScript's `data.pkl`: what a pickle may name, and the
numpy stand-ins it gets.

The standard unpickler would import and call whatever the pickle names, so a crafted
`.pt` could run `os.system`. `RestrictedUnpickler` admits only the globals listed in
`ALLOWED_GLOBALS` (tensor rebuilders, storage types, the TorchScript list tags,
`collections.OrderedDict`) plus `__torch__.*` class names, which become inert
`TorchScriptObject` placeholders that only record their state; every other global is
refused with `UnsafePickleError`. It may only fill in `__torch__` objects (`BUILD`): the
allowed globals are shared by every load, so a file that set attributes on them would
change the reader for the rest of the process. A tensor may not hold more elements than
its storage (a stride-0 view of 750M elements read from a 599-byte file).

Reading the archive around the pickle (records, sizes, byte order) is
`torchscript_reader`'s job; it gives the unpickler the `load_storage` that reads them.
"""

from __future__ import annotations

import collections
import math
import pickle
import re

import numpy as np

from keras_progdist.errors import KerasProgdistError


class TorchScriptReadError(KerasProgdistError, ValueError):
    """The file is not a TorchScript archive this reader understands."""


class UnsafePickleError(pickle.UnpicklingError, TorchScriptReadError):
    """The pickle names a global that is not on the allow-list."""


class StorageType:
    """Stands for a `torch.<Type>Storage` class: the numpy dtype of its elements.

    Immutable: the instances in `ALLOWED_GLOBALS` serve every load in the process.
    """

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(dtype))

    def __setattr__(self, key, value):
        raise AttributeError(f"StorageType is immutable (tried to set {key!r})")

    def __repr__(self):
        return f"StorageType(torch.{self.name})"


# torch.<Name>Storage -> element dtype (little-endian; see `_byteorder`). bfloat16 and the
# quantized/complex-half types have no numpy equivalent and are refused by omission.
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexDoubleStorage": "c16",
    "ComplexFloatStorage": "c8",
}


class TorchScriptObject:
    """Inert stand-in for an object of a TorchScript class (`__torch__.*`).

    Unpickling creates it with `NEWOBJ` and fills it with `BUILD`; it keeps the
    state and does nothing else, so naming one in a pickle runs no code.

    Attributes:
        torch_type: the qualified TorchScript class name, e.g.
            `"__torch__.inceptionv3.Conv2dLayer"`.
        state: the pickled state (a dict of attribute name -> value for modules).
        args: constructor arguments, if the pickle passed any (TorchScript passes none).
    """

    torch_type = "__torch__"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __setstate__(self, state):
        # Recorded, never interpreted: the attribute names come from an untrusted file,
        # so they must not shadow this object's own attributes.
        self.state = state

    def __repr__(self):
        return f"<{self.torch_type}>"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """numpy equivalent of `torch._utils._rebuild_tensor_v2`: a strided view, copied.

    Args:
        storage: 1-D numpy array of the storage's elements.
        storage_offset: first element of the tensor in the storage.
        size: the tensor's shape.
        stride: element strides, one per dimension.
        requires_grad, backward_hooks, metadata: autograd details, ignored.

    Returns:
        A C-contiguous numpy array that owns its data.

    Raises:
        TorchScriptReadError: the view would reach outside the storage.
    """
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise TorchScriptReadError(f"tensor storage is {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(
            isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
        raise TorchScriptReadError(f"bad tensor layout: offset {storage_offset}, "
                                   f"size {size}, stride {stride}")
    # A view with more elements than its storage (stride 0, overlapping strides) is
    # an expanded tensor, which state dicts do not hold; copied out it would take
    # memory the file never paid for.
    if math.prod(size) > storage.size:
        raise TorchScriptReadError(
            f"tensor of size {size} has {math.prod(size)} elements, more than its "
            f"{storage.size}-element storage")
    # as_strided reads raw memory: check the last element is inside the storage first.
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise TorchScriptReadError(
                f"tensor of size {size}, stride {stride}, offset {storage_offset} "
                f"reaches element {last} of a {storage.size}-element storage")
        view = np.lib.stride_tricks.as_strided(
            storage[storage_offset:], shape=size,
            strides=[s * storage.itemsize for s in stride], writeable=False)
    else:
        view = np.empty(size, storage.dtype)
    return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """numpy equivalent of the older `torch._utils._rebuild_tensor`."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """numpy equivalent of `torch._utils._rebuild_parameter`: the data itself."""
    del requires_grad, backward_hooks
    return data


def _identity(value):
    return value


def _restore_type_tag(value, type_str):
    del type_str
    return value


# (module, name) -> what the restricted unpickler hands back for it. Everything here is
# pure data plumbing; nothing reaches the file system, the interpreter or the network.
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}

_TORCH_CLASS = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]+\Z")


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles a TorchScript `data.pkl` with an allow-list of globals.

    The pure-Python unpickler (the pickle is small: the tensors' bytes are separate
    records), so that `BUILD` can be limited to `TorchScriptObject`s: on an allowed
    global (a storage type, a rebuild function, `OrderedDict`) it would set
    attributes that outlive this load.

    Args:
        file: the pickle, a binary file object.
        load_storage: called as `load_storage(key, dtype, numel)` for each
            persistent storage id; returns the storage as a 1-D numpy array.
    """

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._classes = {}

    def find_class(self, module, name):
        """The allowed object for `module.name`, or `UnsafePickleError`.

        `__torch__.*` classes map to `TorchScriptObject` subclasses (one per
        qualified name, so the type name survives); nothing is imported.
        """
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if _TORCH_CLASS.match(module) and _CLASS_NAME.match(name):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(
                    name, (TorchScriptObject,), {"torch_type": qualified})
            return self._classes[qualified]
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}' from the TorchScript pickle: "
            f"it is not a tensor, storage or TorchScript class, and loading it could "
            f"run code (allowed: {sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)} "
            f"and __torch__.* classes)")

    def load_build(self):
        """`BUILD` (set an object's state), for `TorchScriptObject`s only."""
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, TorchScriptObject):
            raise UnsafePickleError(
                f"refusing to set the state of {type(target).__name__} {target!r}: "
                "only TorchScript objects are built from a TorchScript pickle")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        """Maps `('storage', StorageType, key, location, numel)` to a numpy array."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptReadError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise TorchScriptReadError(f"persistent id {pid!r} does not name a storage type")
        if not (isinstance(key, str) and _STORAGE_KEY.match(key)) or not (
                isinstance(numel, int) and numel >= 0):
            raise TorchScriptReadError(f"bad storage key or size in {pid!r}")
        return self._load_storage(key, storage_type.dtype, numel)
