"""What our runs leave out: notices about mergekit's own code, which its user
cannot act on.

mergekit 0.1.5 sets `torch_dtype` on the output model's configuration
(`mergekit/merge.py`, `_model_out_config`), which transformers 5 deprecates in
favour of `dtype`: every merge prints "`torch_dtype` is deprecated!", naming
nothing of the user's. In an NER merge (and `ner-merge compare`'s plain average)
that one notice is dropped; every other warning and error still shows. Other
recipes, which are mergekit's alone, keep it.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

DEPRECATED_DTYPE_NOTICE = "`torch_dtype` is deprecated! Use `dtype` instead!"
NOTICE_LOGGER = "transformers.configuration_utils"  # where transformers says it


class _WithoutMergekitNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != DEPRECATED_DTYPE_NOTICE


@contextmanager
def mergekit_notices_hidden() -> Iterator[None]:
    """Within the block, drop mergekit's deprecation notice."""
    logger, notices = logging.getLogger(NOTICE_LOGGER), _WithoutMergekitNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)
