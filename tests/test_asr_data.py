"""Tests of the AN4 recipe's data side: reader, prepare, features, CMVN, SpecAugment, text, batching."""

import copy
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from recipes.asr.data import (
    AN4_ROOT_ENV,
    AN4_SPLIT_SIZES,
    AN4Dataset,
    AN4Error,
    LengthBucketBatchSampler,
    collate_asr,
    is_an4_root,
    prepare_an4,
    read_an4_split,
)
from recipes.asr.features import FbankConfig, FeatureCache, GlobalCMVN, SpecAugment, compute_fbank, load_audio
from recipes.asr.text import BLANK_ID, CharVocab, char_error_rate, error_counts, word_error_rate

# ---------------------------------------------------------------- fake corpus helpers

FAKE_TRAIN = {"an1-abcd-b": ("spk1/an1-abcd-b", "<s> YES </s>"), "an2-abcd-b": ("spk1/an2-abcd-b", "<s> GO LEFT </s>")}
FAKE_TEST = {"an9-wxyz-b": ("spk2/an9-wxyz-b", "ERASE C Q")}


def _write_split(root: Path, split: str, entries: dict, audio_dir: str, sample_rate: int = 16000, audio_format: str = "WAV") -> None:
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / f"an4_{split}.fileids").write_text("".join(f"{audio_dir}/{fileid}\n" for fileid, _ in entries.values()))
    (etc / f"an4_{split}.transcription").write_text("".join(f"{text} ({utt_id})\n" for utt_id, (_, text) in entries.items()))
    rng = np.random.default_rng(0)
    suffix = ".wav" if audio_format == "WAV" else ".sph"
    for fileid, _ in entries.values():
        path = root / "wav" / audio_dir / f"{fileid}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = (rng.standard_normal(sample_rate // 2) * 3000).astype(np.int16)  # 0.5 s
        sf.write(str(path), samples, sample_rate, subtype="PCM_16", format=audio_format)


def make_fake_an4(root: Path, audio_format: str = "WAV") -> Path:
    _write_split(root, "train", FAKE_TRAIN, "an4_clstk", audio_format=audio_format)
    _write_split(root, "test", FAKE_TEST, "an4test_clstk", audio_format=audio_format)
    return root


# ---------------------------------------------------------------- reader on the real corpus


def test_an4_split_sizes_and_pairing(an4_root):
    vocab = CharVocab()
    for split, expected in AN4_SPLIT_SIZES.items():
        utts = read_an4_split(an4_root, split)
        assert len(utts) == expected
        assert len({u.utt_id for u in utts}) == expected
        for utt in utts:
            assert utt.audio_path.is_file()
            assert utt.audio_path.stem == utt.utt_id
            assert utt.text and "<s>" not in utt.text and "</s>" not in utt.text
            assert utt.num_samples > 0
            vocab.encode(utt.text)  # every transcript is in the fixed vocabulary
    train_ids = {u.utt_id for u in read_an4_split(an4_root, "train")}
    assert not train_ids & {u.utt_id for u in read_an4_split(an4_root, "test")}


@pytest.mark.parametrize(
    ("split", "utt_id", "expected"),
    [("train", "an251-fash-b", "YES"), ("test", "an406-fcaw-b", "RUBOUT G M E F THREE NINE")],
)
def test_known_utterance_matches_transcription_line(an4_root, split, utt_id, expected):
    lines = (an4_root / "etc" / f"an4_{split}.transcription").read_text().splitlines()
    (line,) = [line for line in lines if line.endswith(f"({utt_id})")]
    from_line = " ".join(w for w in line[: line.rindex("(")].split() if w not in ("<s>", "</s>"))
    utt = {u.utt_id: u for u in read_an4_split(an4_root, split)}[utt_id]
    assert utt.text == from_line == expected
    assert utt.audio_path.relative_to(an4_root / "wav").parent.name == utt_id.split("-")[1]


# ---------------------------------------------------------------- reader errors on fake corpora


def test_fake_corpus_reads(tmp_path):
    root = make_fake_an4(tmp_path / "an4")
    assert is_an4_root(root)
    train = read_an4_split(root, "train")
    assert [(u.utt_id, u.text, u.num_samples) for u in train] == [("an1-abcd-b", "YES", 8000), ("an2-abcd-b", "GO LEFT", 8000)]


def test_missing_wav_names_the_file(tmp_path):
    root = make_fake_an4(tmp_path / "an4")
    missing = root / "wav" / "an4_clstk" / "spk1" / "an2-abcd-b.wav"
    missing.unlink()
    with pytest.raises(AN4Error, match="an2-abcd-b.wav"):
        read_an4_split(root, "train")


def test_transcript_without_fileid_names_the_files(tmp_path):
    root = make_fake_an4(tmp_path / "an4")
    with (root / "etc" / "an4_train.transcription").open("a") as handle:
        handle.write("<s> NO </s> (an3-abcd-b)\n")
    with pytest.raises(AN4Error, match=r"an4_train\.transcription.*an3-abcd-b"):
        read_an4_split(root, "train")


