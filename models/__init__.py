"""Built-in models: each module builds one small model locally (no download) and caches it.

The core package never imports these: ``sdpo.models.resolve_model_path`` finds a built-in by its
name (``model.path: tiny-arithmetic``) through ``BUILT_IN`` in sdpo/models.py, the way
``load_environment`` finds an environment by ``module:Class``. A built-in model may import a specific
environment (it is trained on that environment's tasks); ``sdpo/`` may not.

    tiny_arithmetic.py   tiny-arithmetic: a 0.59M-parameter Qwen2 warm-started on 2-digit addition
    tiny_pairsums.py     tiny-pairsums: a 0.17M-parameter Qwen2 taught to read the pair_sums feedback
    tiny_calculator.py   tiny-calculator: a 0.59M-parameter Qwen2 that calls the calculator's add tool
"""
