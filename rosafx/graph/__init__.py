"""The captured graph: capture, the site-form table, rules and the plan, the adapted graph's
record, its adapter tensors and its layer structure."""
