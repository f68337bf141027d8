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

The pickle is read by `torchscript_pickle.RestrictedUnpickler`, which admits only the
globals a state dict needs (tensor rebuilders, storage types, `__torch__.*` classes as
inert placeholders); any other global is refused with `UnsafePickleError`.

`read_state_dict(path)` then returns what `torch.jit.load(path).state_dict()`
returns (same names, same order, same bytes), as numpy arrays.

The file is untrusted input, so its memory is bounded before anything is read: only
a regular file is opened (not `/dev/zero`, a FIFO...); every record's declared size is
checked against what its use needs (a storage: `numel x itemsize`; the pickle and the
code: `MAX_RECORD_BYTES`) and the storages together against `max_bytes`, before it is
decompressed, and decompression stops at the declared size. Every failure is a
`TorchScriptReadError` (or its subclass `UnsafePickleError`).

Example:
    >>> state = read_state_dict("model.pt")
    >>> state["net.layers.conv.weight"].shape
    (32, 3, 3, 3)
"""

from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import re
import stat
import sys
import zipfile

import numpy as np

# Part of this module's interface (the errors `read_state_dict` raises, the allow-list
# the tests check), defined beside the unpickler.
from keras_progdist.evaluation.torchscript_pickle import (  # noqa: F401
    ALLOWED_GLOBALS,
    RestrictedUnpickler,
    TorchScriptObject,
    TorchScriptReadError,
    UnsafePickleError,
)

# The most bytes the storages of one file may hold together (the FID weights are 95 MB;
# `read_state_dict(max_bytes=...)` for larger models), and the most any other record
# (the pickle, a class's code, the byte order) may hold.
DEFAULT_MAX_BYTES = 1 << 30
MAX_RECORD_BYTES = 64 << 20


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
