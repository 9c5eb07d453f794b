"""The losses against their formulas on small tensors, single-process and across 2 gloo processes."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.core.errors import ConfigError
from tests.conftest import TINY_CONFIG


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(True)
    return image, text


def _loss(entry):
    return clipforge.get_plugin_manager().catalog.create("losses", entry)


def _direct_dcl(image, text, scale):
    logits = scale * image @ text.T
    total = 0.0
    for mat in (logits, logits.T):
        for i in range(mat.shape[0]):
            others = torch.cat([mat[i, :i], mat[i, i + 1 :]])
            total = total + (-mat[i, i] + torch.log(torch.exp(others).sum())) / mat.shape[0]
    return total / 2


def test_dcl_equals_its_formula_and_differs_from_infonce():
    image, text = _features()
    scale = torch.tensor(10.0)
    loss = _loss({"type": "dcl"})(image, text, scale)
    assert torch.allclose(loss, _direct_dcl(image, text, scale), atol=1e-5)
    # InfoNCE keeps the positive in the denominator: its loss is larger than DCL's by the log-ratio
    clip = _loss({"type": "clip"})(image, text, scale)
    assert clip.item() > loss.item()
    loss.backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


def test_clip_equals_cross_entropy_over_rows_and_columns():
    image, text = _features()
    scale = torch.tensor(14.0)
    logits = scale * image @ text.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(_loss({"type": "clip"})(image, text, scale), expected, atol=1e-6)


def test_siglip_equals_its_formula_and_needs_a_logit_bias():
    image, text = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss = _loss({"type": "siglip"})(image, text, scale, bias)
    logits = scale * image @ text.T + bias
    z = 2 * torch.eye(6) - 1
    expected = -F.logsigmoid(z * logits).sum() / 6
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert torch.isfinite(image.grad).all()
    with pytest.raises(ConfigError, match="init_logit_bias"):
        _loss({"type": "siglip"})(image, text, scale, None)


def _tiny_bundle(seed=0, **cfg):
    from clipforge.plugins.encoders.open_clip import create_open_clip

    torch.manual_seed(seed)
    return create_open_clip(config={**copy.deepcopy(TINY_CONFIG), **cfg})


def _batch(bundle, n=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    colors = ("red", "blue", "green", "pink", "grey", "cyan", "gold", "teal")
    tokens = bundle.tokenizer([f"a {c} square" for c in colors[:n]])
    return images, tokens


def _teacher_dir(tmp_path, seed=1, **cfg):
    from clipforge.core.checkpoint import save_open_clip_dir

    return save_open_clip_dir(_tiny_bundle(seed, **cfg), tmp_path / f"teacher-{seed}")


def test_distill_is_contrastive_plus_cross_entropy_to_the_frozen_teacher(tmp_path):
    teacher_dir = _teacher_dir(tmp_path)
    loss_fn = _loss({"type": "distill", "teacher": f"local-dir:{teacher_dir}", "weight": 0.5})
    student = _tiny_bundle(0)
    loss_fn.prepare(student)
    images, tokens = _batch(student)
    out = student.model(images, tokens)
    losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], images=images, texts=tokens)

    teacher = _tiny_bundle(1).model.eval()  # the same weights as the saved teacher
    with torch.no_grad():
        t = teacher(images, tokens)
    s_logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    t_logits = t["logit_scale"] * t["image_features"] @ t["text_features"].T
    labels = torch.arange(4)
    contrastive = (F.cross_entropy(s_logits, labels) + F.cross_entropy(s_logits.T, labels)) / 2
    distill = (
        sum(-(tl.softmax(1) * sl.log_softmax(1)).sum(1).mean() for tl, sl in ((t_logits, s_logits), (t_logits.T, s_logits.T))) / 2
    )
    assert torch.allclose(losses["contrastive_loss"], contrastive, atol=1e-5)
    assert torch.allclose(losses["distill_loss"], 0.5 * distill, atol=1e-5)
    assert torch.allclose(losses["loss"], contrastive + 0.5 * distill, atol=1e-5)
    losses["loss"].backward()
    assert all(p.grad is None for p in loss_fn.teacher.parameters())
    assert all(torch.isfinite(p.grad).all() for p in student.model.parameters() if p.grad is not None)
    loss_fn.train()
    assert not loss_fn.teacher.training


def test_distill_refuses_a_teacher_that_reads_other_inputs(tmp_path):
    teacher_dir = _teacher_dir(tmp_path, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 8})
    loss_fn = _loss({"type": "distill", "teacher": str(teacher_dir)})
    with pytest.raises(ConfigError, match="teacher's image size"):
        loss_fn.prepare(_tiny_bundle(0))
    with pytest.raises(ConfigError, match="not an open_clip model folder"):
        _loss({"type": "distill", "teacher": str(tmp_path / "nowhere")})


# -- two processes, gloo: the global batch gives the single-process loss and gradients ------------

WORLD = 2
# a ViT image tower: batch norm would normalise each rank's half batch by its own statistics
VIT = {"vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}}
ACCUMS = (1, 2)


def _losses(teacher: str) -> list[tuple[dict, int]]:
    """Each loss, and the factor that turns its DDP gradient into one process's: 1, or the world
    size without gather_with_grad (as open_clip: each rank's features get their own rows' gradient;
    the temperature, which every rank uses whole, gets the whole gradient)."""
    return [
        ({"type": "clip", "gather_with_grad": True}, 1),
        ({"type": "clip", "gather_with_grad": True, "local_loss": True}, 1),
        ({"type": "clip"}, WORLD),
        ({"type": "dcl", "gather_with_grad": True, "local_loss": True}, 1),
        ({"type": "siglip"}, 1),
        ({"type": "distill", "teacher": teacher, "gather_with_grad": True, "local_loss": True}, 1),
    ]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _global_run(entry, images, tokens, bias, accum):
    """The loss and gradients of the global batch (``accum`` micro-batches), as the trainer computes them."""
    from clipforge.engine.training.step import forward_backward

    bundle = _tiny_bundle(0, init_logit_bias=-10.0, **VIT) if bias else _tiny_bundle(0, **VIT)
    loss_fn = _loss(entry)
    model = bundle.model
    rank, world = (torch.distributed.get_rank(), WORLD) if torch.distributed.is_initialized() else (0, 1)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    size = images.shape[0] // accum // world  # each rank's share of each global micro-batch
    micro = []
    for j in range(accum):
        first = j * size * world + rank * size
        micro.append((images[first : first + size], tokens[first : first + size]))
    losses = forward_backward(model, loss_fn, micro, contextlib.nullcontext, lambda loss: loss.backward())
    loss = losses["loss"].detach().clone()
    if world > 1:  # the loss of the global batch: the mean of the ranks' losses (local_loss) or any rank's
        torch.distributed.all_reduce(loss)
        loss /= world
    return loss.item(), _grads(bundle.model)


def _worker(rank, port, path, teacher):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        images, tokens = _batch(_tiny_bundle(0), n=8)
        results = [_global_run(e, images, tokens, e["type"] == "siglip", accum) for accum in ACCUMS for e, _ in _losses(teacher)]
        if rank == 0:
            torch.save(results, path)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    """clip, dcl, siglip and distill, gather_with_grad on and off, accum_steps 1 and 2 (DDP with no_sync).
    Tolerance (fp32, the sums run in another order): loss 1e-5 relative; each gradient tensor 1e-4 of its largest entry."""
    path, teacher = tmp_path / "ranks.pt", f"local-dir:{_teacher_dir(tmp_path, **VIT)}"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(path), teacher), nprocs=WORLD, join=True)
    distributed = iter(torch.load(path, weights_only=True))
    images, tokens = _batch(_tiny_bundle(0), n=8)
    for accum in ACCUMS:
        for entry, factor in _losses(teacher):
            loss, grads = next(distributed)
            ref_loss, ref_grads = _global_run(entry, images, tokens, entry["type"] == "siglip", accum)
            assert math.isclose(loss, ref_loss, rel_tol=1e-5), (entry, accum)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                scale = 1 if name in ("logit_scale", "logit_bias") else factor
                error = (scale * grads[name] - ref_grads[name]).abs().max().item()
                assert error <= 1e-4 * ref_grads[name].abs().max().item() + 1e-7, (entry, accum, name, error)
