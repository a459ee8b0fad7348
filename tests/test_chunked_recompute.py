"""A conv -> BatchNorm -> per-sample block recomputed one batch chunk at a time in backward
(lance_cl.core.compact.chunked): the gradients of the whole-batch block (float64 autograd),
what it saves, its random state, running statistics and peak."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import lance_cl
from lance_cl.accounting import measure_peak_step_memory
from lance_cl.core.compact import recompute_segment
from lance_cl.core.compact import recompute as recompute_module
from lance_cl.core.compact.chunked import (ChunkedBlock, channel_moments, chunk_count, chunk_seed,
                                          chunked_block)
from lance_cl.core.compact.dropout import keep_mask


@pytest.fixture
def always_chunk(monkeypatch):
    """Chunk every chunkable block, however small its feature maps (the tests' shapes are)."""
    monkeypatch.setattr(recompute_module, "CHUNK_BYTES", 1)


def _block(train: bool, affine: bool, bias: bool, stride: int, padding: int, tail: str):
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, bias=bias)
    norm = nn.BatchNorm2d(5, affine=affine)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        if affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    tails = {"relu_pool": [nn.ReLU(inplace=True), nn.MaxPool2d(2)],
             "leaky": [nn.LeakyReLU(0.1)],
             "relu6_avg": [nn.ReLU6(), nn.AvgPool2d(2, ceil_mode=True)],
             "none": []}[tail]
    modules = [m.double().train(train) for m in [conv, norm, *tails]]
    return modules


@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("affine,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("stride,padding,tail", [(1, 0, "relu_pool"), (2, 1, "leaky"),
                                                 (1, 1, "relu6_avg"), (1, 0, "none")])
@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "stem"])
@pytest.mark.parametrize("keep_tail", [False, True], ids=["tail_recomputed", "tail_kept"])
def test_gradients_are_the_whole_batch_ones(train, affine, bias, stride, padding, tail, chunks,
                                            input_grad, keep_tail):
    """With an input gradient, batch statistics take two passes; without one (a stem), one.
    A kept tail (its graph from the forward) gives the same gradients; an average pool or no
    tail at all cannot be kept and is recomputed."""
    torch.manual_seed(0)
    modules = _block(train, affine, bias, stride, padding, tail)
    reference = nn.Sequential(*copy.deepcopy(modules))
    for m in reference:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(7, 3, 11, 11, dtype=torch.float64, requires_grad=input_grad)
    expected = reference(x)
    g = torch.randn_like(expected)
    wanted = ([x] if input_grad else []) + list(reference.parameters())
    expected_grads = torch.autograd.grad(expected, wanted, g)

    block = dataclasses.replace(ChunkedBlock.from_modules(modules, chunks), keep_tail=keep_tail)
    assert block.keeps_tail() == (keep_tail and tail in ("relu_pool", "leaky"))
    out = chunked_block(x, block)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = [p for m in modules for p in m.parameters()]
    if input_grad:
        (grad_x,) = torch.autograd.grad(out, x, g)
        torch.testing.assert_close(grad_x, expected_grads[0], rtol=1e-10, atol=1e-12)
        expected_grads = expected_grads[1:]
    else:
        out.backward(g)
    for p, q in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, q, rtol=1e-10, atol=1e-12)
    for a, b in zip(modules[1].buffers(), reference[1].buffers()):   # running stats moved once
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("conv_kind", ["frozen", "parametrized"])
def test_a_frozen_or_parametrized_stem_conv_gets_the_whole_batch_gradients(conv_kind):
    """A stem whose conv trains nothing (one pass, no conv gradient) or whose weight is a
    parametrization (its gradient rows are not separable by channel: the two-pass path)."""
    torch.manual_seed(7)
    modules = _block(True, True, True, 1, 0, "relu_pool")
    if conv_kind == "frozen":
        modules[0].weight.requires_grad_(False)
        modules[0].bias.requires_grad_(False)
    else:
        torch.nn.utils.parametrizations.weight_norm(modules[0])
    reference = nn.Sequential(*copy.deepcopy(modules))
    reference[2].inplace = False
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    expected = reference(x)
    g = torch.randn_like(expected)
    expected.backward(g)
    chunked_block(x, ChunkedBlock.from_modules(modules, 3)).backward(g)
    for m, r in zip(modules, reference):
        for p, q in zip(m.parameters(), r.parameters()):
            assert (p.grad is None) == (not q.requires_grad)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keep_tail", [False, True], ids=["tail_recomputed", "tail_kept"])
