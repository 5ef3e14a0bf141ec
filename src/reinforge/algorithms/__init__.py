"""Pure-tensor algorithms (torch only, no transformers): log-probs, losses, advantages, aggregation."""
