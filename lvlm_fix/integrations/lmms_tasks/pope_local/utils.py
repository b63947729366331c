from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403  (lmms-eval's own POPE functions)
