"""`python -m mxfp4_moe.verify`: validate an MXFP4 MoE checkpoint end to end.

  cli.py          the command line and the single-process run
  torchrun.py     the same under torchrun, one process per rank
  common.py       what the two share: exit statuses, arguments, the report
  checks.py       one function per check (format, sharding, kernels, fragment order, ...)
  model_check.py  the whole-model check against transformers' own model
  oracle.py       transformers' MoE block holding our dequantized weights
"""

from .checks import check_shard
from .cli import build_parser, main
from .common import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, REPORT_SCHEMA

__all__ = ["EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_OK", "REPORT_SCHEMA", "build_parser", "check_shard", "main"]
