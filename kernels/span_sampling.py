"""Placeholder until this op lands (being written now)."""
SpanSample = sample_spans = sample_spans_reference = None
