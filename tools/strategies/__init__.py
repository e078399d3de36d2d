"""Memory strategies, one module each: how a strategy changes memory, what it needs, how to apply it.

- ``quantize``: bitsandbytes nf4 / int8 and torchao int8 weight-only, which layers each converts.
- ``layerwise_casting``: fp8 storage of diffusers models' weights, upcast per layer.
- ``group_offload``: the groups diffusers' group offloading really makes.
"""