def test_fileid_without_transcript_names_the_files(tmp_path):
    root = make_fake_an4(tmp_path / "an4")
    with (root / "etc" / "an4_test.fileids").open("a") as handle:
        handle.write("an4test_clstk/spk2/an8-wxyz-b\n")
    with pytest.raises(AN4Error, match=r"an4_test\.fileids.*an8-wxyz-b"):
        read_an4_split(root, "test")


def test_wrong_sample_rate_names_the_file(tmp_path):
    root = make_fake_an4(tmp_path / "an4")
    _write_split(root, "test", FAKE_TEST, "an4test_clstk", sample_rate=8000)
    with pytest.raises(AN4Error, match=r"an9-wxyz-b\.wav.*8000 Hz"):
        read_an4_split(root, "test")


# ---------------------------------------------------------------- prepare (download + checksum + unpack), no network


def _fake_archive(tmp_path: Path) -> tuple[Path, str]:
    source = make_fake_an4(tmp_path / "src" / "an4", audio_format="NIST")  # SPHERE audio, like the public archive
    archive = tmp_path / "an4_sphere.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="an4")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_prepare_downloads_checks_and_unpacks(tmp_path):
    archive, digest = _fake_archive(tmp_path)
    root = tmp_path / "data" / "an4"
    assert prepare_an4(root, url=archive.as_uri(), sha256=digest) == root
    train = read_an4_split(root, "train")
    assert [u.utt_id for u in train] == list(FAKE_TRAIN)
    assert not list(root.rglob("*.sph"))  # converted to WAV
    original = sf.read(str(tmp_path / "src/an4/wav/an4_clstk/spk1/an1-abcd-b.sph"), dtype="int16")[0]
    assert np.array_equal(sf.read(str(train[0].audio_path), dtype="int16")[0], original)
    assert not [p for p in root.parent.iterdir() if p.name != "an4"]  # no temp files left
    assert prepare_an4(root, url="file:///nonexistent.tar.gz") == root  # present: no download


def test_prepare_rejects_bad_checksum(tmp_path):
    archive, _ = _fake_archive(tmp_path)
    root = tmp_path / "data" / "an4"
    with pytest.raises(AN4Error, match="SHA-256"):
        prepare_an4(root, url=archive.as_uri(), sha256="0" * 64)
    assert not root.exists()
    assert not list(root.parent.iterdir())


def test_prepare_without_network_names_path_env_and_url(tmp_path):
    root = tmp_path / "an4"
    url = (tmp_path / "unreachable.tar.gz").as_uri()
    with pytest.raises(AN4Error) as info:
        prepare_an4(root, url=url)
    message = str(info.value)
    assert str(root) in message and AN4_ROOT_ENV in message and url in message and "python -m csprune.train.an4" in message


def test_prepare_from_local_archive(tmp_path):
    archive, digest = _fake_archive(tmp_path)
    root = prepare_an4(tmp_path / "an4", archive=archive, sha256=digest)
    assert len(read_an4_split(root, "test")) == 1


# ---------------------------------------------------------------- features


