"""Placeholder until this op lands (being written now)."""
value_weighted_topk_reward = value_weighted_topk_reward_reference = None