def test_dropout_masks_are_drawn_per_chunk_and_redrawn_identically(keep_tail):
    torch.manual_seed(1)
    conv, norm = nn.Conv2d(2, 4, 3).double(), nn.BatchNorm2d(4).double()
    drop, pool = nn.Dropout(0.4), nn.MaxPool2d(2)
    x = torch.randn(6, 2, 10, 10, dtype=torch.float64)
    reference = [copy.deepcopy(m) for m in (conv, norm)]
    state = torch.get_rng_state()
    block = ChunkedBlock.from_modules([conv, norm, nn.ReLU(), drop, pool], 3)
    out = chunked_block(x, dataclasses.replace(block, keep_tail=keep_tail))
    g = torch.randn_like(out)
    after = torch.get_rng_state()
    out.backward(g)
    assert torch.equal(torch.get_rng_state(), after)        # backward leaves the RNG alone
    # the independent truth: whole-batch autograd with the masks keep_mask draws for each
    # chunk c from chunk_seed(seed, c) + 1 (the dropout is the tail's op 1), seed being the one
    # number the forward draws from the global generator
    torch.set_rng_state(state)
    seed = int(torch.randint(0, 2 ** 62, (1,)))
    masks = torch.cat([keep_mask((2, 4, 8, 8), 0.4, chunk_seed(seed, c) + 1, x.device)
                       for c in range(3)]).double() / 0.6
    expected = F.max_pool2d(torch.relu(reference[1](reference[0](x))) * masks, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    expected.backward(g)
    for m, r in zip((conv, norm), reference):
        for p, q in zip(m.parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_only_the_input_and_per_channel_statistics_are_saved():
    modules = _block(True, True, False, 1, 0, "relu_pool")
    x = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        chunked_block(x, ChunkedBlock.from_modules(modules, 4))
    big = [s for s in saved if s[1] != torch.uint8 and len(s[0]) > 1]
    assert big == [((8, 3, 12, 12), torch.float64)]                 # x, nothing of the feature map
    assert {s for s in saved if s not in big} <= {((5,), torch.float64), ((1,), torch.int64)}


def test_a_kept_tail_saves_its_masks_and_offsets_only():
    """Kept: x, the statistics, and per chunk the ReLU's 1-bit mask, the dropout's 1-bit mask and
    the pool's uint8 offsets, counted by hand; nothing of the feature maps in float."""
    torch.manual_seed(2)
    conv, norm = nn.Conv2d(3, 5, 3, bias=False).double(), nn.BatchNorm2d(5).double()
    block = ChunkedBlock.from_modules([conv, norm, nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2)], 4)
    block = dataclasses.replace(block, keep_tail=True)
    x = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked_block(x, block)
    floats = [tuple(t.shape) for t in saved if t.is_floating_point() and t.dim() > 1]
    assert floats == [(8, 3, 12, 12)]
    chunk_map, chunk_pooled = 2 * 5 * 10 * 10, 2 * 5 * 5 * 5        # 2 samples per chunk
    assert sum(t.numel() for t in saved if t.dtype == torch.uint8) == \
        4 * (2 * (chunk_map // 8) + chunk_pooled)
    out.backward(torch.randn_like(out))
    assert conv.weight.grad is not None and norm.weight.grad is not None


def test_a_tail_that_would_save_floats_is_not_kept():
    conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    keep = lambda *tail: dataclasses.replace(                              # noqa: E731
        ChunkedBlock.from_modules([conv, norm, *tail], 2), keep_tail=True).keeps_tail()
    assert keep(nn.ReLU6(), nn.Dropout2d(0.1), nn.MaxPool2d(3, 2, 1))
    assert keep(nn.LeakyReLU(0.2), nn.Identity())
    assert not keep(nn.SiLU())                    # saves its input
    assert not keep(nn.ReLU(), nn.AvgPool2d(2))   # not one of the ops kept compactly
    assert not keep(nn.MaxPool2d(2, return_indices=True))   # its indices are int64
    assert not keep(nn.Identity())                # nothing to keep


@pytest.mark.parametrize("shape,mask_shape", [((4, 3, 5, 5), (4, 3, 5, 5)), ((4, 3, 5, 5), (4, 3, 1, 1))])
def test_seeded_dropout_scales_by_its_mask_and_saves_it_bit_packed(shape, mask_shape):
    """compact_dropout with the caller's seed and a broadcast mask shape, as the kept tail
    draws it: the mask is keep_mask's for that seed."""
    from lance_cl.core.compact import compact_dropout

    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = keep_mask(mask_shape, 0.4, 1234, x.device)
    state = torch.get_rng_state()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = compact_dropout(x, 0.4, "packed", seed=1234, mask_shape=mask_shape)
    assert torch.equal(torch.get_rng_state(), state)       # a given seed draws nothing global
    expected = x.detach() * mask / 0.6
    torch.testing.assert_close(y, expected, rtol=1e-15, atol=0)
    assert [t.dtype for t in saved] == [torch.uint8]
    assert saved[0].numel() == -(-mask.numel() // 8)
    g = torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, g * mask / 0.6, rtol=1e-15, atol=0)


def test_not_a_chunkable_block_is_refused():
    conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    assert ChunkedBlock.from_modules([conv, norm, nn.ReLU()], 2) is not None
    assert ChunkedBlock.from_modules([conv, norm, nn.Flatten()], 2) is None      # not per sample
    assert ChunkedBlock.from_modules([conv, nn.ReLU()], 2) is None
    assert ChunkedBlock.from_modules([conv, norm], 1) is None


@pytest.mark.parametrize("name", ["alexnet", "small_cnn", "reduced_resnet18"])
def test_models_declare_their_stem_chain(name):
    from lance_cl.models import AlexNet5, ReducedResNet18, SmallCNN

    torch.manual_seed(2)
    model = {"alexnet": lambda: AlexNet5(n_tasks=1, n_classes=3, dropout=False),
             "small_cnn": lambda: SmallCNN(n_tasks=1, n_classes=3, in_channels=3),
             "reduced_resnet18": lambda: ReducedResNet18(n_tasks=1, n_classes=3)}[name]()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    chained = x
    for m in model.segment_modules("stem"):
        chained = m(chained)
    torch.testing.assert_close(chained, model.stem(x), rtol=0, atol=0)


def test_chunk_count_keeps_chunks_near_the_byte_target():
    conv = nn.Conv2d(3, 64, 4)                                   # 32 -> 29
    x = torch.empty(64, 3, 32, 32)
    out_bytes = 64 * 64 * 29 * 29 * 4                            # 13.1 MiB
    assert chunk_count(conv, x, 8, 4 << 20) == -(-out_bytes // (4 << 20)) == 4
    assert chunk_count(conv, x, 8, 1 << 20) == 8                 # capped at max_chunks
    assert chunk_count(conv, x[:3], 8, 1) == 3                   # at most one per sample
    assert chunk_count(conv, x, 8, out_bytes) == 1               # small enough: whole
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1)            # 32 -> 16
    assert chunk_count(strided, x, 64, 64 * 8 * 16 * 4) == 16
    assert chunk_count(nn.Conv2d(3, 8, 3, padding="same"), x, 64, 64 * 8 * 32 * 4) == 32


def test_a_small_stem_is_recomputed_whole():
    """Below two CHUNK_BYTES of conv output the block is not chunked: no random state saved."""
    modules = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()]
    x = torch.randn(4, 3, 8, 8)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append((t.dtype, t.data_ptr())) or t, lambda t: t):
        recompute_segment(nn.Sequential(*modules), x, nn.Sequential(*modules), modules=modules)
    assert set(saved) == {(torch.float32, x.data_ptr())}          # x only, no random state


def test_compacted_alexnet_stem_is_chunked_and_exact(always_chunk):
    from lance_cl.models import AlexNet5

    torch.manual_seed(3)
    plain = AlexNet5(n_tasks=1, n_classes=3, dropout=False).double()
    model = copy.deepcopy(plain)
    lance_cl.compact_activations(model, recompute=["stem"])
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    kinds = []
    with saved_tensors_hooks(lambda t: kinds.append(t.shape) or t, lambda t: t):
        out = model(x, 0)
    assert (6, 64, 29, 29) not in [tuple(s) for s in kinds]     # no stem feature map saved
    (out.square().sum()).backward()
    plain(x, 0).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11)


