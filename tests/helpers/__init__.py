"""Shared test helpers: running the CLI as a user does, tiny data, fault injection, TensorBoard reading."""
