"""CMRL neural speech codec recipe: cascaded Kankanahalli-Net modules on AN4 audio.

Modules:
    model: ``CMRL``, ``CodecModule``, ``SoftToHardQuantizer``.
    data: framing (``frame_signal`` / ``overlap_add``), ``FrameBank`` of AN4 frames.
    loss: ``CodecLoss`` (time MSE, multi-resolution mel, quantization penalty, rate-controlled entropy).
    lpc: the optional LPC front end (order 16, LSF quantization, pre-emphasis).
    psychoacoustic: MPEG-1 model-1 global masking threshold and the psychoacoustic loss terms.
    bitstream: the entropy-coded ``.cmrl`` file.
    metrics: SNR, segmental SNR, PESQ-WB, STOI, loudness normalisation.
    run: ``run(cfg)`` and the ``@hydra.main`` entry point.

Nothing is imported here so that ``import recipes.codec`` stays cheap; import the submodules.
"""
