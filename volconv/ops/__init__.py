"""One module per capability; each public op validates once and dispatches to its algorithms."""
