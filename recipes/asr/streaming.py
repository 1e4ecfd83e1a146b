"""Streaming greedy transcription for ``model=lstm_rnnt``: feature frames in, partial hypotheses out.

The transcriber is causal (unidirectional LSTMs, per-frame LayerNorm), so an encoder step needs only its own
``time_reduction`` feature frames: the look-ahead is ``time_reduction - 1`` frames (30 ms at x4) plus the
25 ms fbank window. Each step runs the input projection, every LSTM layer one step
(``csprune.deploy.DeployedLSTM.step``) and the same greedy search as ``LSTMRNNT.greedy_decode``: so the
final transcript is the full-utterance one, deployed (sparse) or not.

    stream = StreamingGreedyRNNT(model)          # model: LSTMRNNT in eval mode, deployed or not
    for chunk in frames.split(4):                # [n, F] CMVN'd fbank frames as they arrive
        new_tokens = stream.push(chunk)
        print(vocab.decode(stream.tokens))       # the partial hypothesis
    tokens = stream.finish()
"""

from __future__ import annotations

import torch

from csprune.deploy import as_deployed_lstm
from csprune.errors import ConfigError

from .models import LSTMRNNT
from .text import BLANK_ID

__all__ = ["StreamingGreedyRNNT", "prepare_streaming"]


def prepare_streaming(model: LSTMRNNT) -> None:
    """Give ``model``'s transcriber and predictor LSTMs a ``step`` (dense-form ``DeployedLSTM``s where they are
    still ``nn.LSTM``; deployed ones are kept). Their outputs are unchanged; idempotent."""
    if not isinstance(model, LSTMRNNT):
        raise ConfigError(f"streaming=true needs model=lstm_rnnt, got {type(model).__name__}")
    transcriber = model.transcriber
    if transcriber.bidirectional:
        raise ConfigError("streaming=true needs a unidirectional transcriber (model.bidirectional=false)")
    for index, lstm in enumerate(transcriber.lstms):
        transcriber.lstms[index] = as_deployed_lstm(lstm)
    model.predictor.lstm = as_deployed_lstm(model.predictor.lstm)


class StreamingGreedyRNNT:
    """Frame-synchronous greedy RNN-T decoding of one utterance (batch 1).

    Args:
        model: an ``LSTMRNNT`` in eval mode (made streamable by :func:`prepare_streaming`, called here).
    """

    def __init__(self, model: LSTMRNNT):
        prepare_streaming(model)
        self.model = model
        self.transcriber = model.transcriber
        self.reduction = self.transcriber.time_reduction
        self.tokens: list[int] = []
        self._pending: torch.Tensor | None = None  # feature frames not yet a whole encoder step  [n < r, F]
        self._enc_state = None
        self._pred_out, self._pred_state = self._predict(BLANK_ID, None)
        self.steps = 0

    @torch.inference_mode()
    def _predict(self, token: int, state):
        """One predictor step (Embedding -> LSTM -> Linear; dropout is off in eval)."""
        predictor = self.model.predictor
        emb = predictor.embedding(torch.tensor([token]))  # [1, E]
        out, state = predictor.lstm.step(emb, state)
        return predictor.output(out), state  # [1, D]

    @torch.inference_mode()
    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        """One encoder step from ``r`` frames ``[r, F]`` -> ``[1, D]`` (what ``LSTMTranscriber.forward`` computes at this step)."""
        t = self.transcriber
        x = t.input_norm(t.input_proj(frames.reshape(1, -1)))
        state = self._enc_state or [None] * len(t.lstms)
        new_state = []
        for lstm, norm, layer_state in zip(t.lstms, t.norms, state):
            x, layer_state = lstm.step(x, layer_state)
            new_state.append(layer_state)
            x = norm(x)
        self._enc_state = new_state
        return t.output(x)

    @torch.inference_mode()
    def _search(self, enc: torch.Tensor) -> list[int]:
        """Greedy search at one encoder step (as ``LSTMRNNT.greedy_decode``): emit until the blank wins."""
        joiner, emitted = self.model.joiner, []
        for _ in range(self.model.max_symbols_per_frame):
            best = int(joiner.output(torch.tanh(enc + self._pred_out)).argmax(-1))
            if best == BLANK_ID:
                break
            emitted.append(best)
            self._pred_out, self._pred_state = self._predict(best, self._pred_state)
        return emitted

    def push(self, frames: torch.Tensor) -> list[int]:
        """Feed ``[n, F]`` new feature frames; returns the tokens emitted for the whole encoder steps completed."""
        if frames.dim() != 2:
            raise ConfigError(f"StreamingGreedyRNNT.push: frames must be [n, F], got shape {list(frames.shape)}")
        if self._pending is not None:
            frames = torch.cat([self._pending, frames])
        whole = frames.shape[0] // self.reduction * self.reduction
        emitted = []
        for start in range(0, whole, self.reduction):
            emitted += self._search(self._encode(frames[start: start + self.reduction]))
            self.steps += 1
        self._pending = frames[whole:] if whole < frames.shape[0] else None
        self.tokens += emitted
        return emitted

    def finish(self) -> list[int]:
        """End of the utterance: the final tokens. Frames short of a whole encoder step are dropped, as the
        full-utterance transcriber drops them."""
        self._pending = None
        return self.tokens
