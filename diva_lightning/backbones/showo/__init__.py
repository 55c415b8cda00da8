"""Show-o backbone (Phi-1.5 + MAGVIT-v2 + omni-attention), written from the official behaviour.

Modules: ``magvitv2`` (tokenizer with lookup-free quantizer), ``model`` (Show-o = transformers'
Phi with the extended vocabulary), ``prompting`` (the official sequence layouts), ``masks``
(omni-attention 4D masks, MaskGIT training masks), ``sampling`` (MaskGIT / greedy decoding),
``presets`` (tiny, 256 px, 512 px), ``checkpoint`` (folder layout), ``adapter`` (``ShowoAdapter``).
"""

from diva_lightning.backbones.showo.adapter import ShowoAdapter

__all__ = ["ShowoAdapter"]
