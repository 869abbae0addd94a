"""Device code for the decoder: pure functions over a params pytree."""
