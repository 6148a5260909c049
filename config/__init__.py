"""Configuration: the YAML schema (pydantic v2) and the example file."""
