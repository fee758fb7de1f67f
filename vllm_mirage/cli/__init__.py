"""The ``vllm-mirage`` console script: ``check`` (same tokens?) and ``bench`` (how much faster?).

The parent process only parses arguments, resolves the model and prompts, and writes reports; each
engine runs in its own child process (``vllm_mirage.cli.runner``), so ``--help`` is instant, the
GPU is clean for every side, and ``VLLM_USE_MIRAGE`` is whatever that side needs.
"""
