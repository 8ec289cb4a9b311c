"""Data-parallel training: 2 CPU processes (gloo) end with bit-identical weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from bdia_pam.data import load_digits
    from bdia_pam.model import BDIAConfig
    from bdia_pam.train import TrainConfig, dist_from_env, train
    d = dist_from_env()
    mc = BDIAConfig(arithmetic="float", depth=2, width=16, heads=2)
    tc = TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=1)
    out = os.path.join(tmp, "run") if rank == 0 else None
    if out:
        os.makedirs(out)
    s = train(mc, tc, load_digits(), out, d=d, progress=False)
    torch.save({k: v.detach().clone() for k, v in s["model"].state_dict().items()},
               os.path.join(tmp, f"rank{rank}.pt"))
    torch.save(s["losses"], os.path.join(tmp, f"losses{rank}.pt"))
    import torch.distributed as dist
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_ranks_hold_identical_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k].view(torch.int32), w1[k].view(torch.int32)), k
    assert torch.load(tmp_path / "losses0.pt") == torch.load(tmp_path / "losses1.pt")
    # only rank 0 wrote output, and the weights moved
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*/model.safetensors"))) >= 1
    from bdia_pam.model import BDIAConfig, BDIATransformer
    torch.manual_seed(1)
    init = BDIATransformer(BDIAConfig(arithmetic="float", depth=2, width=16, heads=2)).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)
