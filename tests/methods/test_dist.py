"""The rank-invariance helpers: 2 gloo processes with half a batch each compute what 1 process with
the whole batch computes — losses, random draws and (averaged) gradients."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastvl.dist import global_uniform
from fastvl.objectives.itc import itc_loss
from fastvl.objectives.mlm import mlm_loss

from ..two_ranks import spawn_two_ranks


def _problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 4, 5, generator=g)


def _loss(image_raw, text_raw, token_raw, rows):
    image = F.normalize(image_raw[rows], dim=-1)
    text = F.normalize(text_raw[rows], dim=-1)
    itc, _, _ = itc_loss(image, text, torch.tensor(0.2))
    u = global_uniform(rows.stop - rows.start, (4,), seed=3, step=7, stream=1, device=torch.device("cpu"))
    picked = u < 0.5  # a rank-dependent number of "masked" tokens, as in MLM
    mlm = mlm_loss(token_raw[rows][picked], torch.zeros(int(picked.sum()), dtype=torch.long))
    return itc + mlm, u


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    image, text, tokens = (t.clone().requires_grad_() for t in _problem())
    loss, u = _loss(image, text, tokens, slice(rank * 4, rank * 4 + 4))
    loss.backward()
    for t in (image, text, tokens):
        dist.all_reduce(t.grad)
        t.grad /= 2  # data-parallel gradient averaging
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        # numpy, not tensors: tensors cross processes as shared fds that die with this process
        out.put(tuple(t.numpy() for t in (torch.stack(losses).mean(), image.grad, text.grad, tokens.grad)))
    out.put((rank, u.numpy()))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    image, text, tokens = (t.clone().requires_grad_() for t in _problem())
    loss, u_all = _loss(image, text, tokens, slice(0, 8))
    loss.backward()

    results = spawn_two_ranks(_worker, 3)
    grads = [torch.from_numpy(a) for a in next(r for r in results if len(r) == 4)]
    draws = {rank: torch.from_numpy(u) for rank, u in (r for r in results if len(r) == 2)}
    assert torch.allclose(grads[0], loss.detach(), atol=1e-6)
    for got, want in zip(grads[1:], (image.grad, text.grad, tokens.grad)):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(torch.cat([draws[0], draws[1]]), u_all)


def _agent_grads_worker(rank, port, out):
    from fastvl.masking.curriculum import _average_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    for i, p in enumerate(module.parameters()):
        p.grad = None if i == 1 else torch.full_like(p, float(rank + 1) * (i + 1))
    _average_gradients(module)
    out.put((rank, [None if p.grad is None else p.grad.numpy() for p in module.parameters()]))
    dist.destroy_process_group()


def test_agent_gradients_are_averaged_over_ranks():
    """The PPO agent's whole-batch update: one flattened all-reduce gives every rank the mean gradient
    of every parameter, leaves parameters without a gradient alone and keeps the shapes."""
    shapes = [(2, 3), None, (1, 2), (1,)]  # Linear(3, 2).weight, .bias (no grad), Linear(2, 1).weight, .bias
    for _, grads in spawn_two_ranks(_agent_grads_worker, 2):
        assert grads[1] is None
        for i in (0, 2, 3):
            assert grads[i].shape == shapes[i] and (grads[i] == 1.5 * (i + 1)).all(), (i, grads[i])
