"""Reads the parameters of a TorchScript `.pt` file with numpy only: no torch, no code run.

A TorchScript archive (`torch.jit.save`) is a zip holding, under one top folder:

- `data.pkl`: a pickle of the module tree. Each module is an object of a class
  named `__torch__.<path>.<Class>` whose state is a dict of its attributes;
  each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, requires_grad, hooks)`, and each storage is a persistent id
  `('storage', torch.<Type>Storage, key, location, numel)`;
- `data/<key>`: the raw bytes of each storage;
- `code/__torch__/<path>.py`: the classes' TorchScript source, whose
  `__parameters__ = [...]` / `__buffers__ = [...]` lines say which tensor
  attributes are parameters and buffers (the rest are plain attributes);
- `constants.pkl`, `version`, `*.debug_pkl`: not needed for the weights.

The standard unpickler would import and call whatever the pickle names, so a
crafted `.pt` could run `os.system`. `RestrictedUnpickler` admits only the
globals listed in `ALLOWED_GLOBALS` (tensor rebuilders, storage types, the
TorchScript list tags, `collections.OrderedDict`) plus `__torch__.*` class
names, which become inert `TorchScriptObject` placeholders that only record
their state; every other global is refused with `UnsafePickleError`.

`read_state_dict(path)` then returns what `torch.jit.load(path).state_dict()`
returns (same names, same order, same bytes), as numpy arrays.

The file is untrusted input, so its memory is bounded before anything is read: only
a regular file is opened (not `/dev/zero`, a FIFO...); every record's declared size is
checked against what its use needs (a storage: `numel x itemsize`; the pickle and the
code: `MAX_RECORD_BYTES`) and the storages together against `max_bytes`, before it is
decompressed, and decompression stops at the declared size; a tensor may not hold more
elements than its storage (a stride-0 view of 750M elements read from a 599-byte
file). The pickle may only fill in `__torch__` objects (`BUILD`): the allowed globals
are shared by every load, so a file that set attributes on them would change the
reader for the rest of the process. Every failure is a `TorchScriptReadError` (or its
subclass `UnsafePickleError`).

Example:
    >>> state = read_state_dict("model.pt")
    >>> state["net.layers.conv.weight"].shape
    (32, 3, 3, 3)
"""

from __future__ import annotations

import ast
import collections
import io
import math
import os
import pickle
import re
import stat
import sys
import zipfile

import numpy as np

from keras_progdist.errors import KerasProgdistError

# The most bytes the storages of one file may hold together (the FID weights are 95 MB;
# `read_state_dict(max_bytes=...)` for larger models), and the most any other record
# (the pickle, a class's code, the byte order) may hold.
DEFAULT_MAX_BYTES = 1 << 30
MAX_RECORD_BYTES = 64 << 20


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


