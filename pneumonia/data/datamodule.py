"""The LightningDataModule of a centralized run or of one federated client, over decoded
uint8 tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from pneumonia.data.imageset import ImageSet
from pneumonia.data.progressive import ProgressiveConfig, resize_batch, size_at
from pneumonia.data.transforms import AugmentConfig, augment_batch


def class_balanced_weights(labels: torch.Tensor, num_classes: int) -> list[float]:
    """Per-class loss weights N / (K * n_c): every class contributes equally to the loss."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return (len(labels) / (num_classes * counts)).tolist()


@dataclass(frozen=True)
class PoissonBatches:
    """DP-SGD's training batches: Poisson samples of expected size data.batch_size, served in
    chunks of at most `physical` images (None: whole), each image `multiplicity` times in a
    row (augmented independently)."""

    physical: int | None = None
    multiplicity: int = 1


class _Chunks(Sampler[tuple[list[int], bool]]):
    """Each logical batch of `batches` (Poisson batches drawn with `generator`) in chunks of at
    most `size` indices, each with whether it ends its batch: the flag rides with the chunk,
    because Lightning fetches a batch ahead of the step that trains on it (so a sampler that
    signalled the optimizer, as Opacus's BatchMemoryManager does, would signal one chunk
    early). It has no length, as the chunks of an epoch vary: Lightning then runs the epoch
    until the sampler ends (given a length, it would stop after that many chunks), and, at the
    start of a later fit, fetches a first chunk from an iterator it then drops. That dropped
    draw must not shift the batches that train: an iterator that starts after one that served
    a single chunk and stopped rewinds the generator to where that one started. (An epoch cut
    short after more chunks is not replayed: its batches were trained on.)"""

    def __init__(self, batches: Sampler[list[int]], size: int, generator: torch.Generator):
        self.batches, self.size, self.generator = batches, size, generator
        # The generator's state when the last iterator began, and the chunks it served, until
        # it finishes its epoch.
        self._started: tuple[torch.Tensor, int] | None = None

    def __iter__(self) -> Iterator[tuple[list[int], bool]]:
        if self._started is not None and self._started[1] <= 1:  # Lightning's dropped fetch
            self.generator.set_state(self._started[0])
        state, served = self.generator.get_state(), 0
        for batch in self.batches:
            starts = range(0, max(len(batch), 1), self.size)  # an empty batch: one empty chunk
            for start in starts:
                served += 1
                self._started = (state, served)
                yield batch[start : start + self.size], start + self.size >= len(batch)
        self._started = None


