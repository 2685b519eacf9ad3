"""How samples reach a training loop: the dataset mixture and the DataLoader.

  - mixture_weights / MixtureSampler (method.md §7.3): each draw picks a dataset with probability
    ~ n^0.43, then that dataset's next index in its own shuffled order; deterministic per (seed,
    epoch) and resumable mid-epoch;
  - make_loader: a DataLoader whose workers are spawned, not forked.
"""
import numpy as np
import torch


def mixture_weights(sizes, alpha=0.43):
    """method.md §7.3: sampling probability of each dataset proportional to n^0.43."""
    w = np.asarray(sizes, np.float64) ** alpha
    return w / w.sum()


class MixtureSampler(torch.utils.data.Sampler):
    """Global indices into a dataset made of consecutive parts of `sizes`: each draw picks a part
    by mixture_weights, then the next index of that part's own shuffled order (without replacement
    until the part is exhausted). Deterministic per (seed, epoch); `state_dict` resumes mid-epoch."""

    def __init__(self, sizes, num_samples=None, alpha=0.43, seed=0):
        self.sizes, self.alpha, self.seed = list(sizes), alpha, seed
        self.num_samples = int(num_samples or sum(self.sizes))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        part = rng.choice(len(self.sizes), size=self.num_samples, p=mixture_weights(self.sizes, self.alpha))
        offsets = np.cumsum([0] + self.sizes)
        out = np.empty(self.num_samples, np.int64)
        for p, n in enumerate(self.sizes):
            where = np.flatnonzero(part == p)
            order = np.concatenate([rng.permutation(n) for _ in range(-(-len(where) // n))] or [[]])
            out[where] = offsets[p] + order[:len(where)].astype(np.int64)
        return out

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self.indices(self.epoch)[start:].tolist())

    def __len__(self):
        return self.num_samples

    def state_dict(self, consumed):
        return {"epoch": self.epoch, "start": int(consumed)}

    def load_state_dict(self, d):
        self.epoch, self.start = int(d["epoch"]), int(d["start"])


def make_loader(dataset, batch_size, collate_fn, sampler=None, workers=2, persistent=True, **kwargs):
    """A DataLoader with spawned, not forked, workers: a forked child inherits the parent's open PyAV,
    HDF5 and EGL handles with their locks but not the threads holding them, and can deadlock on its
    first read (a test hung this way). Spawned workers unpickle the dataset (RobotSource drops open
    handles), so the caller's script needs an `if __name__ == "__main__":` guard. `persistent` keeps
    the workers (spawn start-up paid once) with the dataset copy they started with, so a later
    `dataset.set_epoch` does not reach them: a sampler of (epoch, index) pairs does (batches.EpochSampler).
    `kwargs` go to DataLoader (drop_last, generator, ...)."""
    if workers > 0:
        kwargs.update(multiprocessing_context="spawn", persistent_workers=persistent)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_fn, **kwargs)
