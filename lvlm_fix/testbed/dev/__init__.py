"""The testbed's development tools: the trainer (``train``) and the checkpoint's quality report (``quality``).

Loaded only by ``lvlm-fix testbed train`` and ``python -m lvlm_fix.testbed.dev.quality``; nothing the
product imports needs them. They sit above the evals (the report runs the runner's benches).
"""