class RankShard(Sampler[list[int]]):
    """Process `rank`'s part of each batch of `batches` on `world` processes: contiguous and
    within one image of the others' (a batch of B images: B // world or one more). Every
    process draws the same batches (one seed), so the processes together see each batch a
    single process would, each image once, without the padding a DistributedSampler adds."""

    def __init__(self, batches: Sampler[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            size, extra = divmod(len(batch), self.world)
            start = self.rank * size + min(self.rank, extra)
            yield list(batch[start : start + size + (self.rank < extra)])

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class _ChunkDataset(TensorDataset):
    """(images, labels, ends_step) for a chunk of indices and its flag."""

    def __getitem__(self, key):
        indices, ends_step = key
        return (*super().__getitem__(indices), ends_step)


class ChestXrayDataModule(L.LightningDataModule):
    """Serves ImageSets as (uint8 images, labels) batches; augments training batches after
    they reach the device, as one batched operation."""

    def __init__(
        self,
        train: ImageSet,
        val: ImageSet | None,
        test: ImageSet | None = None,
        val_shift: ImageSet | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        balanced_sampling: bool = False,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        num_workers: int = 0,
        poisson: PoissonBatches | None = None,
        progressive: ProgressiveConfig | None = None,
        planned_epochs: int = 1,
        front: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        self.train, self.val, self.test, self.val_shift = train, val, test, val_shift
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.balanced_sampling = balanced_sampling
        self.augment = augment or AugmentConfig()
        self.generator = torch.Generator().manual_seed(seed)  # batch order
        self.loader_generator = torch.Generator().manual_seed(seed)
        self.num_workers = num_workers
        # DP-SGD's accounting assumes Poisson sampling: each image joins each training batch
        # with probability B / N independently, so batch sizes vary (and may be 0).
        self.poisson = poisson
        self.multiplicity = poisson.multiplicity if poisson is not None else 1
        # Progressive resizing over `planned_epochs` (a federation's: rounds x local epochs).
        # epoch_offset turns the Trainer's epoch into the run's: a federated client sets it
        # each round (its kept Trainer counts only the epochs it trained).
        self.progressive = progressive or ProgressiveConfig()
        self.planned_epochs, self.epoch_offset = planned_epochs, 0
        # The model's fixed front end, computed once per image set (the module's
        # fixed_features; None where the model has none): served in place of the images of
        # every loader whose images do not change from epoch to epoch.
        self.front = front

    def _served(self, images: ImageSet, train: bool) -> torch.Tensor:
        """The tensor a loader serves: the images, or their fixed front end's features."""
        changes = self.augment.enabled or bool(self.progressive.start_size)
        if self.front is None or (train and changes):
            return images.images
        features = self.front(images.images)
        return images.images if features is None else features

    def _loader(self, images: ImageSet, batch_size: int, train: bool) -> DataLoader:
        dataset = TensorDataset(self._served(images, train), images.labels)
        sampler: Sampler[int]
        if train and self.balanced_sampling:
            per_class = 1.0 / torch.bincount(images.labels).float().clamp(min=1)
            # A tensor of weights, which the sampler takes as it is (torch types it a Sequence).
            weights = per_class[images.labels]
            sampler = WeightedRandomSampler(weights, len(images), generator=self.generator)  # type: ignore[arg-type]
        elif train:
            sampler = RandomSampler(dataset, generator=self.generator)
        else:
            sampler = SequentialSampler(dataset)
        world, rank = self._processes()
        # A last batch of one image per process breaks BatchNorm in training (none at all, a
        # process's step on nothing); drop only that case.
        drop_last = train and 0 < len(images) % batch_size < 2 * world
        batches: Sampler = BatchSampler(sampler, batch_size, drop_last)
        if train and self.poisson is not None:
            # Imported here: Opacus's import configures the root logger (pneumonia.training.privacy
            # imports it first and undoes that).
            from opacus.utils.uniform_sampler import UniformWithReplacementSampler

            batches = UniformWithReplacementSampler(
                num_samples=len(images),
                # q = B / N, the rate pneumonia.training.privacy.sample_rate accounts for
                # (same formula).
                sample_rate=min(batch_size / len(images), 1.0),
                generator=self.generator,
            )
            if self.poisson.physical is not None:
                batches = _Chunks(batches, self.poisson.physical, self.generator)
                dataset = _ChunkDataset(*dataset.tensors)
        if world > 1:  # data.batch_size is the global batch (preflight refuses DP here)
            batches = RankShard(batches, rank, world)
        return DataLoader(
            dataset,
            # Whole batches of indices: the images are one tensor, so a batch is one indexing
            # operation instead of batch_size item lookups and a collate (twice as fast).
            sampler=batches,
            batch_size=None,
            # Not self.generator: Lightning creates an extra, unused iterator in the first epoch
            # of a later fit call, and each iterator draws a seed from the loader's generator.
            # The batch order must not depend on that (a kept client Trainer vs a fresh one).
            generator=self.loader_generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _processes(self) -> tuple[int, int]:
        """(world size, this process's rank) of the Trainer serving the loaders: (1, 0) but in
        a distributed run."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Clean validation, then shifted validation when there is one (this order is the
        module's VALIDATION_STAGES)."""
        if self.val is None:  # a federated client: the global model is validated centrally
            return []
        sets = [self.val] + ([self.val_shift] if self.val_shift is not None else [])
        loaders = [self._loader(images, self.eval_batch_size, train=False) for images in sets]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test is None:
            return []
        return self._loader(self.test, self.eval_batch_size, train=False)

    def training_side(self) -> int:
        """The side training batches have in the Trainer's current epoch."""
        assert self.trainer is not None, "training_side needs the datamodule in a Trainer"
        epoch = self.trainer.current_epoch + self.epoch_offset
        return size_at(epoch, self.planned_epochs, self.progressive, self.train.image_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, *chunk = batch  # chunk: [ends_step] under logical batches
        if self.trainer is None or not self.trainer.training or len(labels) == 0:
            return images, labels, *chunk  # evaluation, or an empty Poisson batch
        if self.multiplicity > 1:  # K copies of each image, in a row, augmented apart
            images = images.repeat_interleave(self.multiplicity, dim=0)
            labels = labels.repeat_interleave(self.multiplicity)
        if self.progressive.start_size and (side := self.training_side()) != images.shape[-1]:
            images = resize_batch(images, side)
        if self.augment.enabled:
            images = augment_batch(
                images.float() / 255.0 if images.dtype == torch.uint8 else images, self.augment
            )
        return images, labels, *chunk
