"""AN4 corpus: reader, prepare (download + checksum + unpack), dataset, collate and batching.

AN4 (CMU census database) ships as::

    <root>/etc/an4_train.fileids          an4_clstk/fash/an251-fash-b
    <root>/etc/an4_train.transcription    <s> YES </s> (an251-fash-b)
    <root>/etc/an4_test.fileids           an4test_clstk/fcaw/an406-fcaw-b
    <root>/etc/an4_test.transcription     RUBOUT G M E F THREE NINE (an406-fcaw-b)
    <root>/wav/<fileid>.wav               16 kHz, 16-bit mono

948 train / 130 test utterances. ``prepare_an4`` fetches the public archive (NIST SPHERE
audio), checks its SHA-256, unpacks it and converts the audio to WAV, giving the layout above.

Typical use::

    root = prepare_an4(default_an4_root())                   # no-op when the corpus is there
    train = read_an4_split(root, "train")                    # list[Utterance]
    dataset = AN4Dataset(train, FeatureCache(), CharVocab(), cmvn=cmvn, spec_augment=SpecAugment())
    sampler = LengthBucketBatchSampler(dataset.num_frames, batch_size=16, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_asr, num_workers=0)
    for batch in loader:
        loss = model.loss(*batch.inputs())
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import soundfile as sf
import torch
from torch.utils.data import Dataset, Sampler

from .features import FeatureCache, GlobalCMVN, SpecAugment
from .text import BLANK_ID, CharVocab

__all__ = [
    "AN4_ROOT_ENV",
    "AN4_URL",
    "AN4_SHA256",
    "AN4_SAMPLE_RATE",
    "AN4_SPLIT_SIZES",
    "AN4Error",
    "Utterance",
    "default_an4_root",
    "is_an4_root",
    "read_an4_split",
    "prepare_an4",
    "unpack_an4_archive",
    "AN4Dataset",
    "ASRBatch",
    "collate_asr",
    "LengthBucketBatchSampler",
]

AN4_ROOT_ENV = "AN4_ROOT"
"""Environment variable naming the corpus folder (default ``data/an4``)."""
AN4_URL = "https://dldata-public.s3.us-east-2.amazonaws.com/an4_sphere.tar.gz"
"""Mirror of CMU's http://www.speech.cs.cmu.edu/databases/an4/an4_sphere.tar.gz (64 MB, SPHERE audio)."""
AN4_SHA256 = "a0525579493735d32b60fb6fa5975dd0eaacde087b0a4eeb7f13b7ef33077b12"
"""SHA-256 of ``an4_sphere.tar.gz`` as published alongside the mirror by other AN4 recipes."""
AN4_SAMPLE_RATE = 16000
AN4_SPLIT_SIZES = {"train": 948, "test": 130}
"""Utterances per split in the public release."""
_SPLITS = ("train", "test")
_AUDIO_SUFFIXES = (".wav", ".sph")
_TRANSCRIPT_LINE = re.compile(r"^(?P<text>.*?)\s*\((?P<utt_id>[^()\s]+)\)\s*$")


class AN4Error(RuntimeError):
    """The AN4 corpus is missing, incomplete or inconsistent; the message names the path."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One AN4 utterance.

    Attributes:
        utt_id: Utterance id, e.g. ``"an251-fash-b"`` (the fileid's basename).
        audio_path: Path of the WAV file.
        text: Normalized transcript without ``<s>``/``</s>``, e.g. ``"YES"``.
        num_samples: Audio length in samples (from the file header).
    """

    utt_id: str
    audio_path: Path
    text: str
    num_samples: int

    @property
    def duration(self) -> float:
        """Duration in seconds at 16 kHz."""
        return self.num_samples / AN4_SAMPLE_RATE


def default_an4_root() -> Path:
    """``$AN4_ROOT`` if set, else ``data/an4`` (relative to the working directory)."""
    return Path(os.environ.get(AN4_ROOT_ENV, "data/an4"))


