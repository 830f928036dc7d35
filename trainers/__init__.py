"""Tasks (data + loss + metric) and the compute-budgeted training loop."""
