"""Graph passes, one per file, each ``GraphModule -> GraphModule``."""