def _open_regular(path):
    """`path` opened for binary reading, refused unless it is a regular file (a
    device such as /dev/zero or a FIFO would be read without end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, TypeError, ValueError) as err:
        raise TorchScriptReadError(f"{path!r} cannot be opened: {err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TorchScriptReadError(f"{path!r} is not a regular file; a TorchScript "
                                   "archive is read from a regular file only")
    return os.fdopen(fd, "rb")


class TorchScriptArchive:
    """A TorchScript `.pt` opened for reading with numpy.

    Args:
        path: the `.pt` file (a regular file), or a binary file object.
        max_bytes: the most bytes its storages may hold together.

    Raises:
        TorchScriptReadError: not a regular file, not a zip, or no single
            `<folder>/data.pkl` in it.
    """

    def __init__(self, path, max_bytes=DEFAULT_MAX_BYTES):
        self._file, source = None, path
        if isinstance(path, (str, bytes, os.PathLike)):
            self._file = source = _open_regular(path)
        try:
            self._zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            if self._file is not None:
                self._file.close()
            raise TorchScriptReadError(
                f"{path} is not a TorchScript zip archive: {err}") from err
        self._budget = int(max_bytes)
        names = set(self._zip.namelist())
        roots = sorted(n[:-len("data.pkl")] for n in names
                       if n.endswith("/data.pkl") and n.count("/") == 1)
        if len(roots) != 1:
            raise TorchScriptReadError(
                f"{path}: expected one '<archive>/data.pkl' record, found {len(roots)}")
        self.prefix = roots[0]
        self._names = names
        self._storages = {}
        self._byteorder = self._read_byteorder()

    def close(self):
        """Closes the zip file."""
        self._zip.close()
        if self._file is not None:
            self._file.close()

    def _read(self, record, size):
        """The bytes of `record`, which must be exactly `size` bytes: checked against
        the zip's declared size before decompressing, and read no further, so a
        deflate bomb costs at most `size` bytes."""
        info = self._zip.getinfo(record)
        if info.file_size != size:
            raise TorchScriptReadError(
                f"record {record} declares {info.file_size} bytes, expected {size}")
        with self._zip.open(info) as f:
            data = f.read(size)
        if len(data) != size:
            raise TorchScriptReadError(f"record {record} holds {len(data)} bytes, "
                                       f"expected {size}")
        return data

    def _read_small(self, record):
        """A record that is not a storage (pickle, code, byte order), at most
        `MAX_RECORD_BYTES`."""
        size = self._zip.getinfo(record).file_size
        if size > MAX_RECORD_BYTES:
            raise TorchScriptReadError(f"record {record} declares {size} bytes, above "
                                       f"the {MAX_RECORD_BYTES} allowed")
        return self._read(record, size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_byteorder(self):
        # torch.save writes `<archive>/byteorder`; TorchScript archives have none and are
        # little-endian (the only layout torch writes them in).
        record = self.prefix + "byteorder"
        if record not in self._names:
            return "<"
        order = self._read_small(record).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise TorchScriptReadError(f"unknown byteorder record {order!r}")
        return "<" if order == "little" else ">"

    def _load_storage(self, key, dtype, numel, folder="data"):
        cache_key = (folder, key)
        if cache_key not in self._storages:
            record = f"{self.prefix}{folder}/{key}"
            if record not in self._names:
                raise TorchScriptReadError(f"storage record {record} is missing")
            size = numel * dtype.itemsize
            if size > self._budget:
                raise TorchScriptReadError(
                    f"storage {folder}/{key} of {size} bytes would take the file's "
                    f"storages past max_bytes ({self._budget} bytes left)")
            self._storages[cache_key] = self._read(record, size)
            self._budget -= size
        raw = self._storages[cache_key]
        file_dtype = dtype.newbyteorder(self._byteorder)
        if len(raw) != numel * dtype.itemsize:
            raise TorchScriptReadError(
                f"storage {folder}/{key} has {len(raw)} bytes, expected {numel} x "
                f"{dtype.itemsize}")
        # Native byte order so the arrays compare and save like torch's `.numpy()`.
        return np.frombuffer(raw, file_dtype).astype(dtype.newbyteorder("="), copy=False)

    def load_pickle(self, record="data.pkl", storage_folder="data"):
        """Unpickles one record of the archive with `RestrictedUnpickler`.

        Args:
            record: the pickle's name inside the archive folder.
            storage_folder: where its storages live (`data` for `data.pkl`,
                `constants` for `constants.pkl`).

        Returns:
            The unpickled object; modules are `TorchScriptObject`s.

        Raises:
            UnsafePickleError: the pickle names a global off the allow-list.
            TorchScriptReadError: a storage is missing or malformed.
        """
        data = self._read_small(self.prefix + record)
        unpickler = RestrictedUnpickler(
            io.BytesIO(data),
            lambda key, dtype, numel: self._load_storage(key, dtype, numel, storage_folder))
        try:
            return unpickler.load()
        except (TorchScriptReadError, pickle.UnpicklingError):
            raise
        except Exception as err:  # a malformed pickle: EOF, bad opcode, wrong arity...
            raise TorchScriptReadError(f"cannot unpickle {record}: {err!r}") from err

    def class_slots(self, torch_type):
        """The `(is_module, parameters, buffers)` that the class's code declares.

        Args:
            torch_type: e.g. `"__torch__.inceptionv3.Conv2dLayer"`.

        Returns:
            `(bool, list of names, list of names)`; a class without source in
            the archive is taken as a module without parameters or buffers.
        """
        module, _, name = torch_type.rpartition(".")
        record = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if record not in self._names:
            return False, [], []
        source = self._read_small(record).decode("utf-8")
        return _parse_class_slots(source, name)


def _parse_class_slots(source, class_name):
    """Finds `class <name>(<base>):` and its `__parameters__`/`__buffers__` lists.

    The lists are parsed with `ast.literal_eval`, so the source is never executed.
    """
    lines = source.splitlines()
    header = re.compile(rf"class {re.escape(class_name)}\((\w+)\):\s*\Z")
    for i, line in enumerate(lines):
        match = header.match(line)
        if not match:
            continue
        slots = {"__parameters__": [], "__buffers__": []}
        for body in lines[i + 1:]:
            if body and not body[0].isspace():
                break  # the next top-level statement ends the class
            stripped = body.strip()
            for slot in slots:
                if stripped.startswith(f"{slot} = "):
                    value = ast.literal_eval(stripped[len(slot) + 3:])
                    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                        raise TorchScriptReadError(f"bad {slot} in class {class_name}")
                    slots[slot] = value
        return match.group(1) == "Module", slots["__parameters__"], slots["__buffers__"]
    raise TorchScriptReadError(f"class {class_name} is not defined in its code record")


def _state_dict(archive, obj, prefix, out, depth=0):
    # torch's Module.state_dict order: this module's parameters (slot order), then its
    # buffers, then each submodule's, recursively; None parameters are left out.
    if depth > 200:
        raise TorchScriptReadError("module tree is deeper than 200 levels")
    if not isinstance(obj.state, dict):
        raise TorchScriptReadError(
            f"{obj.torch_type} has a custom __getstate__ ({type(obj.state).__name__}); "
            f"only attribute-dict modules are supported")
    _is_module, parameters, buffers = archive.class_slots(obj.torch_type)
    for names in (parameters, buffers):
        for name in names:
            value = obj.state.get(name)
            if value is None:
                continue
            if not isinstance(value, np.ndarray):
                raise TorchScriptReadError(f"{prefix}{name} is {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, value in obj.state.items():
        if isinstance(value, TorchScriptObject) and archive.class_slots(value.torch_type)[0]:
            _state_dict(archive, value, f"{prefix}{name}.", out, depth + 1)


def read_state_dict(path, max_bytes=DEFAULT_MAX_BYTES):
    """The parameters and buffers of a TorchScript module, without torch.

    Args:
        path: a `.pt` written by `torch.jit.save` (a regular file), or a binary
            file object.
        max_bytes: the most bytes the file's storages may hold together (default
            `DEFAULT_MAX_BYTES`, 1 GiB), checked before each is read.

    Returns:
        `OrderedDict` name -> numpy array, the same names, order, dtypes and
        values as `torch.jit.load(path).state_dict()` (arrays C-contiguous).

    Raises:
        UnsafePickleError: the pickle names a global off the allow-list, or sets
            the state of anything but a TorchScript object.
        TorchScriptReadError: anything else: not a regular file, not a
            TorchScript archive this reader understands, sizes that do not
            match or exceed the limits.
    """
    try:
        with TorchScriptArchive(path, max_bytes) as archive:
            root = archive.load_pickle()
            if not isinstance(root, TorchScriptObject):
                raise TorchScriptReadError(
                    f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript "
                    "module")
            out = collections.OrderedDict()
            _state_dict(archive, root, "", out)
            return out
    except TorchScriptReadError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, ValueError,
            TypeError, KeyError, IndexError, AttributeError, SyntaxError,
            RecursionError, OverflowError, MemoryError) as err:
        # Whatever a malformed file makes the parsing raise is one documented type.
        raise TorchScriptReadError(f"{path}: not a TorchScript archive this reader "
                                   f"understands ({type(err).__name__}: {err})") from err


if __name__ == "__main__":  # python -m keras_progdist.evaluation.torchscript_reader FILE.pt
    for key, array in read_state_dict(sys.argv[1]).items():
        print(f"{key}\t{array.dtype}\t{list(array.shape)}")
