"""Feeding the training step: endless, resumable batches and the device they run on.

EpochSampler turns loading.MixtureSampler's per-epoch order into endless (epoch, index) pairs for
one process; Batches draws them through one DataLoader whose workers start once for the whole run
and records its position, so a resumed run draws exactly the batches the uninterrupted one would
have drawn next. to_device and autocast put a batch and its forward pass on the device (bf16
autocast on CUDA, full fp32 on CPU). Used by pretrain.py and posttrain.py through trainer.py's loop
helpers, and by the evaluation and benchmark scripts.
"""
import contextlib
import signal

import torch

from loading import MixtureSampler, make_loader


class EpochSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) pairs for one process: epoch after epoch of MixtureSampler's order,
    every world-th index from `rank`, each epoch cut to whole batches so that no batch straddles two
    epochs (the count per epoch is the same on every process). The epoch travels with the index:
    persistent DataLoader workers cannot be told `dataset.set_epoch`, so the dataset reads it from
    the pair (data._Resilient.__getitem__). Iteration starts at `start` = (epoch, global samples of
    that epoch already consumed)."""

    def __init__(self, sizes, batch_size, seed, rank, world):
        self.mixture, self.batch_size, self.rank, self.world = MixtureSampler(sizes, seed=seed), batch_size, rank, world
        self.per_epoch = len(self.mixture) // world // batch_size * batch_size * world  # global samples
        self.start = (0, 0)

    def __iter__(self):
        epoch, consumed = self.start
        while True:
            mine = self.mixture.indices(epoch)[self.rank:self.per_epoch:self.world]
            for index in mine[consumed // self.world:].tolist():
                yield epoch, index
            epoch, consumed = epoch + 1, 0


class Batches:
    """Endless batches for this process from one DataLoader over an EpochSampler, its workers
    started once for the whole run (spawned, see loading.make_loader). Position = (epoch, global
    samples consumed this epoch), counted as batches arrive here (the workers run ahead), so a
    resumed run draws exactly the batches the uninterrupted run would have drawn next."""

    def __init__(self, dataset, collate, cfg, d):
        if len(dataset) < cfg.batch_size * d.world:
            raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples; one step needs "
                             f"batch_size x processes = {cfg.batch_size * d.world}")
        self.sampler = EpochSampler(dataset.sizes, cfg.batch_size, cfg.seed, d.rank, d.world)
        self.global_batch = cfg.batch_size * d.world
        # Own generator: starting an iterator must not draw from the global RNG (exact resume).
        self.loader = make_loader(dataset, cfg.batch_size, collate, self.sampler, cfg.workers, drop_last=True,
                                  worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(cfg.seed))
        self.epoch, self.consumed, self.it = 0, 0, None

    def __next__(self):
        if self.it is None:  # first batch, or after load_state_dict (persistent workers are reused)
            self.sampler.start = (self.epoch, self.consumed)
            self.it = iter(self.loader)
        if self.consumed >= self.sampler.per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        batch = next(self.it)
        self.consumed += self.global_batch
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, s):
        self.epoch, self.consumed, self.it = int(s["epoch"]), int(s["consumed"]), None


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the main process reacts to Ctrl-C


def to_device(batch, device):
    """Tensors to the device; the Collator's count of skipped samples stays behind (the loop reads
    it before)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            if k != "skipped"}


def autocast(device):
    """bf16 autocast on CUDA (method.md §7.1); full fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


