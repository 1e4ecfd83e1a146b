"""The training glue both recipes share (docs/design.md, "Architecture").

``csprune.train`` may import the engine (``csprune``); the engine never imports it. Modules:

* ``loop``: ``fit`` (the training loop, resumable at any batch) and ``FitConfig``; ``warmup_cosine``
* ``config``: ``PruneConfig`` (``conf/prune/*.yaml``), its validation and the Pruner builders
* ``run``: ``calibrate``, ``seed_everything``, ``write_json``, ``launch``
* ``checkpoint``: training checkpoints (atomic, ``weights_only`` loads, resume discovery)
* ``ddp``: process groups, the DDP wrapper, shard-averaged BatchNorm buffers, rank agreement
* ``faults``: ``NonFiniteError``, ``Preempted``, the SIGTERM flag
* ``tblog``: TensorBoard tags; ``report``: sweep reports; ``an4``: the AN4 corpus reader

Imports are per module (``from csprune.train.loop import fit``): TensorBoard, matplotlib and
soundfile load only when the module that needs them does.
"""
