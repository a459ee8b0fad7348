"""Loaders of CIFAR-10/100 (pickle batches), SVHN (.mat), image folders, notMNIST and
MiniImageNet, run on tiny files written here in the real formats; nothing touches the network."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from vision_fixtures import (
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_miniimagenet,
    write_notmnist,
    write_svhn,
)

from lance_cl.data import (
    DatasetNotFoundError,
    NormalizedImages,
    cifar_expected_files,
    load_cifar,
    load_image_folder,
    load_miniimagenet,
    load_notmnist,
    load_svhn,
    read_cifar_batch,
)
from lance_cl.data import image_folder as image_folder_mod



# -- CIFAR --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100)])
def test_cifar_roundtrip(tmp_path: Path, name: str, writer) -> None:  # type: ignore[no-untyped-def]
    wrote = writer(tmp_path)
    for split in ("train", "test"):
        x, y = load_cifar(name, tmp_path, train=split == "train")
        assert x.dtype == torch.uint8 and x.shape == (len(wrote[f"y_{split}"]), 3, 32, 32)
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), wrote[f"x_{split}"])
        np.testing.assert_array_equal(y.numpy(), wrote[f"y_{split}"])
    # channel layout: the first 1024 bytes of a row are the red plane, row-major
    row = wrote["x_train"][0].reshape(-1)
    x, _ = load_cifar(name, tmp_path, train=True)
    assert x[0, 0, 0, 1] == row[1] and x[0, 1, 0, 0] == row[1024] and x[0, 2, 1, 0] == row[2048 + 32]


def test_cifar_missing_files_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar10", tmp_path, train=True)
    msg = str(info.value)
    for i in range(1, 6):
        assert str(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and "--data-root" in msg
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar100", tmp_path, train=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-100-python" / "test") in msg and "cifar-100-python.tar.gz" in msg
    # one batch missing out of six: only that one is reported missing
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_3  \(MISSING\)"):
        load_cifar("cifar10", tmp_path, train=True)
    assert load_cifar("cifar10", tmp_path, train=False)[0].shape[0] == 10  # the test split is complete


def test_cifar_corrupt_batches(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        read_cifar_batch(bad)
    for batch, match in (
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "lacks key"),
        ([1, 2, 3], "pickled dict"),
    ):
        bad.write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match=match):
            read_cifar_batch(bad)
    # a corrupt file inside the real layout surfaces from load_cifar too
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                                                        b"labels": [0]}))
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar("cifar100", tmp_path, train=True)


def test_cifar_download_path_uses_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With download=True a missing data set is fetched by torchvision (faked here: no network)."""
    import torchvision

    calls = []

    def fake_cifar10(root: str, train: bool = True, download: bool = False):  # type: ignore[no-untyped-def]
        calls.append((root, train, download))
        write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    x, y = load_cifar("cifar10", tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)] and x.shape == (20, 3, 32, 32)
    assert cifar_expected_files("cifar10", tmp_path, False)[0].is_file()


# -- SVHN ---------------------------------------------------------------------------------------------


def test_svhn_roundtrip_and_label_10(tmp_path: Path) -> None:
    wrote = write_svhn(tmp_path)
    from scipy.io import loadmat

    raw = loadmat(str(tmp_path / "svhn" / "train_32x32.mat"))
    assert raw["X"].shape == (32, 32, 3, 20) and raw["y"].shape == (20, 1) and 10 in raw["y"]
    for split in ("train", "test"):
        x, y = load_svhn(tmp_path, train=split == "train")
        assert x.dtype == torch.uint8 and x.shape == (len(wrote[f"y_{split}"]), 3, 32, 32)
        np.testing.assert_array_equal(x.numpy(), wrote[f"x_{split}"])
        np.testing.assert_array_equal(y.numpy(), wrote[f"y_{split}"])
        assert sorted(set(y.tolist())) == list(range(10))
    # X[row, col, channel, n] -> x[n, channel, row, col]
    x, _ = load_svhn(tmp_path, train=True)
    assert x[3, 1, 5, 7] == raw["X"][5, 7, 1, 3]


