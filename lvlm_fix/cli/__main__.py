"""``python -m lvlm_fix.cli`` (and ``accelerate launch -m lvlm_fix.cli``) runs the CLI."""

from .main import main

main()
