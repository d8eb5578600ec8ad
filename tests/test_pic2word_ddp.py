"""Two real gloo processes with DDP: Pic2Word's loss and mapper gradients equal one process on the
whole batch, with the reference's gather (no gradient, local first) and with gather-with-gradient;
and info_nce's no-gradient gather with a learnable scale and duplicate ids."""

from __future__ import annotations

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
B_LOCAL = 3
IDS = ["a", "b", "c", "b", "d", "a"]  # repeats across the two ranks' halves


def _task(gather_with_grad: bool):
    from cirlab.train.config import BackboneConfig
    from cirlab.train.pic2word_task import Pic2WordTask

    torch.manual_seed(0)  # the same towers and mapper on every process
    # dropout off: each process would draw other masks than the single process
    return Pic2WordTask(mapper_dropout=0.0, gather_with_grad=gather_with_grad,
                        backbone=BackboneConfig("cirlab-tiny"))


def _features(dim: int) -> torch.Tensor:
    return torch.randn(WORLD * B_LOCAL, dim, generator=torch.Generator().manual_seed(1))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.t = nn.Linear(6, 5), nn.Linear(6, 5)
        self.scale = LogitScale(10.0, learnable=True)

    def forward(self, x, y):
        return F.normalize(self.q(x), dim=1), F.normalize(self.t(y), dim=1), self.scale()


def _pair_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(WORLD * B_LOCAL, 6, generator=g), torch.randn(WORLD * B_LOCAL, 6, generator=g)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for with_grad in (False, True):
            task = _task(with_grad)
            task.mapper = nn.parallel.DistributedDataParallel(task.mapper)
            task.train()
            loss = task.pic2word_loss(_features(task.backbone.embed_dim)[sl])
            loss.backward()  # DDP averages the mapper's gradients over the ranks
            results[f"task-{with_grad}"] = (loss.item(), _grads(task.mapper.module))
        x, y = _pair_data()
        model = nn.parallel.DistributedDataParallel(_Pair())
        q, t, s = model(x[sl], y[sl])
        loss = info_nce(q, t, s, symmetric=True, duplicate_ids=IDS[sl], gather_with_grad=False)
        loss.backward()
        results["pair"] = (loss.item(), _grads(model.module))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # results are on disk; skip gloo's at-exit teardown, which aborts now and then


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_grads_equal(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, g in want.items():
        assert g.abs().max() > 0, (what, name)  # a vanishing gradient would make the check empty
        torch.testing.assert_close(got[name], g, atol=2e-5, rtol=1e-4, msg=f"{what} {name}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_equal_one_for_both_gather_modes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for with_grad in (False, True):
        task = _task(with_grad)
        task.train()
        loss = task.pic2word_loss(_features(task.backbone.embed_dim))
        loss.backward()
        want = _grads(task.mapper)
        assert set(want) == {n for n, _ in task.mapper.named_parameters()}
        losses = [ranks[r][f"task-{with_grad}"][0] for r in range(WORLD)]
        if with_grad:  # each rank holds its rows' loss; their mean is the global one
            assert sum(losses) / WORLD == pytest.approx(loss.item(), abs=1e-5)
        else:  # the reference's scheme: every rank computes the whole global loss
            assert all(v == pytest.approx(loss.item(), abs=1e-5) for v in losses)
        for r in range(WORLD):
            _assert_grads_equal(ranks[r][f"task-{with_grad}"][1], want, f"gather_with_grad={with_grad} rank {r}")
    x, y = _pair_data()
    model = _Pair()
    q, t, s = model(x, y)
    loss = info_nce(q, t, s, symmetric=True, duplicate_ids=IDS)
    loss.backward()
    for r in range(WORLD):
        got_loss, got_grads = ranks[r]["pair"]
        assert got_loss == pytest.approx(loss.item(), abs=1e-5)
        _assert_grads_equal(got_grads, _grads(model), f"info_nce pair rank {r}")  # incl. the learnable scale
