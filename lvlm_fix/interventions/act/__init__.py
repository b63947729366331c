"""ACT: the method (:mod:`.method`) and its offline per-head search (:mod:`.search`)."""

from .method import (
    HEAD_FILE_FORMAT,
    Act,
    ActConfig,
    act_redistribute,
    act_sinks,
    default_act_layers,
    parse_heads,
    read_head_file,
)
from .search import CALIBRATION, answer_token_ids, calibrate_act, summarize_head_file, write_head_file

# The declaration lives with the search it runs: search.py imports method.py, so Act's class body cannot name it.
Act.calibration = CALIBRATION

__all__ = ["HEAD_FILE_FORMAT", "Act", "ActConfig", "act_redistribute", "act_sinks", "answer_token_ids",
           "calibrate_act", "default_act_layers", "parse_heads", "read_head_file", "summarize_head_file",
           "write_head_file"]
