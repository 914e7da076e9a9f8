"""Tests for datacredit.data: ids, digits splits, label flips, the IDX reader, Fashion-MNIST lookup, text."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from datacredit.data import (
    ArrayDataset,
    CharDataset,
    example_ids,
    flip_labels,
    load_digits,
    load_fashion_mnist,
    load_text_sample,
    read_idx,
)
from datacredit.data import fmnist as fmnist_module
from datacredit.errors import DataError

N_DIGITS = 1797


# ---------------------------------------------------------------- ArrayDataset and example_ids


def test_array_dataset_items_ids_and_subset():
    x = torch.arange(20.0).reshape(10, 2)
    y = torch.arange(10)
    ds = ArrayDataset(x, y, ids=np.arange(100, 110))
    assert len(ds) == 10
    xi, yi = ds[3]
    assert torch.equal(xi, x[3]) and int(yi) == 3
    assert ds.ids.dtype == np.int64
    sub = ds.subset([7, 2, 5])
    assert isinstance(sub, ArrayDataset)
    assert sub.ids.tolist() == [107, 102, 105]
    assert torch.equal(sub.tensors[1], torch.tensor([7, 2, 5]))
    assert example_ids(sub).tolist() == [107, 102, 105]
    assert ArrayDataset(x).ids.tolist() == list(range(10))


def test_array_dataset_rejects_bad_shapes_and_ids():
    with pytest.raises(DataError, match=r"\(10, 2\).*\(9,\)"):
        ArrayDataset(torch.zeros(10, 2), torch.zeros(9))
    with pytest.raises(DataError, match="duplicated ids 3"):
        ArrayDataset(torch.zeros(4), ids=[1, 3, 3, 4])
    with pytest.raises(DataError, match="3 ids for 4 examples"):
        ArrayDataset(torch.zeros(4), ids=[1, 2, 3])
    with pytest.raises(DataError, match="1-D"):
        ArrayDataset(torch.zeros(4), ids=np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(DataError, match="out of range"):
        ArrayDataset(torch.zeros(4)).subset([4])


def test_example_ids_of_subsets_and_plain_datasets():
    base = ArrayDataset(torch.zeros(10, 3), ids=np.arange(10) * 10)
    sub = Subset(base, [9, 1, 4, 6])
    assert example_ids(sub).tolist() == [90, 10, 40, 60]
    nested = Subset(sub, [3, 0])
    assert example_ids(nested).tolist() == [60, 90]
    assert example_ids(Subset(torch.utils.data.TensorDataset(torch.zeros(5)), [4, 2])).tolist() == [4, 2]
    ids = example_ids(torch.utils.data.TensorDataset(torch.zeros(6)))
    assert ids.dtype == np.int64 and ids.tolist() == list(range(6))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, ids=None):
        self.n = n
        if ids is not None:
            self.ids = ids

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return (torch.tensor(float(i)),)


def test_example_ids_rejects_empty_duplicated_and_mismatched():
    with pytest.raises(DataError, match="empty dataset"):
        example_ids(_ListDataset(0))
    with pytest.raises(DataError, match="empty dataset"):
        example_ids(Subset(ArrayDataset(torch.zeros(3)), []))
    with pytest.raises(DataError, match="duplicated ids 2, 5"):
        example_ids(_ListDataset(5, ids=np.array([2, 2, 5, 5, 7])))
    with pytest.raises(DataError, match="4 ids for 5 examples"):
        example_ids(_ListDataset(5, ids=np.arange(4)))
    with pytest.raises(DataError, match="integers"):
        example_ids(_ListDataset(2, ids=np.array([0.5, 1.5])))


# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_disjoint_and_complete():
    train, test = load_digits(test_fraction=0.2, seed=0)
    train2, test2 = load_digits(test_fraction=0.2, seed=0)
    assert np.array_equal(train.ids, train2.ids) and np.array_equal(test.ids, test2.ids)
    assert torch.equal(train.tensors[0], train2.tensors[0])
    assert len(test) == round(0.2 * N_DIGITS) and len(train) + len(test) == N_DIGITS
    assert np.intersect1d(train.ids, test.ids).size == 0
    assert np.array_equal(np.sort(np.concatenate([train.ids, test.ids])), np.arange(N_DIGITS))
    assert len(np.unique(example_ids(train))) == len(train)

    other_train, _ = load_digits(test_fraction=0.2, seed=1)
    assert not np.array_equal(train.ids, other_train.ids)

    x, y = train.tensors
    assert x.shape == (len(train), 64) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_ids_are_original_rows():
    from sklearn.datasets import load_digits as sk_load_digits

    sk = sk_load_digits()
    train, test = load_digits(seed=3, flatten=False, dtype=torch.float64)
    assert train.tensors[0].shape[1:] == (1, 8, 8) and train.tensors[0].dtype == torch.float64
    for ds in (train, test):
        x, y = ds.tensors
        np.testing.assert_array_equal(y.numpy(), sk.target[ds.ids])
        np.testing.assert_allclose(x[:, 0].numpy(), sk.images[ds.ids] / 16.0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 1.0])
def test_flip_labels_flips_exactly_the_stated_count(fraction):
    train, _ = load_digits()
    flipped, flipped_ids = flip_labels(train, fraction=fraction, seed=0, num_classes=10)
    n = len(train)
    assert len(flipped_ids) == round(fraction * n)
    assert np.array_equal(flipped.ids, train.ids)
    assert torch.equal(flipped.tensors[0], train.tensors[0])
    old, new = train.tensors[1], flipped.tensors[1]
    changed = train.ids[(old != new).numpy()]
    # every flipped label differs from the original and no other label changed
    assert np.array_equal(np.sort(changed), np.sort(flipped_ids))
    assert int(new.min()) >= 0 and int(new.max()) < 10
    again, again_ids = flip_labels(train, fraction=fraction, seed=0, num_classes=10)
    assert np.array_equal(again_ids, flipped_ids) and torch.equal(again.tensors[1], new)


def test_flip_labels_rejects_out_of_range_labels():
    ds = ArrayDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DataError, match="0..2"):
        flip_labels(ds, fraction=0.5, seed=0, num_classes=3)


# ---------------------------------------------------------------- IDX reader and Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    payload = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(big).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("name", ["arr-idx3-ubyte", "arr-idx3-ubyte.gz"])
def test_read_idx_roundtrip_ubyte(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    _write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "code,dtype", [(0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)]
)
def test_read_idx_multibyte_types_are_big_endian(tmp_path, code, dtype):
    arr = (np.arange(12).reshape(3, 4) * 1000 - 5000).astype(dtype)
    _write_idx(tmp_path / "a.idx", arr, code)
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_and_bad_header_name_the_file(tmp_path):
    arr = np.zeros((4, 3, 3), dtype=np.uint8)
    _write_idx(tmp_path / "full-idx3-ubyte", arr)
    raw = (tmp_path / "full-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"cut-idx3-ubyte.*truncated"):
        read_idx(tmp_path / "cut-idx3-ubyte")
    with gzip.open(tmp_path / "cut2-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:10])
    with pytest.raises(DataError, match=r"cut2-idx3-ubyte\.gz.*truncated"):
        read_idx(tmp_path / "cut2-idx3-ubyte.gz")
    (tmp_path / "long-idx3-ubyte").write_bytes(raw + b"\0")
    with pytest.raises(DataError, match=r"long-idx3-ubyte.*trailing"):
        read_idx(tmp_path / "long-idx3-ubyte")
    (tmp_path / "bad-magic").write_bytes(b"\x01\x00" + raw[2:])
    with pytest.raises(DataError, match="bad-magic.*not an IDX"):
        read_idx(tmp_path / "bad-magic")
    (tmp_path / "bad-code").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(DataError, match="bad-code.*type code 0x07"):
        read_idx(tmp_path / "bad-code")


def _fake_fmnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    data = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_written_files(tmp_path, gz):
    data = _fake_fmnist(tmp_path, gz=gz)
    train = load_fashion_mnist(tmp_path, split="train")
    images, labels = data["train"]
    x, y = train.tensors
    assert x.shape == (12, 784) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and np.array_equal(y.numpy(), labels)
    np.testing.assert_allclose(x.numpy(), images.reshape(12, -1) / 255.0, rtol=1e-6)
    assert train.ids.tolist() == list(range(12))

    test = load_fashion_mnist(tmp_path, split="test", flatten=False)
    assert test.tensors[0].shape == (5, 1, 28, 28)

    small = load_fashion_mnist(tmp_path, limit=5, seed=4)
    assert len(small) == 5 and len(np.unique(small.ids)) == 5
    np.testing.assert_array_equal(small.tensors[1].numpy(), labels[small.ids])
    assert np.array_equal(load_fashion_mnist(tmp_path, limit=5, seed=4).ids, small.ids)


def test_load_fashion_mnist_honours_env_var(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path)
    monkeypatch.setenv("DATACREDIT_FMNIST_DIR", str(tmp_path))
    assert len(load_fashion_mnist(split="test")) == 5


def test_missing_fashion_mnist_names_paths_and_package(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_fashion_mnist(missing)
    msg = str(err.value)
    assert str(missing / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "DATACREDIT_FMNIST_DIR" in msg

    monkeypatch.delenv("DATACREDIT_FMNIST_DIR", raising=False)
    monkeypatch.setattr(fmnist_module, "DEBIAN_DIR", missing)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist()


def test_fashion_mnist_rejects_bad_split_and_limit(tmp_path):
    _fake_fmnist(tmp_path)
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist(tmp_path, split="val")
    with pytest.raises(DataError, match="limit"):
        load_fashion_mnist(tmp_path, limit=13)


@pytest.mark.skipif(
    not (fmnist_module.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_test_split():
    test = load_fashion_mnist(split="test", limit=500, seed=0)
    assert len(test) == 500 and test.tensors[0].shape == (500, 784)
    assert test.ids.max() < 10_000 and len(np.unique(test.ids)) == 500
    labels = read_idx(fmnist_module.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and np.bincount(labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- text


def test_text_sample_is_ascii_and_large_enough():
    text = load_text_sample()
    assert len(text.encode("ascii")) > 10_000
    assert not any(line.startswith("#") for line in text.splitlines())
    assert "We the People of the United States" in text
    assert "Four score and seven years ago" in text


def test_char_dataset_shapes_ids_and_roundtrip():
    text = load_text_sample()
    ds = CharDataset(text, seq_len=32)
    assert ds.vocab == "".join(sorted(set(text))) and ds.vocab_size == len(set(text))
    assert len(ds) == (len(text) - 33) // 32 + 1
    (x,) = ds[3]
    assert x.shape == (33,) and x.dtype == torch.int64
    assert ds.decode(x) == text[3 * 32 : 3 * 32 + 33]
    assert ds.decode(ds.encode(text[:500])) == text[:500]
    assert torch.equal(ds[4][0][0], x[-1])  # stride seq_len: consecutive chunks share one boundary char
    assert example_ids(ds).tolist() == list(range(len(ds)))

    sub = ds.subset([5, 2])
    assert isinstance(sub, CharDataset) and sub.ids.tolist() == [5, 2]
    assert sub.decode(sub[0][0]) == ds.decode(ds[5][0])


def test_char_dataset_stride_vocab_and_errors():
    ds = CharDataset("abcdefghij", seq_len=3, stride=2, vocab="jihgfedcba")
    assert len(ds) == 4  # starts 0, 2, 4, 6
    assert ds.encode("ja").tolist() == [0, 9]
    assert ds.decode(ds[1][0]) == "cdef"
    with pytest.raises(DataError, match="'xz'"):
        CharDataset("abzx", seq_len=2, vocab="ab")
    with pytest.raises(DataError, match="too short"):
        CharDataset("abc", seq_len=3)
    with pytest.raises(DataError, match="outside the vocabulary"):
        ds.decode([10])
