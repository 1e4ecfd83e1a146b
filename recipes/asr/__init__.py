"""AN4 ASR recipe: corpus reader, features, character tokens and models.

Modules:
    data: AN4 reader (``read_an4_split``), ``prepare_an4``, ``AN4Dataset``, ``collate_asr``,
        ``LengthBucketBatchSampler``.
    features: ``FbankConfig``, ``compute_fbank``, ``FeatureCache``, ``GlobalCMVN``, ``SpecAugment``.
    text: ``CharVocab``, ``word_error_rate``, ``char_error_rate``.
    models: ``ConformerCTC``, ``LSTMRNNT``, ``build_model``.

Nothing is imported here so that ``import recipes.asr`` stays cheap; import the submodules.
"""