@pytest.fixture(scope="module")
def real_subset(an4_root):
    train = read_an4_split(an4_root, "train")
    return train[:: len(train) // 24][:24]  # 24 utterances spread over speakers


def test_fbank_shape_matches_duration(real_subset):
    utt = real_subset[3]
    feats = compute_fbank(load_audio(utt.audio_path))
    assert feats.dtype == torch.float32 and feats.shape[1] == 80
    assert abs(feats.shape[0] - utt.num_samples / 160) <= 3  # one frame per 10 ms
    assert feats.shape[0] == FbankConfig().num_frames(utt.num_samples)
    assert torch.isfinite(feats).all()


def test_feature_cache_hit_is_identical_and_not_recomputed(tmp_path, real_subset):
    utt = real_subset[0]
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(utt)
    path = cache.path_for(utt)
    mtime = path.stat().st_mtime_ns
    second = cache.get(utt)
    assert cache.num_computed == 1
    assert torch.equal(first, second)
    fresh = FeatureCache(tmp_path / "cache")  # another process / run
    assert torch.equal(fresh.get(utt), first) and fresh.num_computed == 0
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(first, compute_fbank(load_audio(utt.audio_path)))


def test_feature_cache_key_changes_with_params(tmp_path, real_subset):
    cache80 = FeatureCache(tmp_path, FbankConfig())
    cache40 = FeatureCache(tmp_path, FbankConfig(num_mel_bins=40))
    assert cache80.directory != cache40.directory
    cache80.get(real_subset[0])
    assert cache40.get(real_subset[0]).shape[1] == 40 and cache40.num_computed == 1


def test_cmvn_normalizes_and_round_trips(tmp_path, real_subset):
    cache = FeatureCache(tmp_path)
    feats = [cache.get(u) for u in real_subset]
    cmvn = GlobalCMVN.fit(feats)
    normalized = torch.cat([cmvn(f) for f in feats])
    assert normalized.mean(0).abs().max() < 1e-3
    assert (normalized.std(0, unbiased=False) - 1).abs().max() < 1e-3
    restored = GlobalCMVN.from_dict(json.loads(json.dumps(cmvn.to_dict())))
    assert all(isinstance(v, float) for v in cmvn.to_dict()["mean"])
    assert torch.equal(restored(feats[0]), cmvn(feats[0]))


def test_specaugment_train_only_and_seeded():
    feats = torch.randn(300, 80) + 5.0  # no zeros before masking
    augment = SpecAugment(seed=123)
    augment.eval()
    assert augment(feats) is feats
    augment.train()
    masked = augment(feats)
    assert (masked == 0).any() and (masked == 0).sum() < feats.numel() // 2
    assert not (feats == 0).any()  # input untouched
    again = SpecAugment(seed=123).train()(feats)
    assert torch.equal(masked, again)
    assert not torch.equal(masked, SpecAugment(seed=124).train()(feats))
    clone = copy.deepcopy(augment)  # deepcopy carries the generator state
    assert torch.equal(clone(feats), augment(feats))
    # exact resume from a saved generator state
    state = augment.get_rng_state()
    next_a = augment(feats)
    augment.set_rng_state(state)
    assert torch.equal(augment(feats), next_a)


def test_specaugment_batch_keeps_time_masks_inside_lengths():
    feats = torch.randn(4, 100, 80) + 5.0
    lengths = torch.tensor([100, 60, 30, 10])
    masked = SpecAugment(num_freq_masks=0, time_mask_width=50, max_time_mask_ratio=1.0, seed=0).train()(feats, lengths)
    for index, length in enumerate(lengths.tolist()):
        assert torch.equal(masked[index, length:], feats[index, length:])


# ---------------------------------------------------------------- text


def test_vocab_round_trip_and_metadata():
    vocab = CharVocab()
    assert len(vocab) == 29 and vocab.blank_id == BLANK_ID == 0
    ids = vocab.encode("go  left's")
    assert BLANK_ID not in ids and vocab.decode(ids) == "GO LEFT'S"
    assert vocab.decode([0, *vocab.encode("A B"), 0]) == "A B"
    assert CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="'7'"):
        vocab.encode("ROOM 7")
    with pytest.raises(ValueError):
        vocab.decode([29])


def test_error_rates_hand_computed():
    assert word_error_rate(["A B C D"], ["A X C"]) == 0.5  # 1 substitution + 1 deletion over 4
    assert char_error_rate(["ABCD"], ["ABD"]) == 0.25
    assert char_error_rate(["GO"], ["NO GO"]) == 1.5  # 3 insertions over 2 characters
    # corpus level: sum of edits / sum of reference words (1/6), not the mean of per-utterance rates
    assert word_error_rate(["A B", "C D E F"], ["A", "C D E F"]) == pytest.approx(1 / 6)
    assert error_counts(["A B", "C"], ["A B", "D"]) == (1, 3)
    assert word_error_rate(["yes"], ["YES"]) == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["A"], [])


# ---------------------------------------------------------------- dataset, collate, sampler


def test_dataset_collate_and_loader(tmp_path, real_subset):
    vocab = CharVocab()
    cache = FeatureCache(tmp_path)
    subset = real_subset[:6]
    dataset = AN4Dataset(subset, cache, vocab, cmvn=GlobalCMVN(torch.zeros(80), torch.ones(80)), spec_augment=SpecAugment().eval())
    assert dataset.num_frames == [cache.get(u).shape[0] for u in subset]
    sampler = LengthBucketBatchSampler(dataset.num_frames, batch_size=4, shuffle=False)
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_asr, num_workers=0))
    assert [len(b) for b in batches] == [4, 2]
    for batch in batches:
        assert batch.feats.shape == (len(batch), int(batch.feat_lens.max()), 80)
        assert batch.tokens.shape == (len(batch), int(batch.token_lens.max()))
        for index in range(len(batch)):
            length = int(batch.feat_lens[index])
            assert torch.equal(batch.feats[index, :length], cache.get(subset[[u.utt_id for u in subset].index(batch.utt_ids[index])]))
            assert (batch.feats[index, length:] == 0).all()
            assert vocab.decode(batch.tokens[index]) == batch.texts[index]
            assert (batch.tokens[index, int(batch.token_lens[index]) :] == BLANK_ID).all()
        assert batch.feat_lens.tolist() == sorted(batch.feat_lens.tolist())
    assert len(batches[0].inputs()) == 4


def test_length_bucket_sampler_covers_all_and_is_seeded():
    lengths = [int(x) for x in torch.randint(50, 600, (103,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, seed=1, pool_batches=4)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    assert len(sampler) == len(epoch0) == 13  # 3 pools of 32 (4 batches each) + a pool of 7 (1 batch)
    for batch in epoch0:
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert list(LengthBucketBatchSampler(lengths, batch_size=8, seed=1, pool_batches=4)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    ranks = [list(LengthBucketBatchSampler(lengths, 8, seed=1, pool_batches=4, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 13 batches cut to 12
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
