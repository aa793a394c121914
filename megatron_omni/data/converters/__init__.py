"""Converters from the layouts public omni training data comes in to our JSONL
(``docs/data_format.md``): ``omni-convert-data --format FORMAT --input PATH --out DIR``.

One module per format family (``chat``: LLaVA / ShareGPT / OpenAI messages, ``speech``: Kaldi /
FunASR, ``webdataset``: img2dataset tars, ``preference``: DPO pairs), the shared reader, writer
and validator in ``common``, the command line in ``cli``.
"""

from megatron_omni.data.converters.cli import convert, main  # noqa: F401
from megatron_omni.data.converters.common import (  # noqa: F401
    ALL_REASONS,
    CONVERT_REASONS,
    FORMATS,
    ConvertError,
    ConvertReport,
    Options,
)
