"""Small in-memory batches for checks: a packed omni row (``omni_batch``) and packed preference
rows (``pref_batch``). Used by the test suite, ``omni-gpu-check`` and the benchmarks; nothing in
training imports them."""
