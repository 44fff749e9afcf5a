"""Placeholder until this op lands (being written now)."""
CONTEXT, ORIGINAL, PSEUDO = 0, 1, 2
permutation_attention = permutation_attention_reference = permutation_mask = None