def test_alexnet_stem_with_its_tail_kept_has_the_recomputed_gradients(always_chunk):
    """segment_tail="keep" against "recompute" on AlexNet-5 with dropout: the same seed, hence
    the same masks, so the same output and float64 gradients; the kept tail adds only uint8."""
    from lance_cl.models import AlexNet5

    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    results = {}
    for tail in ("recompute", "keep"):
        torch.manual_seed(8)
        model = AlexNet5(n_tasks=1, n_classes=3).double()
        report = lance_cl.compact_activations(model, recompute=["stem"], segment_tail=tail)
        assert ("masks and offsets" in str(report)) == (tail == "keep")
        torch.manual_seed(9)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(x, 0)
        out.square().sum().backward()
        results[tail] = (out.detach(), [p.grad.clone() for p in model.parameters()],
                         sorted((str(t.dtype), t.numel()) for t in saved))
    torch.testing.assert_close(results["keep"][0], results["recompute"][0], rtol=1e-12, atol=1e-12)
    for p, q in zip(results["keep"][1], results["recompute"][1]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    extra = list(results["keep"][2])
    for item in results["recompute"][2]:
        extra.remove(item)
    assert extra and {dtype for dtype, _ in extra} == {"torch.uint8"}
    with pytest.raises(ValueError, match="segment_tail='both'"):
        lance_cl.compact_activations(AlexNet5(1, 3), recompute=["stem"], segment_tail="both")


def test_a_recomputed_sequential_submodule_is_chunked_and_exact(always_chunk):
    torch.manual_seed(6)
    plain = nn.Sequential(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU6()),
                          nn.Conv2d(6, 4, 3), nn.Flatten()).double()
    model = copy.deepcopy(plain)
    lance_cl.compact_activations(model, recompute=["0"])
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = model(x)
    assert saved.count((5, 6, 7, 7)) == 1     # the next conv's input; no x_hat of the stem's
    out.square().sum().backward()
    plain(x).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(model.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_a_compressed_conv_in_the_block_keeps_its_own_weight_gradient(always_chunk):
    """LANCE's conv1 inside the chunked stem: the same gradients as the whole-batch recompute."""
    from lance_cl.models import AlexNet5

    torch.manual_seed(4)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    models = []
    for chained in (True, False):
        torch.manual_seed(4)
        model = AlexNet5(n_tasks=1, n_classes=3, dropout=False).double()
        lance_cl.compress(model, "lance", layers=["conv1"], example_inputs=(x,), eps=0.7)
        lance_cl.calibrate(model, [(x, torch.zeros(8, dtype=torch.long))], progress=False)
        lance_cl.compact_activations(model, recompute=["stem"])
        if not chained:
            model.segment_chains = {}
        model(x, 0).square().sum().backward()
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11)


