"""lance-cl finetune: frozen part, full-rank gradients against float64 autograd, the run's JSON /
table / plot, clear errors for missing weights or data, failed methods as rows."""
from __future__ import annotations

import argparse
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_cl.data import DatasetNotFoundError
from lance_cl.finetune import FinetuneConfig
from lance_cl.finetune import data as ft_data
from lance_cl.finetune import loop, results, runner
from lance_cl.finetune.models import WeightsNotFoundError, build_backbone, reset_head
from lance_cl.finetune.protocol import method_options, parse_method_values, parse_seeds

torch.set_num_threads(1)
SIZE = 16


def _batches(n_batches: int, batch: int = 6, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=gen, dtype=dtype),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    model, _ = build_backbone("mobilenet_blocks", 3)
    return model


# ------------------------------------------------------------------------------------------------
def test_layer_selection_counts_from_the_end_in_execution_order(base):
    x = _batches(1)[0][0]
    assert loop.finetuned_layer_names(base, 2, x) == ["blocks.6.project.0", "head"]
    assert loop.finetuned_layer_names(base, "4", x) == [
        "blocks.6.expand.0", "blocks.6.depthwise.0", "blocks.6.project.0", "head"]
    assert loop.finetuned_layer_names(base, "blocks.6.project*", x) == ["blocks.6.project.0"]
    # the papers' count: convolutions only, the head never listed (it trains plain on top)
    assert loop.finetuned_layer_names(base, 2, x, plain_head="head") == [
        "blocks.6.depthwise.0", "blocks.6.project.0"]
    assert loop.finetuned_layer_names(base, "blocks.6.*", x, plain_head="head") == [
        "blocks.6.expand.0", "blocks.6.depthwise.0", "blocks.6.project.0"]
    with pytest.raises(ValueError, match="convolutions before its head 'head'"):
        loop.finetuned_layer_names(base, 10**4, x, plain_head="head")


def test_a_plain_head_trains_with_exact_gradients_on_top_of_compressed_convs(base):
    double = base.double()
    try:
        calib = _batches(2, dtype=torch.float64, seed=1)
        x, y = _batches(1, dtype=torch.float64, seed=2)[0]
        names = loop.finetuned_layer_names(double, 2, x, plain_head="head")
        reference = loop._weight_grads(double, ["head"], x, y)
        model, compressed = loop.prepare_model(double, "lance", names, {"eps": 0.5}, calib, x,
                                               plain_layers=["head"])
        assert compressed == names
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == {"blocks.6.depthwise.0.weight", "blocks.6.project.0.weight",
                           "head.weight", "head.bias"}          # the convs have no bias
        got = loop._weight_grads(model, names + ["head"], x, y)
        torch.testing.assert_close(got["head"], reference["head"], rtol=1e-12, atol=1e-14)
        # the compressed convs do not reproduce plain autograd at eps 0.5: they really compress
        exact = loop._weight_grads(double, names, x, y)
        assert not torch.allclose(got[names[0]], exact[names[0]], rtol=1e-3)
        mem = __import__("lance_cl").measure_activation_memory(
            model, x, lambda o: F.cross_entropy(o, y), layers=["head"])
        assert mem["selected"] == 8 * x.shape[0] * model.head.in_features   # its float64 input
    finally:
        base.float()


