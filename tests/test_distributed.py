"""DistributedDataParallel and synchronized BN with two gloo processes on the CPU: two halves
of a batch, BN synchronised across them, must give what one process gets on the whole batch
(outputs, DDP-averaged gradients, running statistics)."""
import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedres

WORLD = 2


def batches():
    torch.manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,)))
            for _ in range(2)]


def model(bn=None, arch="resnet18"):
    """ResNet-18 (or the pre-activation one, whose adds are chained with the next BN) in
    float64 (the comparisons below are exact up to float64 rounding; in float32 the second
    step's gradients are ill-conditioned, torchvision's own 1-4% from float64); bn: keyword
    arguments of its BatchNorm2d layers (eps, momentum)."""
    torch.manual_seed(0)
    return fusedres.get_model(arch, num_classes=10, norm_layer=functools.partial(
        torch.nn.BatchNorm2d, **(bn or {}))).double()


def train(net, data, rank=None):
    """Two SGD steps; returns the outputs and the gradients of the last step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, target in data:
        if rank is not None:  # this process's half of the batch
            x, target = x.chunk(WORLD)[rank], target.chunk(WORLD)[rank]
        optimizer.zero_grad()
        out = net(x)
        F.cross_entropy(out, target).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        optimizer.step()
    return out.detach(), grads


def worker(rank, init_file, result_file, sync, steps, bn, arch):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    fusedres.set_backend("cpp")
    net = model(bn, arch)
    if sync:
        net = fusedres.convert_sync_batchnorm(net)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    out, grads = train(ddp, batches()[:steps], rank)
    outs = [torch.empty_like(out) for _ in range(WORLD)]
    dist.all_gather(outs, out)
    if rank == 0:
        torch.save({"out": torch.cat(outs), "grads": grads,
                    "state": {k: v.clone() for k, v in net.state_dict().items()}}, result_file)
    dist.destroy_process_group()


def run_two_processes(sync, steps=2, bn=None, arch="resnet18"):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), result, sync, steps, bn, arch),
                 nprocs=WORLD)
        return torch.load(result)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("bn, arch", [({}, "resnet18"),
                                      ({"eps": 1e-3, "momentum": None}, "resnet18"),
                                      ({}, "preact_resnet18")],
                         ids=["default", "cumulative", "preact"])
def test_sync_batchnorm_and_ddp_match_one_process_on_the_whole_batch(bn, arch):
    """Also with BNs of another eps and a cumulative average (momentum=None), and the
    pre-activation ResNet (whose synchronised BNs take no part in the add + BN chain)."""
    fusedres.set_backend("cpp")
    whole = model(bn, arch)
    ref_out, ref_grads = train(whole, batches())
    result = run_two_processes(sync=True, bn=bn, arch=arch)
    assert relative(result["out"], ref_out) < 1e-10
    for g, ref_g in zip(result["grads"], ref_grads):
        assert relative(g, ref_g) < 1e-10
    for key, value in whole.state_dict().items():
        if value.is_floating_point():
            assert relative(result["state"][key], value) < 1e-10, key
        else:
            assert torch.equal(result["state"][key], value), key


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_without_sync_uses_local_statistics():
    """Plain DDP (one step): each process normalises its own half, so the result differs from
    the whole batch, and rank 0 matches one process on rank 0's half."""
    fusedres.set_backend("cpp")
    whole = model()
    ref_out, _ = train(whole, batches()[:1])
    result = run_two_processes(sync=False, steps=1)
    assert relative(result["out"], ref_out) > 1e-3  # local statistics: not the whole batch
    half = model()
    out, _ = train(half, batches()[:1], rank=0)
    assert relative(result["out"][:4], out) < 1e-10