def is_an4_root(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds the AN4 lists for both splits and a ``wav`` folder (cheap check;
    ``read_an4_split`` does the full one)."""
    root = Path(root)
    lists = [root / "etc" / f"an4_{split}.{kind}" for split in _SPLITS for kind in ("fileids", "transcription")]
    return all(path.is_file() for path in lists) and (root / "wav").is_dir()


def _missing_corpus_message(root: Path, reason: str, url: str) -> str:
    return (
        f"AN4 corpus not found at '{root}' ({reason}). Point the environment variable {AN4_ROOT_ENV} "
        f"(or data.root) at an AN4 folder holding etc/an4_{{train,test}}.{{fileids,transcription}} and wav/, "
        f"or fetch it with network access: `python -m recipes.asr.data --root {root}` "
        f"(downloads {url}); offline, download that file elsewhere and run "
        f"`python -m recipes.asr.data --root {root} --archive an4_sphere.tar.gz`."
    )


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty stripped lines with 1-based line numbers."""
    with path.open(encoding="utf-8") as handle:
        return [(number, line.strip()) for number, line in enumerate(handle, 1) if line.strip()]


def _parse_transcription(path: Path) -> dict[str, str]:
    transcripts: dict[str, str] = {}
    for number, line in _read_lines(path):
        match = _TRANSCRIPT_LINE.match(line)
        if match is None:
            raise AN4Error(f"{path}:{number}: expected 'TEXT (utterance-id)', got {line!r}")
        utt_id = match["utt_id"]
        if utt_id in transcripts:
            raise AN4Error(f"{path}:{number}: utterance id {utt_id!r} appears twice")
        words = [word for word in match["text"].split() if word not in ("<s>", "</s>")]
        transcripts[utt_id] = " ".join(words).upper()
    return transcripts


def read_an4_split(root: str | os.PathLike, split: str, check_audio: bool = True) -> list[Utterance]:
    """Reads one split of AN4 from its own layout, pairing every transcript with its audio.

    Args:
        root: Corpus folder (holds ``etc/`` and ``wav/``).
        split: ``"train"`` or ``"test"``.
        check_audio: Read every audio header to check it exists, is 16 kHz mono and get its
            length (about 1 ms a file). When False, ``num_samples`` is 0.

    Returns:
        Utterances in the order of ``etc/an4_{split}.fileids``.

    Raises:
        AN4Error: Missing list or audio file, a transcript whose id has no fileid (or the
            reverse), a malformed line, or audio that is not 16 kHz mono. The message names the
            file (and line).
        ValueError: Unknown split.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root = Path(root)
    fileids_path = root / "etc" / f"an4_{split}.fileids"
    transcription_path = root / "etc" / f"an4_{split}.transcription"
    for path in (fileids_path, transcription_path):
        if not path.is_file():
            raise AN4Error(_missing_corpus_message(root, f"no {path}", AN4_URL))
    transcripts = _parse_transcription(transcription_path)

    fileid_of: dict[str, tuple[str, int]] = {}
    for number, fileid in _read_lines(fileids_path):
        utt_id = fileid.rsplit("/", 1)[-1]
        if utt_id in fileid_of:
            raise AN4Error(f"{fileids_path}:{number}: utterance id {utt_id!r} appears twice")
        fileid_of[utt_id] = (fileid, number)

    orphans = sorted(set(transcripts) - set(fileid_of))
    if orphans:
        raise AN4Error(f"{transcription_path}: {len(orphans)} transcript(s) without a fileid in {fileids_path}, e.g. {orphans[:3]}")
    untranscribed = sorted(set(fileid_of) - set(transcripts))
    if untranscribed:
        raise AN4Error(f"{fileids_path}: {len(untranscribed)} fileid(s) without a transcript in {transcription_path}, e.g. {untranscribed[:3]}")

    utterances = []
    for utt_id, (fileid, number) in fileid_of.items():
        audio_path = root / "wav" / f"{fileid}.wav"
        num_samples = 0
        if check_audio:
            if not audio_path.is_file():
                raise AN4Error(f"{fileids_path}:{number}: audio file {audio_path} for utterance {utt_id!r} is missing")
            try:
                info = sf.info(str(audio_path))
            except RuntimeError as err:  # soundfile raises LibsndfileError (a RuntimeError)
                raise AN4Error(f"{audio_path}: unreadable audio ({err})") from err
            if info.samplerate != AN4_SAMPLE_RATE or info.channels != 1:
                raise AN4Error(f"{audio_path}: {info.samplerate} Hz, {info.channels} channel(s); AN4 must be {AN4_SAMPLE_RATE} Hz mono")
            num_samples = int(info.frames)
        utterances.append(Utterance(utt_id, audio_path, transcripts[utt_id], num_samples))
    return utterances


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_members(archive: tarfile.TarFile, archive_path: Path) -> Iterator[tarfile.TarInfo]:
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise AN4Error(f"{archive_path}: refusing unsafe member path {member.name!r}")
        if member.isfile() or member.isdir():
            yield member


def unpack_an4_archive(archive_path: str | os.PathLike, root: str | os.PathLike, sha256: str | None = AN4_SHA256) -> Path:
    """Checks an AN4 archive's SHA-256, unpacks it into ``root`` and converts SPHERE audio to WAV.

    The archive may hold the corpus under a top folder (``an4/etc/...``, as the public one does)
    or at its top level. It is unpacked into a temporary folder next to ``root`` and moved into
    place only when complete, so an interrupted run leaves no half corpus behind.

    Args:
        archive_path: The ``.tar.gz`` file.
        root: Destination corpus folder; must not exist or be empty.
        sha256: Expected hex digest; None skips the check (for archives you built yourself).

    Returns:
        ``root``.

    Raises:
        AN4Error: Checksum mismatch, unsafe or non-AN4 archive, or a non-empty ``root``.
    """
    archive_path, root = Path(archive_path), Path(root)
    if sha256 is not None:
        actual = _sha256_of(archive_path)
        if actual != sha256.lower():
            raise AN4Error(f"{archive_path}: SHA-256 {actual} does not match the expected {sha256}; the download is corrupt or not the AN4 archive")
    if root.exists() and any(root.iterdir()):
        raise AN4Error(f"{root}: exists and is not empty; refusing to unpack AN4 over it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".an4-unpack-", dir=root.parent))
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            members = list(_safe_members(archive, archive_path))
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: also strips modes and links
                archive.extractall(staging, members=members, filter="data")
            else:
                archive.extractall(staging, members=members)
        corpus_dirs = [path.parent.parent for path in staging.rglob("an4_train.fileids") if path.parent.name == "etc"]
        if len(corpus_dirs) != 1:
            raise AN4Error(f"{archive_path}: expected exactly one etc/an4_train.fileids inside, found {len(corpus_dirs)}")
        corpus = corpus_dirs[0]
        for sph_path in sorted((corpus / "wav").rglob("*.sph")):
            data, sample_rate = sf.read(str(sph_path), dtype="int16")
            sf.write(str(sph_path.with_suffix(".wav")), data, sample_rate, subtype="PCM_16", format="WAV")
            sph_path.unlink()
        if root.exists():
            root.rmdir()
        os.replace(corpus, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def prepare_an4(
    root: str | os.PathLike | None = None,
    url: str = AN4_URL,
    sha256: str | None = AN4_SHA256,
    archive: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Makes sure AN4 is at ``root``: a no-op when it is, else download, verify and unpack.

    Args:
        root: Corpus folder; ``default_an4_root()`` (``$AN4_ROOT`` or ``data/an4``) when None.
        url: Where to download the archive from.
        sha256: Expected SHA-256 of the archive (None skips the check).
        archive: An already downloaded archive to unpack instead of downloading.
        download: When False, a missing corpus is an error instead of a download.

    Returns:
        ``root`` as a Path.

    Raises:
        AN4Error: The corpus is missing and cannot be fetched (no network, download disabled,
            bad checksum); the message names ``root``, ``$AN4_ROOT``, the URL and the command.
    """
    root = Path(root) if root is not None else default_an4_root()
    if is_an4_root(root):
        return root
    if archive is not None:
        return unpack_an4_archive(archive, root, sha256)
    if not download:
        raise AN4Error(_missing_corpus_message(root, "download disabled", url))
    root.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".an4-download-", suffix=".tar.gz", dir=root.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tmp_path.open("wb") as handle:
                shutil.copyfileobj(response, handle)
        except (urllib.error.URLError, OSError) as err:
            raise AN4Error(_missing_corpus_message(root, f"download of {url} failed: {err}", url)) from err
        return unpack_an4_archive(tmp_path, root, sha256)
    finally:
        tmp_path.unlink(missing_ok=True)


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


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download (or unpack) and check the AN4 corpus.")
    parser.add_argument("--root", default=str(default_an4_root()), help=f"corpus folder (default ${AN4_ROOT_ENV} or data/an4)")
    parser.add_argument("--archive", default=None, help="an already downloaded an4_sphere.tar.gz to unpack instead of downloading")
    parser.add_argument("--url", default=AN4_URL, help="archive URL")
    args = parser.parse_args(argv)
    root = prepare_an4(args.root, url=args.url, archive=args.archive)
    counts = {split: len(read_an4_split(root, split)) for split in _SPLITS}
    print(f"AN4 ready at {root}: {counts}")


if __name__ == "__main__":
    _main()