def test_frozen_part_gets_no_gradient_and_saves_nothing(base):
    x, y = _batches(1)[0]
    names = ["blocks.6.expand.0", "head"]   # project / depthwise convs frozen in between
    model, compressed = loop.prepare_model(base, "vanilla", names, {}, [], x)
    assert compressed == names
    params = {id(p) for p in model.parameters()}
    reached, saved_before, saved_frozen = [False], [], []
    frozen_between = ["blocks.6.depthwise.0", "blocks.6.project.0"]
    inside = []
    model.get_submodule(names[0]).register_forward_pre_hook(lambda *a: reached.__setitem__(0, True))
    for n in frozen_between:
        m = model.get_submodule(n)
        m.register_forward_pre_hook(lambda *a, n=n: inside.append(n))
        m.register_forward_hook(lambda *a: (inside.pop(), None)[1])

    def pack(t):
        if id(t) not in params:
            (saved_frozen if inside else saved_before if not reached[0] else []).append(t.shape)
        return t

    loop.set_finetune_mode(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert saved_before == []        # nothing before the first fine-tuned layer
    assert saved_frozen == []        # frozen convs between fine-tuned layers keep only weights
    for name, p in model.named_parameters():
        trained = any(name.startswith(n + ".") for n in names)
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
    mem = __import__("lance_cl").measure_activation_memory(model, x, lambda o: F.cross_entropy(o, y),
                                                           layers=names)
    assert all(mem["per_layer"].get(n, 0) == 0 for n in frozen_between)
    assert mem["selected"] > 0


# lance: eps=1.0 keeps only the span of the calibration batches, so "full rank" is rank=n here.
# gradient_filter is no rank method: at R=1 it is exact only for 1x1 convs (a k x k kernel sees
# block means at every offset), so its set is the 1x1 convs and the head.
@pytest.mark.parametrize("method,options", [
    ("lance", {"rank": 10**6}), ("lance", {"rank": 10**6, "compress_batch": True}),
    ("asi", {"eps": 1.0}), ("asi", {"rank": 10**6}),
    ("hosvd", {"eps": 1.0}), ("gradient_filter", {"radius": 1})])
def test_full_rank_methods_match_vanilla_weight_gradients_in_float64(base, method, options):
    double = base.double()
    try:
        calib = _batches(2, dtype=torch.float64, seed=1)
        x, y = _batches(1, dtype=torch.float64, seed=2)[0]
        names = loop.finetuned_layer_names(double, 4, x)
        if method == "gradient_filter":
            names.remove("blocks.6.depthwise.0")
        reference = loop._weight_grads(double, names, x, y)   # plain autograd, nothing compressed
        model, compressed = loop.prepare_model(double, method, names, options, calib, x)
        got = loop._weight_grads(model, names, x, y)
        assert compressed == ([n for n in names if n != "head"] if method == "gradient_filter"
                              else names)
        if "compress_batch" in options:   # LANCE's published variant: the batch mode compressed too
            assert all(0 in model.get_submodule(n).compressor.modes for n in compressed)
        for n in names:
            assert float(reference[n].norm()) > 0
            torch.testing.assert_close(got[n], reference[n], rtol=1e-9, atol=1e-12)
        agreement = loop.gradient_agreement(model, names, x, y)
        assert all(a["angle_deg"] < 1e-4 and a["cosine"] > 1 - 1e-12 for a in agreement.values())
    finally:
        base.float()


# ------------------------------------------------------------------------------------------------
def test_batch_order_and_model_input_are_fixed_and_hand_checkable():
    a, fa = loop.batch_order(10, 4, seed=3, epoch=1)
    b, fb = loop.batch_order(10, 4, seed=3, epoch=1)
    assert [t.tolist() for t in a] == [t.tolist() for t in b] and torch.equal(fa, fb)
    assert len(a) == 2 and len(set(torch.cat(a).tolist())) == 8       # drop_last, no repeats
    c, _ = loop.batch_order(10, 4, seed=3, epoch=2)
    assert [t.tolist() for t in a] != [t.tolist() for t in c]
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    img[0, :, 0, 0] = 255
    out = ft_data.model_input(img, 2, flip=torch.tensor([True]))
    mean, std = ft_data.IMAGENET_MEAN[0], ft_data.IMAGENET_STD[0]
    assert out[0, 0, 0, 1].item() == pytest.approx((1 - mean) / std)   # mirrored pixel
    assert out[0, 0, 0, 0].item() == pytest.approx(-mean / std)
    assert ft_data.model_input(img, 4).shape == (1, 3, 4, 4)


def test_option_parsing():
    assert parse_method_values("0.7", ("lance", "asi"), "eps") == {"lance": 0.7, "asi": 0.7}
    assert parse_method_values("asi=0.9,lance=0.6", ("lance", "asi"), "eps") == {"asi": 0.9, "lance": 0.6}
    with pytest.raises(ValueError, match="not one of"):
        parse_method_values("vanilla=0.7", ("lance",), "eps")
    assert parse_seeds("0-2,5") == (0, 1, 2, 5)
    cfg = FinetuneConfig(eps={"lance": 0.6}, budget={"asi": 1000.0})
    assert method_options(cfg, "lance") == {"eps": 0.6}
    assert method_options(cfg, "asi") == {"budget": 1000.0}
    assert method_options(cfg, "gradient_filter") == {"radius": 2}
    with pytest.raises(ValueError, match="unknown method"):
        FinetuneConfig(methods=("sgd",))
    cfg = FinetuneConfig(compress_batch={"lance": True, "hosvd": False})
    assert method_options(cfg, "lance") == {"eps": 0.7, "compress_batch": True}
    assert method_options(cfg, "hosvd") == {"eps": 0.8, "compress_batch": False}
    assert method_options(cfg, "asi") == {"eps": 0.8}          # absent: the method's default
    with pytest.raises(ValueError, match="compress_batch given for"):
        FinetuneConfig(compress_batch={"gradient_filter": True})
    from lance_cl.finetune.command import _batch_modes

    assert _batch_modes("lance=1,asi=0") == {"lance": True, "asi": False}
    with pytest.raises(argparse.ArgumentTypeError, match="give 1 .compress. or 0"):
        _batch_modes("lance=0.5")


def test_missing_weights_file_and_data_set_are_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(WeightsNotFoundError, match="does not exist.*--pretrain"):
        build_backbone("mobilenet_blocks", 5, str(missing))
    with pytest.raises(WeightsNotFoundError, match="no torchvision weights"):
        build_backbone("mobilenet_blocks", 5, "IMAGENET1K_V1")
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        ft_data.load_finetune_data("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cub200"):
        ft_data.load_finetune_data("cub200", tmp_path)
    from lance_cl.cli import main

    status = main(["finetune", "--model", "mobilenet_blocks", "--weights", str(missing),
                   "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith("lance-cl finetune:") and "Traceback" not in err
    assert "mnist" in err and "MISSING" in err    # the data set is checked first


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def mnist_like_data(tmp_path_factory):
    """The real MNIST and FashionMNIST under the default data root; where a checkout has none,
    tiny ones in their real idx format, found through $LANCE_CL_DATA."""
    from lance_cl.data import default_data_root
    from lance_cl.data.mnist import load_mnist_like
    from vision_fixtures import write_mnist_like

    try:
        for name in ("mnist", "fashion_mnist"):
            for train in (True, False):
                load_mnist_like(name, default_data_root(), train)
        yield default_data_root()
        return
    except DatasetNotFoundError:
        pass
    root = tmp_path_factory.mktemp("mnist_like")
    for folder in ("MNIST", "FashionMNIST"):
        write_mnist_like(root, folder, per_class_train=10, per_class_test=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LANCE_CL_DATA", str(root))
        yield root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A mobilenet_blocks pretrained here for one epoch on 96 FashionMNIST images."""
    path = tmp_path_factory.mktemp("weights") / "fmnist.pt"
    record = runner.pretrain("mobilenet_blocks", "fashion_mnist", path, epochs=1, batch_size=32,
                             image_size=SIZE, train_limit=96, progress=False)
    assert path.is_file() and len(record["history"]) == 1
    return path


def _tiny_config(weights, **changes) -> FinetuneConfig:
    base = dict(model="mobilenet_blocks", weights=str(weights), dataset="mnist", layers=(2,),
                epochs=2, batch_size=16, image_size=SIZE, train_limit=48, test_limit=40,
                lance_calibration_batches=2, seeds=(0,), eps={"lance": 0.7, "asi": 0.8, "hosvd": 0.8})
    base.update(changes)
    return FinetuneConfig(**base)


def test_run_writes_json_table_plot_that_regenerate(pretrained, tmp_path, capsys):
    from lance_cl.cli import main

    out = tmp_path / "run"
    status = main(["finetune", "--model", "mobilenet_blocks", "--weights", str(pretrained),
                   "--dataset", "mnist", "--layers", "2", "--epochs", "2", "--batch-size", "16",
                   "--image-size", str(SIZE), "--train-limit", "48", "--test-limit", "40",
                   "--calibration-batches", "2", "--seeds", "0,1",
                   "--eps", "lance=0.7,asi=0.8,hosvd=0.8", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.err.splitlines()
    result = results.load_result(out / "finetune.json")
    assert result["config"] == runner._config_dict(_tiny_config(pretrained, seeds=(0, 1)))
    assert any(l.startswith("layers 2 / lance / seed 1 epoch 2/2: loss ") for l in lines)
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {
        (m, s) for m in ("vanilla", "lance", "asi", "hosvd", "gradient_filter") for s in (0, 1)}
    assert all(r["status"] == "ok" for r in result["runs"]), [r.get("error") for r in result["runs"]]
    saved = results.load_result(out)
    table = (out / "finetune.md").read_text()
    assert results.render_table(saved) == table and table in captured.out
    assert (out / "finetune.png").stat().st_size > 1000

    runs = {(r["method"], r["seed"]): r for r in saved["runs"]}
    van = [runs["vanilla", s] for s in (0, 1)]
    lance = [runs["lance", s] for s in (0, 1)]
    for r in saved["runs"]:
        # the papers' protocol: N = 2 counts the last two convolutions; the head trains plain
        assert r["layers"] == ["blocks.6.depthwise.0", "blocks.6.project.0"]
        assert r["plain_layers"] == ["head"]
        assert r["accuracy"] == r["epochs"][-1]["test_accuracy"]
        assert r["memory"]["frozen_layers"] == 0
        assert r["memory"]["finetuned_layers"] <= r["memory"]["whole_step"]
    # vanilla saves the two inputs in float32: (16, 384, 1, 1) twice; the head's (16, 64) input
    # counts in the whole step
    assert van[0]["memory"]["finetuned_layers"] == 4 * 16 * (384 + 384)
    assert van[0]["memory"]["plain_layers"] == lance[0]["memory"]["plain_layers"] == 4 * 16 * 64
    # the same data, head and schedule: identical first-epoch vanilla loss, and lance's
    # first-epoch loss differs only through its gradients after the first step
    assert van[0]["epochs"][0]["lr"] == lance[0]["epochs"][0]["lr"] == 0.05
    row = next(l for l in table.splitlines() if l.startswith("| 2 | lance |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    acc = [r["accuracy"] for r in lance]
    assert cells[3] == f"{statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}"
    delta = statistics.fmean(acc) - statistics.fmean(r["accuracy"] for r in van)
    assert cells[4] == f"{delta:+.2f}"
    ratio = statistics.fmean(r["memory"]["finetuned_layers"] for r in van) / statistics.fmean(
        r["memory"]["finetuned_layers"] for r in lance)
    assert cells[6] == f"{ratio:.1f}x"
    step = statistics.fmean(r["time"]["interleaved_median_s"] for r in lance) * 1e3
    assert len(cells) == 16 and cells[13] == f"{step:.2f}"


def test_a_method_that_raises_is_a_failed_row(pretrained, tmp_path, monkeypatch):
    real = runner.run_method

    def flaky(base, method, *args, **kwargs):
        if method == "hosvd":
            raise RuntimeError("boom in hosvd")
        return real(base, method, *args, **kwargs)

    monkeypatch.setattr(runner, "run_method", flaky)
    cfg = _tiny_config(pretrained, methods=("hosvd", "vanilla"), epochs=1)
    result = runner.run_finetune(cfg, tmp_path, progress=False)
    status = {r["method"]: r["status"] for r in result["runs"]}
    assert status == {"vanilla": "ok", "hosvd": "failed"}
    assert result["runs"][0]["method"] == "vanilla"        # vanilla always runs first
    table = (tmp_path / "finetune.md").read_text()
    row = next(l for l in table.splitlines() if l.startswith("| 2 | hosvd |"))
    assert row.startswith("| 2 | hosvd | 0 | failed: seed 0: RuntimeError: boom in hosvd |")
    assert row.count("|") == table.splitlines()[5].count("|")      # as many cells as the header


def test_weights_load_into_a_fresh_head_and_reset_head_is_seeded(pretrained):
    model, info = build_backbone("mobilenet_blocks", 7, str(pretrained))
    state = torch.load(pretrained, weights_only=True)
    assert info["skipped_keys"] == ["head.weight", "head.bias"]      # 10 classes -> 7
    torch.testing.assert_close(model.state_dict()["blocks.6.project.0.weight"],
                               state["blocks.6.project.0.weight"])
    reset_head(model, "mobilenet_blocks", 4)
    first = model.head.weight.clone()
    reset_head(model, "mobilenet_blocks", 4)
    assert torch.equal(first, model.head.weight) and model.head.weight.shape == (7, 64)


def test_evaluate_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], 1)  # class 0 iff pixel is bright

    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    x[:2] = 255
    y = torch.tensor([0, 1, 1, 1])
    assert loop.evaluate(Fixed(), x, y, 2, torch.device("cpu")) == 75.0


def test_interleaved_step_times_time_every_model_round_robin():
    import time

    class Slow(nn.Linear):
        def forward(self, x):
            time.sleep(0.02)
            return super().forward(x)

    calls = []
    fast, slow = nn.Linear(4, 2), Slow(4, 2)
    fast.register_forward_pre_hook(lambda *a: calls.append("fast"))
    slow.register_forward_pre_hook(lambda *a: calls.append("slow"))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    times = loop.interleaved_step_times({"fast": fast, "slow": slow}, x, y, repeats=4, warmup=1)
    assert set(times) == {"fast", "slow"} and times["slow"] >= 0.02 > times["fast"]
    # warm-up, then rotating starts: fast-slow, slow-fast, ...
    assert calls == ["fast", "slow", "fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast"]
    assert fast.weight.grad is None and slow.weight.grad is None


def test_cifar10_dev_halves_are_classes_0_4_and_5_9_renumbered():
    from lance_cl.data import default_data_root, load_cifar

    root = default_data_root()
    if not (root / "cifar10-dev" / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("the CIFAR-10 development split is not on this machine")
    images, labels = load_cifar("cifar10", root / "cifar10-dev", train=False)
    last = ft_data.load_finetune_data("cifar10-dev-last5", root, train_limit=10)
    first = ft_data.load_finetune_data("cifar10-dev-first5", root, train_limit=10)
    assert last.n_classes == first.n_classes == 5 and last.train_x.shape == (10, 3, 32, 32)
    assert torch.equal(last.test_x, images[labels >= 5]) and torch.equal(last.test_y, labels[labels >= 5] - 5)
    assert torch.equal(first.test_y, labels[labels < 5])
    assert last.info["test_images"] == int((labels >= 5).sum())


def test_torchvision_resnet18_from_a_local_state_dict_fine_tunes_its_last_layers(tmp_path):
    import lance_cl

    source, _ = build_backbone("resnet18", 10)          # "pretrained here", saved as a state_dict
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model, info = build_backbone("resnet18", 7, str(path))
    assert info["skipped_keys"] == ["fc.weight", "fc.bias"] and model.fc.out_features == 7
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 6])
    names = loop.finetuned_layer_names(model, 4, x)
    assert names == ["layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2", "fc"]
    tuned, _ = loop.prepare_model(model, "vanilla", names, {}, [], x)
    loop.set_finetune_mode(tuned)
    mem = lance_cl.measure_activation_memory(tuned, x, lambda o: F.cross_entropy(o, y), layers=names)
    frozen = [n for n, m in tuned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in names]
    assert sum(mem["per_layer"].get(n, 0) for n in frozen) == 0
    F.cross_entropy(tuned(x), y).backward()
    assert all((p.grad is not None) == any(n.startswith(f + ".") for f in names)
               for n, p in tuned.named_parameters())


def test_compact_keeps_the_training_and_lowers_the_whole_step(pretrained, tmp_path):
    plain = runner.run_finetune(_tiny_config(pretrained, methods=("vanilla",), layers=(4,),
                                             epochs=1), progress=False)["runs"][0]
    compact = runner.run_finetune(_tiny_config(pretrained, methods=("vanilla",), layers=(4,),
                                               epochs=1, compact=True), progress=False)["runs"][0]
    assert compact["status"] == plain["status"] == "ok"
    # exact compaction: the same losses and accuracy, the same fine-tuned layers' bytes
    assert compact["epochs"][0]["train_loss"] == pytest.approx(plain["epochs"][0]["train_loss"],
                                                               rel=1e-6)
    assert compact["accuracy"] == plain["accuracy"]
    assert compact["memory"]["finetuned_layers"] == plain["memory"]["finetuned_layers"]
    # eval-mode BatchNorm and ReLU6 between the four convs keep less than their float inputs
    assert compact["memory"]["whole_step"] < plain["memory"]["whole_step"]
