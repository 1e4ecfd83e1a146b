"""AN4 for ASR: dataset of (features, tokens), collate and length-bucket batching.

The corpus itself (reader, download, audio I/O) lives in ``csprune.train.an4``, shared with the codec
recipe; its names are re-exported here. Typical use::

    root = prepare_an4(default_an4_root())                   # no-op when the corpus is there
    train = read_an4_split(root, "train")                    # list[Utterance]
    dataset = AN4Dataset(train, FeatureCache(), CharVocab(), cmvn=cmvn, spec_augment=SpecAugment())
    sampler = LengthBucketBatchSampler(dataset.num_frames, batch_size=16, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_asr, num_workers=0)
    for batch in loader:
        loss = model.loss(*batch.inputs())
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from csprune.train.an4 import (  # noqa: F401  (re-exported: the corpus API predates its move to csprune)
    AN4_ROOT_ENV,
    AN4_SAMPLE_RATE,
    AN4_SHA256,
    AN4_SPLIT_SIZES,
    AN4_URL,
    AN4Error,
    Utterance,
    default_an4_root,
    is_an4_root,
    prepare_an4,
    read_an4_split,
    read_audio,
    unpack_an4_archive,
)

from .features import FeatureCache, GlobalCMVN, SpecAugment
from .text import BLANK_ID, CharVocab

__all__ = [
    "AN4_ROOT_ENV", "AN4_URL", "AN4_SHA256", "AN4_SAMPLE_RATE", "AN4_SPLIT_SIZES", "AN4Error", "Utterance",
    "default_an4_root", "is_an4_root", "read_an4_split", "prepare_an4", "unpack_an4_archive", "read_audio",
    "AN4Dataset", "ASRBatch", "collate_asr", "LengthBucketBatchSampler",
]


class AN4Dataset(Dataset):
    """Utterances as (features, token ids) pairs.

    Features come from ``feature_cache`` (computed once, then read from disk), then ``cmvn`` and,
    in training mode, ``spec_augment`` are applied. Works with ``num_workers=0`` and with worker
    processes.

    Args:
        utterances: From ``read_an4_split``.
        feature_cache: Computes/stores fbank features.
        vocab: Turns transcripts into ids.
        cmvn: Global normalization, or None for raw log-mel features.
        spec_augment: Augmentation, or None (test sets); it masks only while in train mode. Its
            generator lives in the dataset, so with ``num_workers > 0`` every worker starts from the
            same seed each epoch; there, apply ``SpecAugment`` to the padded batch in the training
            loop instead (``augment(batch.feats, batch.feat_lens)``).

    Item:
        ``{"feats": [T, F] float32, "tokens": [U] int64, "utt_id": str, "text": str}``.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        feature_cache: FeatureCache,
        vocab: CharVocab,
        cmvn: GlobalCMVN | None = None,
        spec_augment: SpecAugment | None = None,
    ) -> None:
        self.utterances = list(utterances)
        self.feature_cache = feature_cache
        self.vocab = vocab
        self.cmvn = cmvn
        self.spec_augment = spec_augment
        self.tokens = [torch.tensor(vocab.encode(utt.text), dtype=torch.long) for utt in self.utterances]

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def num_frames(self) -> list[int]:
        """Feature frames per utterance from the audio headers (no feature extraction); for
        length-sorted batching."""
        return [self.feature_cache.config.num_frames(utt.num_samples) for utt in self.utterances]

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        feats = self.feature_cache.get(utt)
        if self.cmvn is not None:
            feats = self.cmvn(feats)
        if self.spec_augment is not None:
            feats = self.spec_augment(feats)
        return {"feats": feats, "tokens": self.tokens[index], "utt_id": utt.utt_id, "text": utt.text}