class _Recomputed(nn.Module):
    def __init__(self, modules, chunked: bool):
        super().__init__()
        self.seq = nn.Sequential(*modules)
        self.chunked = chunked

    def forward(self, x):
        modules = list(self.seq) if self.chunked else None
        return recompute_segment(self.seq, x, self.seq, modules=modules, chunks=8)


def test_peak_is_below_the_whole_batch_recompute(always_chunk):
    torch.manual_seed(5)
    modules = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)]
    x = torch.randn(32, 3, 32, 32)
    feature_map = 32 * 32 * 32 * 32 * 4                 # one float32 (32, 32, 32, 32) map
    peaks = {}
    for chunked in (False, True):
        model = _Recomputed(copy.deepcopy(modules), chunked)
        peaks[chunked] = measure_peak_step_memory(model, x, lambda o: o.sum())["peak_bytes"]
    if None in peaks.values():
        pytest.skip("another profiler session is active")
    # the whole-batch recompute holds several full feature maps at once in its backward (4.3
    # measured); the chunked one a full map in its forward (the conv output, kept for the batch
    # statistics) and a few chunk-sized (1/8) temporaries next to it (1.75 measured)
    assert peaks[False] > 3 * feature_map
    assert peaks[True] < 2 * feature_map


@pytest.mark.parametrize("sizes", [(5,), (2, 2, 1), (1, 3, 1)])
def test_channel_moments_are_the_batch_variance_and_mean(sizes):
    gen = torch.Generator().manual_seed(3)
    # a mean 20x the spread: a one-pass E[z^2] - mean^2 would lose digits here
    z = torch.randn(sum(sizes), 4, 3, 5, generator=gen, dtype=torch.float64) * 0.5 + 10.0
    var, mean = channel_moments(list(z.split(list(sizes))))
    ref_var, ref_mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=0)
    var32, mean32 = channel_moments(list(z.float().split(list(sizes))))
    torch.testing.assert_close(var32.double(), ref_var, rtol=1e-5, atol=0)


