"""One weight map per architecture: our megatron parameter names <-> the external checkpoint's,
and how each parameter is split over tensor-parallel ranks.

=================  =================================================================================
:mod:`.llm`        the LLM (``models/llm.py``) <-> Hugging Face Llama
:mod:`.vision`     the ViT (``models/vision.py``) <-> transformers' Qwen2-VL vision tower
:mod:`.audio`      SAN-M (``models/audio.py``) <-> FunASR Paraformer encoder
:mod:`.omni`       the omni model: the part maps under ``llm.`` / ``vision_model.`` /
                   ``audio_model.``, the projectors, one chunk's TP/PP split
:mod:`.core`       what every map is made of: :class:`~.core.Link` (one of our parameters, the
                   external tensors it comes from, the row re-ordering ``kind``), row plans,
                   strict key checks, export
:mod:`.sharding`   megatron-core's TP split rule (column / row / replicated, gated ``[gate; up]``),
                   pipeline stage slicing, Transformer Engine layer names
=================  =================================================================================

Each map is the ONE description of its architecture's weights. Everything else uses it:
the streaming importer (``convert/importer.py``: each TP rank reads only its slices through the
links' row plans), the exporter (``convert/exporter.py``: one full tensor at a time, LoRA deltas
merged first by ``training/lora.py``), the whole-state-dict helpers (``hf_to_megatron``,
``hf_to_vision``, ``sanm_from_funasr`` ...: the same links over a state dict in memory), loading
a full state dict into a model chunk (``models/*.load_full_*``: the map's TP rule) and the release
layout (``convert/release.py``: the maps under the release's prefixes).

What a new encoder's map provides (a module here, next to the model it describes):

1. ``links(config, ours="", hf="<default prefix>") -> list[Link]``: every parameter of the
   module, with the external names and the ``kind`` (:data:`.core.KINDS`; a layout no kind
   describes is a new row plan + its inverse in :mod:`.core`, both row re-orderings);
2. ``gated(name) -> bool``: the TP split rule beyond megatron-core's column / row suffixes (which
   ``linear_fc1`` holds ``[gate; up]``); a plain torch module is replicated (always False);
3. the external config -> our config section (``*_config_from_hf`` / ``infer_*_config``) and the
   expected external shapes, for strict checks with the messages of :func:`.core.key_problems`;
4. whole-state-dict helpers built on ``full_from_plans`` / ``export_state`` over its links (for
   tests, parity checks and small models).

Then: one line in :func:`.omni.links` and :func:`.omni.omni_gated` (its prefix), a source option
in ``convert/importer.py``, its config block in ``convert/release.py``.
"""
