"""Two real gloo processes with DDP: gathered info_nce equals the single-process loss and gradients."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cirlab.losses import LogitScale, info_nce

WORLD = 2
B_LOCAL = 4
D_IN, D_OUT = 6, 5
# (symmetric, learnable scale, duplicate ids, hard-negative mask); ids repeat across the two ranks'
# halves on purpose; the hard negatives come from the target tower, some of them padding.
CASES = [
    (False, False, None, None),
    (True, True, None, None),
    (True, True, ["a", "b", "c", "d", "b", "e", "a", "f"], None),
    (False, False, [0, 1, 2, 3, 4, 1, 6, 0], None),
    (True, True, ["a", "b", "c", "d", "b", "e", "a", "f"], [True, False, True, True, False, True, True, False]),
]


class _Pair(nn.Module):
    """Tiny two-tower encoder with a logit scale: the shape of a real contrastive model."""

    def __init__(self, learnable: bool) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same init on every process
        self.q = nn.Linear(D_IN, D_OUT)
        self.t = nn.Linear(D_IN, D_OUT)
        self.scale = LogitScale(10.0, learnable=learnable)

    def forward(self, x, y):
        return F.normalize(self.q(x), dim=1), F.normalize(self.t(y), dim=1), self.scale()


def _data():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(WORLD * B_LOCAL, D_IN, generator=g) for _ in range(3))


def _loss(model, x, y, z, symmetric, ids, mask):
    q, t, s = model(x, y)
    negs = None if mask is None else F.normalize(getattr(model, "module", model).t(z), dim=1)
    return info_nce(q, t, s, symmetric=symmetric, gather=True, duplicate_ids=ids, hard_negatives=negs,
                    hard_negative_mask=None if mask is None else torch.tensor(mask))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y, z = _data()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = []
        for symmetric, learnable, ids, mask in CASES:
            model = nn.parallel.DistributedDataParallel(_Pair(learnable))
            loss = _loss(model, x[sl], y[sl], z[sl], symmetric, None if ids is None else ids[sl],
                         None if mask is None else mask[sl])
            loss.backward()  # DDP averages gradients over the ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD
            results.append((mean_loss.item(), _grads(model.module)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are on disk. Leave without C++ teardown: gloo's at-exit clean-up aborts now and then
    # ("terminate called without an active exception", about 1 run in 15 here), unrelated to the loss.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_gathered_info_nce_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x, y, z = _data()
    for c, (symmetric, learnable, ids, mask) in enumerate(CASES):
        model = _Pair(learnable)
        loss = _loss(model, x, y, z, symmetric, ids, mask)
        loss.backward()
        ref = _grads(model)
        for r in range(WORLD):
            got_loss, got_grads = per_rank[r][c]
            assert got_loss == pytest.approx(loss.item(), abs=1e-5), (c, r)
            assert set(got_grads) == set(ref)
            for name, g in ref.items():
                assert g.abs().max() > 0, name  # a vanishing gradient would make the check empty
                torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=0, msg=f"case {c} {name}")
