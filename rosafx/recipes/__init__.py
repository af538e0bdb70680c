"""The product's recipes: a model directory and a data file become a task model (heads, data,
the run's configuration), trained, scored and exported; the demo."""
