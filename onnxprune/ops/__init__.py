"""The op registry: what each op means (weight layout W[out, in], activation operand, bias slot, channel rule, constant propagation, MAC formula), one file per op family."""