def test_expansion_segments_are_the_widening_1x1_conv_norm_activation_blocks():
    import torchvision

    from lance_cl.compact import expansion_segments
    from lance_cl.models import AlexNet5, MobileNetV2Blocks

    blocks = MobileNetV2Blocks(in_channels=3, n_classes=3)
    # blocks.0 expands 1x (16 -> 16 channels): not a segment worth recomputing
    assert expansion_segments(blocks) == tuple(f"blocks.{i}.expand" for i in range(1, 7))
    tv = torchvision.models.mobilenet_v2(num_classes=3)
    # features.1 has expansion 1 (no expand layer); 2-17 widen 6x; features.18, 320 -> 1280
    assert expansion_segments(tv) == tuple(f"features.{i}.conv.0" for i in range(2, 18)) + (
        "features.18",)
    assert expansion_segments(AlexNet5(n_tasks=1, n_classes=3)) == ()
    assert expansion_segments(blocks, min_ratio=7) == ()
    # what exact compaction recomputes by default: the stem, then the expansions
    from lance_cl.compact import default_recompute
    assert default_recompute(blocks) == ("stem",) + expansion_segments(blocks)
    assert default_recompute(AlexNet5(n_tasks=1, n_classes=3)) == ("stem",)


def test_recomputed_expansions_keep_the_gradients_and_drop_their_saved_maps():
    from lance_cl.compact import expansion_segments
    from lance_cl.models import MobileNetV2Blocks

    torch.manual_seed(4)
    plain = MobileNetV2Blocks(in_channels=3, n_classes=3).double().train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    ref_model = copy.deepcopy(plain)
    ref = torch.autograd.grad(F.cross_entropy(ref_model(x), y), list(ref_model.parameters()))
    loss = lambda o: F.cross_entropy(o, y)  # noqa: E731
    stored = lance_cl.measure_activation_memory(copy.deepcopy(plain), x, loss)["total"]
    measured = copy.deepcopy(plain)
    lance_cl.compact_activations(measured, recompute=expansion_segments(measured))
    recomputed = lance_cl.measure_activation_memory(measured, x, loss)["total"]
    model = copy.deepcopy(plain)
    lance_cl.compact_activations(model, recompute=expansion_segments(model))
    got = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the 6x expanded map of blocks.1 alone is (4, 96, 16, 16) float64 = 768 KiB
    assert stored - recomputed > 768 * 1024
    # running statistics advanced once per forward, as without recomputation
    for (name, buf), ref_buf in zip(model.named_buffers(), ref_model.buffers()):
        if "running" in name:
            torch.testing.assert_close(buf, ref_buf, rtol=1e-9, atol=1e-12)
