"""Image classification: data, recipe, training task, evaluation and prediction."""