@dataclasses.dataclass
class ASRBatch:
    """A padded batch.

    Attributes:
        feats: ``[B, T, F]`` float32, zero-padded.
        feat_lens: ``[B]`` int64, valid frames.
        tokens: ``[B, U]`` int64, padded with the blank id (0).
        token_lens: ``[B]`` int64, valid tokens.
        utt_ids: Utterance ids.
        texts: Reference transcripts.
    """

    feats: torch.Tensor
    feat_lens: torch.Tensor
    tokens: torch.Tensor
    token_lens: torch.Tensor
    utt_ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.utt_ids)

    def to(self, device: torch.device | str) -> "ASRBatch":
        """Copy with the tensors on ``device``."""
        return dataclasses.replace(
            self,
            feats=self.feats.to(device),
            feat_lens=self.feat_lens.to(device),
            tokens=self.tokens.to(device),
            token_lens=self.token_lens.to(device),
        )

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(feats, feat_lens, tokens, token_lens)``: the positional arguments of every model's
        ``forward`` and ``loss`` (also a calibration tuple for ``csprune.prune_once``)."""
        return self.feats, self.feat_lens, self.tokens, self.token_lens


def collate_asr(items: Sequence[dict]) -> ASRBatch:
    """Pads ``AN4Dataset`` items into an ``ASRBatch`` (features with 0, tokens with blank)."""
    if not items:
        raise ValueError("collate_asr: empty batch")
    feat_lens = torch.tensor([item["feats"].shape[0] for item in items], dtype=torch.long)
    token_lens = torch.tensor([item["tokens"].numel() for item in items], dtype=torch.long)
    num_bins = items[0]["feats"].shape[1]
    feats = torch.zeros(len(items), int(feat_lens.max()), num_bins, dtype=torch.float32)
    tokens = torch.full((len(items), max(int(token_lens.max()), 1)), BLANK_ID, dtype=torch.long)
    for index, item in enumerate(items):
        feats[index, : feat_lens[index]] = item["feats"]
        tokens[index, : token_lens[index]] = item["tokens"]
    return ASRBatch(feats, feat_lens, tokens, token_lens, [item["utt_id"] for item in items], [item["text"] for item in items])


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar length, to waste little compute on padding.

    With ``shuffle``: the indices are shuffled, cut into pools of ``batch_size * pool_batches``,
    each pool is sorted by length and cut into batches, and the batches are shuffled — so batches
    are length-homogeneous but their order and membership change every epoch (``set_epoch``).
    Without ``shuffle``: batches of the length-sorted indices, in order (deterministic eval).

    Under DDP each rank takes every ``num_replicas``-th batch starting at ``rank``; the batch
    list is first cut to a multiple of ``num_replicas`` so every rank runs the same number of
    steps.

    Args:
        lengths: Length of each item (e.g. ``AN4Dataset.num_frames``).
        batch_size: Items per batch.
        shuffle: Randomize per epoch (training) or not (evaluation).
        seed: Base seed; the epoch is added to it.
        drop_last: Drop the last short batch of each pool.
        pool_batches: Batches per sorting pool; larger = less padding, less randomness.
        num_replicas: Number of DDP ranks.
        rank: This rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,  # training default; pass False for evaluation
        seed: int = 0,  # reproducible epochs
        drop_last: bool = False,  # AN4 is small: keep every utterance
        pool_batches: int = 50,  # 50 batches of 16 ~ the whole AN4 train set: near-minimal padding
        num_replicas: int = 1,  # single process unless DDP
        rank: int = 0,  # this process's rank under DDP
    ) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("LengthBucketBatchSampler: batch_size and pool_batches must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"LengthBucketBatchSampler: rank {rank} not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle of ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        count = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(count), key=lambda i: self.lengths[i])
            pools = [order]
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(count, generator=generator).tolist()
            pool_size = self.batch_size * self.pool_batches
            pools = [sorted(order[start : start + pool_size], key=lambda i: self.lengths[i]) for start in range(0, count, pool_size)]
        batches = []
        for pool in pools:
            for start in range(0, len(pool), self.batch_size):
                batch = pool[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in permutation]
        if self.num_replicas > 1:
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[self.rank : usable : self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
