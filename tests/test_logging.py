import logging

from vllm_mirage import plugin
from vllm_mirage.megakernel import bridge
from vllm_mirage.models import qwen3


def test_package_logs_go_through_vllms_logger():
    # vLLM configures its handler and format on the "vllm" logger tree only (propagate off): a line
    # from this package must reach that tree to be printed like vLLM's own.
    reached = []

    class Keep(logging.Handler):
        def emit(self, record):
            reached.append(record.name)

    vllm_logger = logging.getLogger("vllm")
    keep = Keep()
    vllm_logger.addHandler(keep)
    try:
        for module in (plugin, qwen3, bridge):
            module.logger.warning("vllm-mirage: a line from %s", module.__name__)
    finally:
        vllm_logger.removeHandler(keep)
    assert reached == [f"vllm.{m.__name__}" for m in (plugin, qwen3, bridge)]
