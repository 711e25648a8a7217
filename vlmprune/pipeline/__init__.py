"""The pipeline of one request as public functions: host planning, the pure jitted stages, decoding, sampling.

    plan_inputs (host) -> Plan -> DeviceInputs
    encode -> prune -> visual_tokens -> assemble -> decoder_prefill / forward / prefill -> decode (sampler)

``vlmprune.LlavaModel`` is these functions jitted once per instance; benchmarks call them directly.
"""

from vlmprune.pipeline.forward import (  # noqa: F401
    Assembled,
    assemble,
    decoder_prefill,
    encode,
    forward,
    packed_block,
    packed_selection,
    prefill,
    project,
    prune,
    spatial_order,
    tap_request,
    tokens_from_taps,
    visual_tokens,
)
from vlmprune.pipeline.generate import decode  # noqa: F401
from vlmprune.pipeline.plan import (  # noqa: F401
    DeviceInputs,
    Plan,
    check_pixels,
    image_texts,
    next_layout,
    onevision_image_slots,
    plan_inputs,
    prepare_host,
)
from vlmprune.pipeline.sampling import Greedy, TopP, sample_token, sampler  # noqa: F401
from vlmprune.pipeline.sequence import SequencePlan, plan_sequence  # noqa: F401
