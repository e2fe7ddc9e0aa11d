"""Adapter conversion: PEFT VeRA (and the UORA authors' checkpoints) in; PEFT VeRA and exact
rank-r PEFT LoRA out.

    from_peft(peft_dir, out_path, base=None)        PEFT folder -> .uora
    to_peft_vera(adapter, out_dir, base=None)       .uora -> PEFT VeRA folder (projections saved)
    to_peft_lora(adapter, out_dir, base=None)       .uora -> PEFT LoRA folder, with a byte report
"""

from uora_rt.convert.from_peft import from_peft
from uora_rt.convert.matrices import live_projections
from uora_rt.convert.to_peft import LoraExport, to_peft_lora, to_peft_vera

__all__ = ["LoraExport", "from_peft", "live_projections", "to_peft_lora", "to_peft_vera"]
