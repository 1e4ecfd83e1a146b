"""ASR models of the AN4 recipe: ``conformer_ctc`` and ``lstm_rnnt``.

Both share one interface, so the training loop and the pruning engine treat them alike:

* ``forward(feats [B, T, F], feat_lens [B], tokens [B, U], token_lens [B])`` — the four tensors of
  ``ASRBatch.inputs()``; the CTC model ignores the tokens.
* ``loss(feats, feat_lens, tokens, token_lens) -> scalar``.
* ``greedy_decode(feats, feat_lens) -> list[list[int]]`` — token ids without blanks.

They are built from plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.LSTM`` / ``nn.MultiheadAttention``
submodules (the pruning engine's targets) and survive ``copy.deepcopy``. Token id 0 is the blank.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from .text import BLANK_ID

__all__ = [
    "ConvSubsampling",
    "ConformerCTC",
    "LSTMTranscriber",
    "LSTMPredictor",
    "RNNTJoiner",
    "LSTMRNNT",
    "MODELS",
    "build_model",
    "count_parameters",
]


def _lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class ConvSubsampling(nn.Module):
    """Two strided 1-D convolutions over time: ``T -> ceil(ceil(T/2)/2)`` (x4 subsampling).

    Args:
        input_dim: Feature dim ``F``.
        output_dim: Channels of both convolutions (the encoder width).
        kernel_size: Temporal kernel of both convolutions.
    """

    def __init__(self, input_dim: int, output_dim: int, kernel_size: int = 3) -> None:  # 3: 30 ms then 60 ms context
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvSubsampling: kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv1 = nn.Conv1d(input_dim, output_dim, kernel_size, stride=2, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(output_dim, output_dim, kernel_size, stride=2, padding=kernel_size // 2)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for ``lengths`` input frames (``[B]`` -> ``[B]``)."""
        for _ in range(2):
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        return lengths.clamp_min(0)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: feats ``[B, T, F]``, feat_lens ``[B]``.

        Returns:
            ``([B, T', D], [B])`` with ``T' = ceil(ceil(T/2)/2)``.
        """
        x = F.gelu(self.conv1(feats.transpose(1, 2)))
        x = F.gelu(self.conv2(x))
        return x.transpose(1, 2), self.output_lengths(feat_lens)


class ConformerCTC(nn.Module):
    """Conv subsampling (x4) -> ``torchaudio.models.Conformer`` -> Linear -> CTC.

    Defaults give about 2.5M parameters (the size the founding design measured on AN4) and train at a
    few tenths of a second per batch of 16 on a 2-core CPU.

    Args:
        vocab_size: Output units including the blank (``len(CharVocab())``).
        input_dim: Feature dim.
        d_model: Encoder width.
        num_heads: Attention heads.
        ffn_dim: Hidden width of the conformer feed-forward modules.
        num_layers: Conformer blocks.
        depthwise_conv_kernel_size: Kernel of the conformer convolution module (odd).
        dropout: Dropout inside the conformer blocks and before the output layer.
        subsampling_kernel_size: Temporal kernel of the subsampling convolutions.
        use_group_norm: GroupNorm instead of BatchNorm in the convolution module (batch-independent).
    """

    def __init__(
        self,
        vocab_size: int,
        input_dim: int = 80,  # 80-dim fbank (features.FbankConfig)
        d_model: int = 144,  # Conformer-S width (Gulati et al. 2020)
        num_heads: int = 4,  # Conformer-S: 4 heads of 36 dims
        ffn_dim: int = 576,  # 4 x d_model, as in Conformer-S
        num_layers: int = 5,  # ~2.5M parameters; AN4 is small, Conformer-S's 16 would overfit and be slow
        depthwise_conv_kernel_size: int = 15,  # 15 x 40 ms = 0.6 s context; AN4 utterances are 1-6 s
        dropout: float = 0.1,  # Conformer paper's P_drop
        subsampling_kernel_size: int = 3,  # see ConvSubsampling
        use_group_norm: bool = False,  # torchaudio default (BatchNorm)
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.subsampling = ConvSubsampling(input_dim, d_model, subsampling_kernel_size)
        self.encoder = torchaudio.models.Conformer(
            input_dim=d_model,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            depthwise_conv_kernel_size=depthwise_conv_kernel_size,
            dropout=dropout,
            use_group_norm=use_group_norm,
        )
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d_model, vocab_size)

    def forward(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        tokens: torch.Tensor | None = None,
        token_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame-level log-probabilities.

        Args:
            feats: ``[B, T, F]`` padded features.
            feat_lens: ``[B]`` valid frames.
            tokens: Ignored (accepted so every model takes ``ASRBatch.inputs()``).
            token_lens: Ignored.

        Returns:
            ``(log_probs [B, T', V], out_lens [B])`` with ``T' ~ T / 4``.
        """
        x, lengths = self.subsampling(feats, feat_lens)
        x, lengths = self.encoder(x, lengths.clamp_min(1))
        return F.log_softmax(self.output(self.dropout(x)), dim=-1), lengths

    def loss(self, feats: torch.Tensor, feat_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor) -> torch.Tensor:
        """CTC loss (blank 0), each utterance's loss divided by its target length, averaged over
        the batch (``F.ctc_loss(reduction="mean")``); infeasible alignments count 0.

        Args:
            feats: ``[B, T, F]``; feat_lens: ``[B]``; tokens: ``[B, U]`` (blank-padded);
            token_lens: ``[B]``.

        Returns:
            Scalar loss.
        """
        log_probs, out_lens = self(feats, feat_lens)
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            tokens,
            out_lens,
            token_lens,
            blank=BLANK_ID,
            reduction="mean",
            zero_infinity=True,
        )

    @torch.no_grad()
    def greedy_decode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[list[int]]:
        """Best path: per-frame argmax, repeats collapsed, blanks dropped (call ``eval()`` first).

        Args:
            feats: ``[B, T, F]``; feat_lens: ``[B]``.

        Returns:
            One list of token ids (in ``[1, V)``) per utterance.
        """
        log_probs, out_lens = self(feats, feat_lens)
        best = log_probs.argmax(-1).cpu()
        hyps = []
        for path, length in zip(best, out_lens.cpu()):
            path = torch.unique_consecutive(path[: int(length)])
            hyps.append([int(token) for token in path if token != BLANK_ID])
        return hyps


class LSTMTranscriber(nn.Module):
    """RNN-T transcription network: stack ``time_reduction`` frames -> Linear + LayerNorm ->
    ``num_layers`` x (``nn.LSTM`` -> LayerNorm -> dropout) -> Linear.

    Implements torchaudio's transcriber interface (``forward(input, lengths)``). The LayerNorms
    act on each frame alone, so a unidirectional transcriber stays causal (streamable).

    Args:
        input_dim: Feature dim.
        hidden_dim: Width of the input projection and LSTM hidden size (per direction).
        num_layers: LSTM layers (one ``nn.LSTM`` each, so a LayerNorm can follow every layer).
        output_dim: Encoding size fed to the joiner.
        time_reduction: Frames stacked into one (x4: 40 ms per encoder step).
        dropout: Dropout after every LSTM layer (so also on the output).
        bidirectional: Bidirectional LSTM (not streamable; packs the padded batch).
        layer_norm: LayerNorm after the input projection and after every LSTM layer. Without it the
            unidirectional LSTM stack learns the acoustics so slowly on AN4 that the transducer
            collapses onto its predictor (a character LM that ignores the audio).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        num_layers: int,
        output_dim: int,
        time_reduction: int = 4,
        dropout: float = 0.1,
        bidirectional: bool = False,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if time_reduction < 1 or num_layers < 1:
            raise ValueError(f"LSTMTranscriber: need time_reduction >= 1 and num_layers >= 1, got {time_reduction}, {num_layers}")
        self.time_reduction = time_reduction
        self.bidirectional = bidirectional
        width = hidden_dim * (2 if bidirectional else 1)
        self.input_proj = nn.Linear(input_dim * time_reduction, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim) if layer_norm else nn.Identity()
        self.lstms = nn.ModuleList(
            nn.LSTM(hidden_dim if index == 0 else width, hidden_dim, batch_first=True, bidirectional=bidirectional)
            for index in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) if layer_norm else nn.Identity() for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(width, output_dim)

    def forward(self, input: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: input ``[B, T, F]``, lengths ``[B]``.

        Returns:
            ``(encodings [B, T // r, output_dim], lengths // r)`` with ``r = time_reduction``.
        """
        batch, frames, dim = input.shape
        steps = frames // self.time_reduction
        x = input[:, : steps * self.time_reduction].reshape(batch, steps, dim * self.time_reduction)
        out_lens = torch.div(lengths, self.time_reduction, rounding_mode="floor").clamp(min=1, max=max(steps, 1))
        x = self.input_norm(self.input_proj(x))
        for lstm, norm in zip(self.lstms, self.norms):
            if self.bidirectional:
                packed = nn.utils.rnn.pack_padded_sequence(x, out_lens.cpu(), batch_first=True, enforce_sorted=False)
                x, _ = lstm(packed)
                x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=steps)
            else:  # causal: padding after an utterance cannot change its valid outputs
                x, _ = lstm(x)
            x = self.dropout(norm(x))
        return self.output(x), out_lens

    def infer(self, input: torch.Tensor, lengths: torch.Tensor, states: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Streaming inference is not implemented; use ``forward``."""
        raise NotImplementedError("LSTMTranscriber: streaming inference is not implemented")


class LSTMPredictor(nn.Module):
    """RNN-T prediction network: Embedding -> ``nn.LSTM`` -> Linear.

    Implements torchaudio's predictor interface (``forward(input, lengths, state)`` with the state
    as ``[[h, c]]``, ``h, c: [num_layers, B, hidden_dim]``).

    Args:
        vocab_size: Output units including the blank (the blank also starts every sequence).
        embedding_dim: Token embedding size.
        hidden_dim: LSTM hidden size.
        num_layers: LSTM layers.
        output_dim: Encoding size fed to the joiner.
        dropout: Dropout on the embedding, between LSTM layers and on the output.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, output_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, output_dim)

    def forward(
        self,
        input: torch.Tensor,
        lengths: torch.Tensor,
        state: list[list[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
        """Args: input ``[B, U]`` token ids, lengths ``[B]``, state from a previous call or None.

        Returns:
            ``(encodings [B, U, output_dim], lengths, new state)``.
        """
        x = self.dropout(self.embedding(input))
        x, (hidden, cell) = self.lstm(x, None if state is None else (state[0][0], state[0][1]))
        return self.output(self.dropout(x)), lengths, [[hidden, cell]]


class RNNTJoiner(nn.Module):
    """RNN-T joint network: ``Linear(tanh(enc_t + pred_u))``.

    Implements torchaudio's joiner interface.

    Args:
        input_dim: Size of transcriber and predictor encodings.
        vocab_size: Output units including the blank.
    """

    def __init__(self, input_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.output = nn.Linear(input_dim, vocab_size)

    def forward(
        self,
        source_encodings: torch.Tensor,
        source_lengths: torch.Tensor,
        target_encodings: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: source_encodings ``[B, T, D]``, source_lengths ``[B]``, target_encodings
        ``[B, U, D]``, target_lengths ``[B]``.

        Returns:
            ``(logits [B, T, U, V], source_lengths, target_lengths)``.
        """
        joint = torch.tanh(source_encodings.unsqueeze(2) + target_encodings.unsqueeze(1))
        return self.output(joint), source_lengths, target_lengths


class LSTMRNNT(torchaudio.models.RNNT):
    """LSTM transducer: ``torchaudio.models.RNNT`` with an LSTM transcriber (after x4 time
    reduction, LayerNorm after every layer), an LSTM predictor and a tanh joiner;
    ``torchaudio.functional.rnnt_loss`` plus an auxiliary CTC loss on the transcriber.

    Defaults give about 2.1M parameters.

    Args:
        vocab_size: Output units including the blank.
        input_dim: Feature dim.
        time_reduction: Frames stacked before the transcriber LSTM.
        encoder_hidden_dim: Transcriber LSTM hidden size.
        encoder_layers: Transcriber LSTM layers.
        bidirectional: Bidirectional transcriber.
        embedding_dim: Predictor token embedding size.
        predictor_hidden_dim: Predictor LSTM hidden size.
        predictor_layers: Predictor LSTM layers.
        joint_dim: Size of both encodings entering the joiner.
        dropout: Dropout in transcriber and predictor.
        max_symbols_per_frame: Greedy decoding emits at most this many tokens per encoder step.
        layer_norm: LayerNorms in the transcriber (see ``LSTMTranscriber``).
        ctc_weight: Weight of an auxiliary CTC loss on the transcriber encodings (a Linear head
            used by ``loss`` only; 0 drops the head). It makes the transcriber align characters to
            the audio early, so the predictor cannot carry the transducer alone.
    """

    def __init__(
        self,
        vocab_size: int,
        input_dim: int = 80,  # 80-dim fbank (features.FbankConfig)
        time_reduction: int = 4,  # 40 ms encoder steps: 4x fewer LSTM steps, same rate as the Conformer
        encoder_hidden_dim: int = 256,  # ~1.6M transcriber parameters with 3 layers
        encoder_layers: int = 3,  # enough depth for a 28-character task on 40 min of audio
        bidirectional: bool = False,  # unidirectional = streamable, the on-device RNN-T family
        embedding_dim: int = 64,  # 29 characters need no larger embedding
        predictor_hidden_dim: int = 256,  # matches the encoder
        predictor_layers: int = 1,  # character LM context is short; one layer is standard
        joint_dim: int = 128,  # the joiner ([B, T, U, joint_dim]) is most of a step's time: 128 vs 256 cuts a step by a third
        dropout: float = 0.1,  # light regularization for a small corpus
        max_symbols_per_frame: int = 5,  # a 40 ms step rarely holds more than 2 characters; bounds loops
        layer_norm: bool = True,  # AN4, 10 epochs, no SpecAugment: without it CTC-only WER 0.58 (vs 0.23), transducer 0.95 (vs 0.23)
        ctc_weight: float = 0.3,  # ESPnet-style auxiliary CTC; AN4, 10 epochs, no SpecAugment: WER 0.228 -> 0.211, CER 0.172 -> 0.139
    ) -> None:
        if ctc_weight < 0:
            raise ValueError(f"LSTMRNNT: ctc_weight must be >= 0, got {ctc_weight}")
        transcriber = LSTMTranscriber(input_dim, encoder_hidden_dim, encoder_layers, joint_dim, time_reduction, dropout, bidirectional, layer_norm)
        predictor = LSTMPredictor(vocab_size, embedding_dim, predictor_hidden_dim, predictor_layers, joint_dim, dropout)
        joiner = RNNTJoiner(joint_dim, vocab_size)
        super().__init__(transcriber, predictor, joiner)
        self.vocab_size = vocab_size
        self.max_symbols_per_frame = max_symbols_per_frame
        self.ctc_weight = ctc_weight
        self.ctc_output = nn.Linear(joint_dim, vocab_size) if ctc_weight > 0 else None

    @staticmethod
    def _prepend_blank(tokens: torch.Tensor) -> torch.Tensor:
        """``[B, U]`` -> ``[B, U + 1]`` with the blank (start symbol) first."""
        return F.pad(tokens, (1, 0), value=BLANK_ID)

    def forward(
        self,
        sources: torch.Tensor,
        source_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        predictor_state: list[list[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
        """Joint-network output for training (same signature as ``torchaudio.models.RNNT``, but
        ``targets`` are the plain token ids: the start blank is prepended here).

        Args:
            sources: ``[B, T, F]`` features; source_lengths: ``[B]``.
            targets: ``[B, U]`` token ids (blank-padded); target_lengths: ``[B]``.
            predictor_state: Predictor state to continue from, or None.

        Returns:
            ``(logits [B, T', U + 1, V], out_lens [B], target_lengths + 1 [B], predictor state)``.
        """
        return super().forward(sources, source_lengths, self._prepend_blank(targets), target_lengths + 1, predictor_state)

    def loss(self, feats: torch.Tensor, feat_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor) -> torch.Tensor:
        """RNN-T loss (blank 0), summed over each utterance's alignment lattice and averaged over
        the batch (``torchaudio.functional.rnnt_loss(reduction="mean")``), plus ``ctc_weight`` x
        the CTC loss of the transcriber encodings, normalized the same way (summed per utterance,
        averaged over the batch).

        Args:
            feats: ``[B, T, F]``; feat_lens: ``[B]``; tokens: ``[B, U]``; token_lens: ``[B]``.

        Returns:
            Scalar loss.
        """
        max_tokens = int(token_lens.max()) if token_lens.numel() else 0
        tokens = tokens[:, :max_tokens]
        enc, enc_lens = self.transcribe(feats, feat_lens)
        pred, _, _ = self.predict(self._prepend_blank(tokens), token_lens + 1, None)
        logits, _, _ = self.join(enc, enc_lens, pred, token_lens + 1)
        loss = torchaudio.functional.rnnt_loss(
            logits.contiguous(),
            tokens.int().contiguous(),
            enc_lens.int(),
            token_lens.int(),
            blank=BLANK_ID,
            reduction="mean",
        )
        if self.ctc_output is not None:
            log_probs = F.log_softmax(self.ctc_output(enc), dim=-1).transpose(0, 1)
            ctc = F.ctc_loss(log_probs, tokens, enc_lens, token_lens, blank=BLANK_ID, reduction="sum", zero_infinity=True)
            loss = loss + self.ctc_weight * ctc / max(tokens.shape[0], 1)
        return loss

    @torch.no_grad()
    def greedy_decode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[list[int]]:
        """Batched greedy search: at each encoder step emit the argmax token and advance the
        predictor until the blank wins or ``max_symbols_per_frame`` tokens were emitted (call
        ``eval()`` first).

        Args:
            feats: ``[B, T, F]``; feat_lens: ``[B]``.

        Returns:
            One list of token ids (in ``[1, V)``) per utterance.
        """
        encodings, enc_lens = self.transcribe(feats, feat_lens)
        batch = encodings.shape[0]
        ones = torch.ones(batch, dtype=torch.long, device=feats.device)
        start = torch.full((batch, 1), BLANK_ID, dtype=torch.long, device=feats.device)
        pred_out, _, state = self.predict(start, ones, None)
        hyps: list[list[int]] = [[] for _ in range(batch)]
        for step in range(encodings.shape[1]):
            active = step < enc_lens
            enc_step = encodings[:, step : step + 1]
            for _ in range(self.max_symbols_per_frame):
                logits, _, _ = self.join(enc_step, ones, pred_out, ones)
                best = logits[:, 0, 0].argmax(-1)
                emit = active & (best != BLANK_ID)
                if not bool(emit.any()):
                    break
                for index in emit.nonzero().flatten().tolist():
                    hyps[index].append(int(best[index]))
                new_out, _, new_state = self.predict(best.unsqueeze(1), ones, state)
                pred_out = torch.where(emit[:, None, None], new_out, pred_out)
                state = [[torch.where(emit[None, :, None], new, old) for new, old in zip(new_layer, old_layer)] for new_layer, old_layer in zip(new_state, state)]
                active = emit
        return hyps


MODELS: dict[str, Callable[..., nn.Module]] = {"conformer_ctc": ConformerCTC, "lstm_rnnt": LSTMRNNT}
"""Model name -> class, the names ``build_model`` (and the Hydra ``model.name``) accept."""


def build_model(name: str, vocab_size: int, **kwargs: Any) -> nn.Module:
    """Builds a recipe model by name.

    Args:
        name: ``"conformer_ctc"`` or ``"lstm_rnnt"``.
        vocab_size: Output units including the blank.
        **kwargs: Constructor arguments of the model class (see ``ConformerCTC``/``LSTMRNNT``).

    Raises:
        ValueError: Unknown name.
        TypeError: An argument the model does not take (the message names the model).
    """
    if name not in MODELS:
        raise ValueError(f"unknown ASR model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](vocab_size, **kwargs)
    except TypeError as err:
        raise TypeError(f"build_model({name!r}): {err}") from err


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(param.numel() for param in model.parameters())