def test_svhn_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_svhn(tmp_path, train=False)
    msg = str(info.value)
    assert str(tmp_path / "svhn" / "test_32x32.mat") in msg and "ufldl.stanford.edu/housenumbers" in msg
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"garbage, not MATLAB")
    with pytest.raises(ValueError, match="not a readable SVHN"):
        load_svhn(tmp_path, train=False)
    from scipy.io import savemat

    savemat(str(tmp_path / "svhn" / "test_32x32.mat"), {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"\(32, 32, 3, N\)"):
        load_svhn(tmp_path, train=False)


# -- image folders ------------------------------------------------------------------------------------


def test_image_folder_exact_and_resized(tmp_path: Path) -> None:
    from PIL import Image

    wrote = write_image_folder(tmp_path / "imgs", ["zeta", "alpha", "mid"], 2, 12)
    d = load_image_folder(tmp_path / "imgs", 12)
    assert d.classes == ["alpha", "mid", "zeta"]  # sorted names -> labels
    assert d.files[:2] == ["alpha/img_000.png", "alpha/img_001.png"]
    # the writer enumerated classes in its own order: map them through the names
    order = {name: i for i, name in enumerate(["zeta", "alpha", "mid"])}
    expected = np.concatenate([wrote["x"][wrote["y"] == order[c]] for c in d.classes])
    np.testing.assert_array_equal(d.images.numpy(), expected)
    np.testing.assert_array_equal(d.labels.numpy(), np.repeat(np.arange(3), 2))
    # resizing: PIL's bilinear filter on the decoded image
    r = load_image_folder(tmp_path / "imgs", 20)
    assert r.images.shape == (6, 3, 20, 20)
    with Image.open(tmp_path / "imgs" / "mid" / "img_001.png") as img:
        ref = np.asarray(img.convert("RGB").resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(r.images[3].numpy().transpose(1, 2, 0), ref)
    grey = load_image_folder(tmp_path / "imgs", 12, mode="L")
    assert grey.images.shape == (6, 1, 12, 12)


def test_image_folder_errors_skip_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    write_image_folder(folder, ["a", "b"], 2, 8)
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    (folder / "b" / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(folder, 8)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        d = load_image_folder(folder, 8, skip_unreadable=True, cache=True)
    assert d.skipped == ["b/broken.png"] and d.images.shape == (4, 3, 8, 8)
    assert image_folder_mod.image_folder_cache_path(folder, 8, "RGB").is_file()

    def no_decoding(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(image_folder_mod, "_decode", no_decoding)
    again = load_image_folder(folder, 8, skip_unreadable=True, cache=True)
    assert torch.equal(again.images, d.images) and again.files == d.files
    monkeypatch.undo()
    write_image_folder(folder, ["c"], 1, 8, seed=9)  # a new class invalidates the cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown = load_image_folder(folder, 8, skip_unreadable=True, cache=True)
    assert grown.classes == ["a", "b", "c"] and grown.images.shape[0] == 5
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nowhere", 8)


# -- notMNIST -----------------------------------------------------------------------------------------


def test_notmnist_split_and_resize(tmp_path: Path) -> None:
    wrote = write_notmnist(tmp_path, per_class=5)
    x_tr, y_tr, x_te, y_te = load_notmnist(tmp_path, cache=False)
    assert x_tr.shape[1:] == (1, 32, 32) and x_tr.dtype == torch.uint8
    # 5 per class, 10 % test with at least one: 4 train + 1 test per class
    assert torch.bincount(y_tr).tolist() == [4] * 10 and torch.bincount(y_te).tolist() == [1] * 10
    # the split is a partition of the folder, fixed across calls
    x_tr2, _, x_te2, _ = load_notmnist(tmp_path, cache=False)
    assert torch.equal(x_tr, x_tr2) and torch.equal(x_te, x_te2)
    # size=28 keeps the original pixels: every loaded image is one of the written ones, with its class
    a_tr, b_tr, a_te, b_te = load_notmnist(tmp_path, size=28, cache=False)
    written = {wrote["x"][i].tobytes(): int(wrote["y"][i]) for i in range(len(wrote["y"]))}
    seen = [(a.numpy().tobytes(), int(b)) for a, b in zip(torch.cat([a_tr, a_te]), torch.cat([b_tr, b_te]))]
    assert sorted(written[k] for k, _ in seen) == sorted(written.values())
    assert all(written[k] == lab for k, lab in seen)


def test_notmnist_explicit_train_test_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_notmnist(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "notMNIST") in msg and "notMNIST_small" in msg
    tr = write_image_folder(tmp_path / "notMNIST" / "train", list("ABCDEFGHIJ"), 2, 28, mode="L", seed=1)
    te = write_image_folder(tmp_path / "notMNIST" / "test", list("ABCDEFGHIJ"), 1, 28, mode="L", seed=2)
    x_tr, y_tr, x_te, y_te = load_notmnist(tmp_path, size=28, cache=False)
    np.testing.assert_array_equal(x_tr.numpy(), tr["x"])
    np.testing.assert_array_equal(y_te.numpy(), te["y"])
    np.testing.assert_array_equal(x_te.numpy(), te["x"])
    assert y_tr.tolist() == tr["y"].tolist()


# -- MiniImageNet -------------------------------------------------------------------------------------


def test_miniimagenet_layout_split_and_cache(tmp_path: Path) -> None:
    wrote = write_miniimagenet(tmp_path, n_classes=3, per_class=7, size=84)
    x_tr, y_tr, x_te, y_te, wnids = load_miniimagenet(tmp_path)
    assert wnids == wrote["wnids"]
    # 7 per class: round(7 / 6) = 1 test image (the last file), 6 train
    assert torch.bincount(y_tr).tolist() == [6, 6, 6] and torch.bincount(y_te).tolist() == [1, 1, 1]
    idx = np.arange(21).reshape(3, 7)
    np.testing.assert_array_equal(x_tr.numpy(), wrote["x"][idx[:, :6].reshape(-1)])
    np.testing.assert_array_equal(x_te.numpy(), wrote["x"][idx[:, 6]])
    assert (tmp_path / "miniimagenet.RGB84.pt").is_file()  # cache written next to the folder
    again = load_miniimagenet(tmp_path)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)


def test_miniimagenet_600_images_split_is_500_100() -> None:
    from lance_cl.data.miniimagenet import miniimagenet_split

    labels = torch.arange(4).repeat_interleave(600)
    tr, te = miniimagenet_split(labels)
    assert len(tr) == 2000 and len(te) == 400
    assert te[:100].tolist() == list(range(500, 600))  # the last 100 sorted files of class 0


def test_miniimagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_miniimagenet(tmp_path)
    assert str(tmp_path / "miniimagenet") in str(info.value) and "<wnid>" in str(info.value)


# -- normalised uint8 datasets ------------------------------------------------------------------------


def test_normalized_images() -> None:
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    y = torch.arange(4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    ds = NormalizedImages(x, y, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    xi, yi = ds[2]
    assert xi.dtype == torch.float32 and int(yi) == 2
    torch.testing.assert_close(xi, ref[2])
    torch.testing.assert_close(ds.normalized(), ref)
    with pytest.raises(ValueError):
        NormalizedImages(x.float(), y, 0.5, 0.5)
    with pytest.raises(ValueError):
        NormalizedImages(x, y, (0.1, 0.2), 0.5)


def test_failed_download_is_the_missing_files_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline with download=True: still one DatasetNotFoundError naming the files, plus the cause."""
    import torchvision

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("no network here")

    for cls in ("CIFAR100", "SVHN", "FashionMNIST"):
        monkeypatch.setattr(torchvision.datasets, cls, offline)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)cifar-100-python.*download failed: OSError: no network"):
        load_cifar("cifar100", tmp_path, train=True, download=True)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)train_32x32.mat.*download failed: OSError"):
        load_svhn(tmp_path, train=True, download=True)
    from lance_cl.data import load_mnist_like

    with pytest.raises(DatasetNotFoundError, match=r"(?s)FashionMNIST.*download failed: OSError"):
        load_mnist_like("fashion_mnist", tmp_path, train=True, download=True)
