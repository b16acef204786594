"""The method contract (config, layer, Method registry), target matching, and the wrapped model."""
