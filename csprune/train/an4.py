"""AN4 corpus (CMU census database): reader, prepare (download + checksum + unpack), audio I/O.

Both recipes read AN4 through this module: the ASR recipe its transcripts, the codec recipe its audio.
AN4 ships as::

    <root>/etc/an4_train.fileids          an4_clstk/fash/an251-fash-b
    <root>/etc/an4_train.transcription    <s> YES </s> (an251-fash-b)
    <root>/etc/an4_test.fileids           an4test_clstk/fcaw/an406-fcaw-b
    <root>/etc/an4_test.transcription     RUBOUT G M E F THREE NINE (an406-fcaw-b)
    <root>/wav/<fileid>.wav               16 kHz, 16-bit mono

948 train / 130 test utterances. ``prepare_an4`` fetches the public archive (NIST SPHERE
audio), checks its SHA-256, unpacks it and converts the audio to WAV, giving the layout above::

    root = prepare_an4(default_an4_root())       # no-op when the corpus is there
    train = read_an4_split(root, "train")        # list[Utterance]
    wave = read_audio(train[0].audio_path)       # [samples] float32 at 16 kHz

``python -m csprune.train.an4 --root DIR`` does the download from the command line.
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

from ..errors import ConfigError, DataError

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
    "read_audio",
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


class AN4Error(DataError, RuntimeError):
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
        f"or fetch it with network access: `python -m csprune.train.an4 --root {root}` "
        f"(downloads {url}); offline, download that file elsewhere and run "
        f"`python -m csprune.train.an4 --root {root} --archive an4_sphere.tar.gz`."
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
        raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}")
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


def read_audio(path: str | os.PathLike, sample_rate: int = AN4_SAMPLE_RATE) -> torch.Tensor:
    """Mono waveform [samples] float32 at ``sample_rate`` from any file soundfile reads.

    Several channels are averaged; another sample rate is resampled (torchaudio's sinc resampler).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: the file is not audio soundfile can read (the message names it).
    """
    import soundfile as sf
    import torchaudio

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as err:  # soundfile.LibsndfileError derives from RuntimeError
        raise ConfigError(f"{path}: not a readable audio file ({err})") from None
    wave = torch.from_numpy(audio.mean(axis=1))
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


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
