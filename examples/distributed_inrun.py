"""In-Run Data Shapley under DistributedDataParallel: each rank values its own shard of every batch.

    torchrun --nproc_per_node=2 examples/distributed_inrun.py

(gloo on CPU; with GPUs use backend="nccl" and move the model to the rank's device.)
"""

import torch
import torch.distributed as dist

import datacredit as dc
from datacredit.models import mlp


def main(epochs: int = 2) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    train, test = dc.data.load_digits()
    model = torch.nn.parallel.DistributedDataParallel(mlp(64, 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    task = dc.ClassificationTask()
    shapley = dc.InRunShapley(model, task, validation=test.tensors, optimizer=opt)
    x, y = train.tensors
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # same order on all ranks
        for batch in order.split(64):
            mine = batch[rank::world]  # this rank's shard of the global batch
            with shapley.step(train.ids[mine.numpy()]):
                task.loss(model, (x[mine], y[mine])).mean().backward()
            opt.step()
            opt.zero_grad()
    values = shapley.values()  # gathered from every rank
    if rank == 0:
        print(f"valued {values.n_train} examples on {world} ranks; top: {values.topk(3)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
