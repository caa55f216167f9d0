"""Batches for training: a torch DataLoader over seeded shuffled passes, which accelerate shards and resumes.

    loader = accelerator.prepare_data_loader(shuffled_loader(dataset, batch_size, samples, seed))
    if step:  # a resumed run skips what it read before the checkpoint, and reads on exactly as it would have
        loader = accelerator.skip_first_batches(loader, step)

The sampler is torch's RandomSampler asked for every sample the run will read (`samples`): a fresh permutation
of the data for each pass over it, drawn from one generator seeded with `seed`, so the order is a function of
the seed alone and a longer run reads a shorter one's batches first. Under several processes accelerate deals
the batches out (its BatchSamplerShard); `skip_first_batches` skips batch indices without loading the data.
The loader fetches one batch ahead, so the dataset's items must not draw random numbers: a trainer makes its
step's random draws (caption choice, augmentation) itself, from a generator seeded by the step.
"""

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def shuffled_loader(dataset: Dataset, batch_size: int, samples: int, seed: int, collate_fn=None) -> DataLoader:
    """Batches of `batch_size` from seeded shuffled passes over `dataset`, `samples` items in all (whole batches)."""
    sampler = RandomSampler(dataset, num_samples=samples, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
